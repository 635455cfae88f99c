"""The GPU benchmark behind ``bench/gpu.sh``: one script, every section guarded, JSON written as it goes.

Sections (each prints its figures; a failure is printed and recorded, and the next section runs):

1. ``card``        nvidia-smi's name, memory, driver; torch, CUDA, cuDNN and their TF32/benchmark flags.
2. ``throughput``  bare timm images/s, training (forward, backward, AdamW) and inference (no_grad
                   forward, batch x2 as ``ichdet predict``), SE-ResNeXt50 at 512 and EfficientNet-B0
                   at 256 with the configs' batch sizes, in bf16 autocast + channels_last and in fp32
                   NCHW; the bf16/fp32 ratios.
3. ``train_step``  ``bench_train_step.py`` (ichdet's real training step vs bare timm) on both models.
4. ``inference``   ``bench_inference.py`` (ichdet's predict path vs bare timm) on both models.
5. ``loader``      does the data loader keep the GPU busy? A synthetic cache at 512 (ichdet synth +
                   preprocess, a few hundred images, rows repeated); per model the real training loop
                   (``train_one_epoch``) fed by the real ``SliceDataset`` + DataLoader (ichdet's loader
                   settings, augmentation on, ``num_workers`` = cores) against the same loop on one
                   pre-made batch (the ceiling); the ratio (>= 0.95: the GPU never waits) and the
                   DataLoader's own samples/s with those workers.
6. ``knobs``       what the two speed settings ichdet turns on for CUDA give over torch's defaults,
                   bare timm, bf16 + CL: ``default`` has both off (cudnn.benchmark off, AdamW's
                   default foreach), ``cudnn_benchmark`` turns on the first (ichdet.models.engine.init_runtime
                   does), ``fused_adamw`` the second (AdamW(fused=True), as ichdet.train.loop.build_trainer).
7. ``onnx``        each model's fp32 inference through onnxruntime's CUDA provider (``onnxruntime-gpu``)
                   against torch fp32 on the card, and the largest logit difference; skipped, with the
                   reason, where onnxruntime or its CUDA provider is missing.

``--smoke`` (``ICHDET_GPU_SMOKE=1 bash bench/gpu.sh``): the same sections with tiny sizes, on the CPU
where there is no GPU, to check the script in a couple of minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from _torchbench import (
    autocast_for,
    bare_train_step,
    bench_config,
    describe_machine,
    fixed_batch_epochs,
    machine_line,
    make_cache,
    memory_format,
    nvidia_smi,
    pin,
    premade_batch,
    rate_with_budget,
    resolve_amp,
    resolve_device,
    sync,
    temp_dir,
    timed,
)

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and step counts of one run (real GPU or smoke)."""

    models: tuple[tuple[str, int, int], ...]  # (timm arch, image size, training batch = the config's)
    warmup: int
    chunk: int
    min_chunks: int
    budget_s: float
    ts_steps: int
    ts_repeats: int
    loader_images: int
    loader_steps: int
    cache_size: int
    sub_timeout_s: int


REAL = Plan(models=(("seresnext50_32x4d", 512, 16), ("efficientnet_b0", 256, 64)), warmup=5, chunk=5,
            min_chunks=3, budget_s=3.0, ts_steps=10, ts_repeats=5, loader_images=384, loader_steps=40,
            cache_size=512, sub_timeout_s=150)
SMOKE = Plan(models=(("seresnext50_32x4d", 32, 2), ("efficientnet_b0", 32, 2)), warmup=1, chunk=1,
             min_chunks=1, budget_s=0.0, ts_steps=1, ts_repeats=2, loader_images=24, loader_steps=2,
             cache_size=64, sub_timeout_s=120)


class Report:
    """Results by section, written to the JSON file after every section."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.path = path
        self.deadline = deadline
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, fn: Callable[[], Any], needs_s: float) -> None:
        print(f"\n=== {name} " + "=" * (60 - len(name)), flush=True)
        start = time.monotonic()
        if self.left() < needs_s:
            entry: dict[str, Any] = {"status": "skipped", "reason": f"time budget: {self.left():.0f} s left, "
                                                                     f"section needs ~{needs_s:.0f} s"}
            print(f"SKIPPED: {entry['reason']}")
        else:
            try:
                entry = {"status": "ok", "result": fn()}
            except Exception as err:  # a failing section must not stop the others
                traceback.print_exc()
                entry = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
                print(f"FAILED: {entry['error']}")
        entry["seconds"] = round(time.monotonic() - start, 1)
        self.data["sections"][name] = entry
        self.write()
        free_memory()

    def write(self) -> None:
        common.write_json(self.path, self.data)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- 1. card


def section_card(device: torch.device) -> dict[str, Any]:
    smi = nvidia_smi()
    print(f"nvidia-smi: {smi if smi is not None else 'not found'}")
    info = describe_machine(device)
    print(machine_line(info))
    for key in ("cudnn", "cudnn_benchmark", "tf32_matmul", "tf32_cudnn", "timm"):
        if key in info:
            print(f"  {key}: {info[key]}")
    return {"nvidia_smi": smi, **info}


# -------------------------------------------------------------------------------- 2. throughput


def bare_steps(arch: str, size: int, batch: int, device: torch.device, bf16_cl: bool,
               fused: bool = False) -> tuple[Callable[[], None], Callable[[], None], int]:
    """(train step, inference step, inference batch) of a bare timm model on one resident batch."""
    import timm

    fmt = memory_format(bf16_cl)
    # bf16 autocast on a CPU without bf16 units is 10-30x slower than fp32: the CPU smoke run keeps fp32
    autocast = autocast_for("bf16" if bf16_cl and device.type == "cuda" else "off", device)
    model = timm.create_model(arch, num_classes=6).to(device).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if fused else None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 6, generator=gen) < 0.2).float().to(device)
    x_inf = torch.randn(2 * batch, 3, size, size, generator=gen).to(device).contiguous(memory_format=fmt)

    def train() -> None:
        model.train()
        bare_train_step(model, x, y, opt, autocast)

    def infer() -> None:
        model.eval()
        with torch.no_grad(), autocast():
            model(x_inf)

    return train, infer, 2 * batch


def section_throughput(plan: Plan, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arch, size, batch in plan.models:
        per: dict[str, Any] = {}
        for mode, bf16_cl in (("bf16_channels_last", True), ("fp32_channels_first", False)):
            train, infer, infer_batch = bare_steps(arch, size, batch, device, bf16_cl)
            t = rate_with_budget(train, device, plan.warmup, plan.chunk, plan.min_chunks, plan.budget_s)
            i = rate_with_budget(infer, device, plan.warmup, plan.chunk, plan.min_chunks, plan.budget_s)
            per[mode] = {"train_images_per_s": 1000 * batch / t["median_ms"], "train_ms_per_step": t["median_ms"],
                         "infer_images_per_s": 1000 * infer_batch / i["median_ms"],
                         "infer_ms_per_batch": i["median_ms"], "train_batch": batch, "infer_batch": infer_batch}
            if device.type == "cuda":
                per[mode]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                torch.cuda.reset_peak_memory_stats(device)
            print(f"{arch} {size}px {mode:20s} train {per[mode]['train_images_per_s']:8.1f} img/s (batch {batch})"
                  f"   infer {per[mode]['infer_images_per_s']:8.1f} img/s (batch {infer_batch})", flush=True)
            del train, infer
            free_memory()
        bf, fp = per["bf16_channels_last"], per["fp32_channels_first"]
        per["bf16_cl_over_fp32"] = {"train": bf["train_images_per_s"] / fp["train_images_per_s"],
                                    "infer": bf["infer_images_per_s"] / fp["infer_images_per_s"]}
        print(f"{arch} {size}px bf16+CL / fp32: train x{per['bf16_cl_over_fp32']['train']:.2f}, "
              f"infer x{per['bf16_cl_over_fp32']['infer']:.2f}")
        out[f"{arch}@{size}"] = per
    return out


# ----------------------------------------------------------------------- 3./4. ichdet vs bare


def run_bench_script(script: str, args: list[str], timeout_s: int) -> dict[str, Any]:
    """Run one of the ichdet-vs-bare scripts in its own process; its JSON result."""
    with temp_dir("ichdet-gpu-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HERE / script), *args, "--json", str(out)]
        print("$ " + " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{script} exited {done.returncode}")
        return json.loads(out.read_text())


def section_versus(plan: Plan, device: torch.device, script: str, batch_mult: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arch, size, batch in plan.models:
        args = ["--device", str(device), "--arch", arch, "--size", str(size), "--batch", str(batch * batch_mult),
                "--steps", str(plan.ts_steps), "--repeats", str(plan.ts_repeats), "--warmup", str(plan.warmup)]
        try:
            res = run_bench_script(script, args, plan.sub_timeout_s)
            out[f"{arch}@{size}"] = {k: res[k] for k in res if k != "machine"}
        except Exception as err:  # one model failing still lets the other run
            print(f"FAILED {arch}: {type(err).__name__}: {err}", flush=True)
            out[f"{arch}@{size}"] = {"error": f"{type(err).__name__}: {err}"}
    if all("error" in v for v in out.values()):
        raise RuntimeError(f"{script} failed for every model")
    return out


# ------------------------------------------------------------------------------------ 5. loader


class SteadyLoader:
    """Wraps a training DataLoader for ``train_one_epoch``: drains it, then times ``steps`` batches.

    The first ``drain`` batches are taken as fast as the loader gives them and thrown away (worker
    start-up, and the prefetch queue emptied, so the timed part cannot live off a queue filled while
    the GPU warmed up); their arrival rate after the first round of workers is the DataLoader's own
    samples/s. Then ``steps`` batches go to the training loop; the clock starts after a device sync
    at the first of them and stops, again after a sync, when the loop asks for one more.
    """

    def __init__(self, loader: Any, drain: int, steps: int, workers: int, device: torch.device) -> None:
        self.loader, self.drain, self.steps, self.workers, self.device = loader, drain, steps, workers, device
        self.sampler = loader.sampler
        self.dataset = loader.dataset
        self.loader_samples_per_s = float("nan")
        self.fed_seconds = float("nan")

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        n_first, t_first = 0, 0.0
        for i in range(self.drain):
            batch = next(it)
            if i == self.workers:
                n_first, t_first = 0, time.perf_counter()
            elif i > self.workers:
                n_first += len(batch[0])
        self.loader_samples_per_s = n_first / (time.perf_counter() - t_first)
        sync(self.device)
        start = time.perf_counter()
        for _ in range(self.steps):
            yield next(it)
        sync(self.device)
        self.fed_seconds = time.perf_counter() - start
        del it


def section_loader(plan: Plan, device: torch.device) -> dict[str, Any]:
    import numpy as np

    from ichdet.cache.store import PixelCache
    from ichdet.models.engine import init_runtime
    from ichdet.train.augment import AugmentedSlices
    from ichdet.train.loop import _loader, build_trainer, train_one_epoch

    workers = common.usable_cores()
    out: dict[str, Any] = {"workers": workers}
    with temp_dir("ichdet-gpu-loader-") as tmp:
        start = time.perf_counter()
        cache = PixelCache(make_cache(Path(tmp), plan.cache_size, plan.loader_images, workers=workers, slices=16))
        out["cache"] = {"images": len(cache), "size": cache.size, "build_s": round(time.perf_counter() - start, 1)}
        print(f"synthetic cache: {len(cache)} images at {cache.size} px in {out['cache']['build_s']} s "
              f"({workers} processes)", flush=True)
        rt = init_runtime(str(device))
        amp = resolve_amp("auto", device)
        for arch, size, batch in plan.models:
            cfg = bench_config(arch, size, batch, device, amp, device.type == "cuda", workers=workers)
            t = build_trainer(cfg, cache, fold=0, rt=rt)
            # ceiling: the real epoch loop on one pre-made batch (pinned host uint8, as the loader delivers it)
            fixed = pin(premade_batch(t.train_loader.dataset, batch), device)
            on_fixed = fixed_batch_epochs(t, fixed)
            on_fixed(plan.warmup + 2)
            steps = plan.loader_steps
            sec = timed(lambda run=on_fixed, steps=steps: run(steps), device)  # type: ignore[misc]
            ceiling = steps * batch / sec
            # fed by the real dataset (augmented, train rows repeated) through ichdet's own loader settings
            drain = workers * 4 + workers  # the in-flight batches of prefetch_factor=4, then one more round
            rows = np.resize(t.train_loader.dataset.rows, (drain + steps + 2) * batch)
            ds = AugmentedSlices(cache, rows, cfg.data, seed=cfg.train.seed)
            steady = SteadyLoader(_loader(ds, cfg, rt, train=True), drain, steps, workers, device)
            train_one_epoch(dataclasses.replace(t, train_loader=steady), 0, False)
            fed = steps * batch / steady.fed_seconds
            res: dict[str, Any] = {
                "batch": batch, "steps": steps, "ceiling_images_per_s": ceiling, "loader_fed_images_per_s": fed,
                "fed_over_ceiling": fed / ceiling, "gpu_never_waits": fed / ceiling >= 0.95,
                "loader_alone_samples_per_s": steady.loader_samples_per_s, "num_workers": workers}
            print(f"{arch} {size}px batch {batch}: one pre-made batch {ceiling:8.1f} img/s | fed by SliceDataset+"
                  f"DataLoader ({workers} workers) {fed:8.1f} img/s | ratio {fed / ceiling:.3f} "
                  f"({'GPU never waits' if fed / ceiling >= 0.95 else 'GPU WAITS for data'}) | "
                  f"DataLoader alone {steady.loader_samples_per_s:8.1f} samples/s", flush=True)
            out[f"{arch}@{size}"] = res
            del t, steady, fixed, on_fixed
            free_memory()
    return out


# ------------------------------------------------------------------------------------- 6. knobs


def section_knobs(plan: Plan, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    saved = torch.backends.cudnn.benchmark
    try:
        for arch, size, batch in plan.models:
            res: dict[str, Any] = {}
            variants: dict[str, tuple[bool, bool]] = {"default": (False, False), "cudnn_benchmark": (True, False),
                                                      "fused_adamw": (False, True)}
            if device.type != "cuda":
                variants.pop("fused_adamw")  # fused AdamW is a CUDA kernel
            for name, (bench_on, fused) in variants.items():
                torch.backends.cudnn.benchmark = bench_on
                train, _, _ = bare_steps(arch, size, batch, device, bf16_cl=True, fused=fused)
                r = rate_with_budget(train, device, plan.warmup, plan.chunk, plan.min_chunks, plan.budget_s)
                res[name] = {"train_images_per_s": 1000 * batch / r["median_ms"], "ms_per_step": r["median_ms"]}
                del train
                free_memory()
            base = res["default"]["train_images_per_s"]
            print(f"{arch} {size}px bf16+CL training: " + ", ".join(
                f"{k} {v['train_images_per_s']:.1f} img/s (x{v['train_images_per_s'] / base:.3f})"
                for k, v in res.items()), flush=True)
            out[f"{arch}@{size}"] = res
    finally:
        torch.backends.cudnn.benchmark = saved
    return out


# -------------------------------------------------------------------------------------- main


def section_onnx(plan: Plan, device: torch.device) -> dict[str, Any]:
    """Inference of each plan model (fp32, batch 2x the training batch) through onnxruntime's CUDA provider
    (TensorRT not used) against torch fp32 on the same card; where onnxruntime or its CUDA provider is
    missing (the CPU-only ``onnxruntime`` wheel), the reason instead. The graph is exported as
    ``ichdet bundle --runtime onnx`` exports (TorchScript exporter, dynamic batch)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        return {"skipped": f"onnxruntime not importable ({err})"}
    providers = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" not in providers:
        return {"skipped": f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers {providers}); "
                           "install onnxruntime-gpu"}
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    out: dict[str, Any] = {"onnxruntime": ort.__version__, "provider": provider}
    for arch, size, batch in plan.models:
        out[f"{arch}@{size}"] = _onnx_one(arch, size, batch, plan, device, ort, provider)
        free_memory()
    return out


def _onnx_one(arch: str, size: int, batch: int, plan: Plan, device: torch.device, ort: Any,
              provider: str) -> dict[str, Any]:
    """One model of :func:`section_onnx`: torch fp32 and onnxruntime images/s, and their largest difference."""
    import io
    import warnings

    import numpy as np
    import timm

    model = timm.create_model(arch, num_classes=6).eval()
    x = torch.randn(2 * batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), buf, dynamo=False, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18)
    sess = ort.InferenceSession(buf.getvalue(), providers=[provider])
    model = model.to(device)
    x_dev = x.to(device)
    feed = x.numpy()

    def torch_step() -> None:
        with torch.no_grad():
            model(x_dev)

    def ort_step() -> None:
        sess.run(None, {"image": feed})  # host input, as the predictor feeds it (the copy counts)

    t = rate_with_budget(torch_step, device, plan.warmup, plan.chunk, plan.min_chunks, plan.budget_s)
    o = rate_with_budget(ort_step, device, plan.warmup, plan.chunk, plan.min_chunks, plan.budget_s)
    with torch.no_grad():
        diff = float(np.abs(sess.run(None, {"image": feed})[0] - model(x_dev).float().cpu().numpy()).max())
    result = {"torch_fp32_images_per_s": 1000 * len(x) / t["median_ms"],
              "ort_images_per_s": 1000 * len(x) / o["median_ms"],
              "ort_over_torch_time": o["median_ms"] / t["median_ms"], "max_abs_logit_diff": diff}
    print(f"{arch} {size}px torch fp32 {result['torch_fp32_images_per_s']:8.1f} img/s   onnxruntime ({provider}) "
          f"{result['ort_images_per_s']:8.1f} img/s   max |diff| {diff:.2e}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")) / "gpu.json")
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("ICHDET_GPU_SMOKE") == "1",
                        help="tiny sizes (CPU where there is no GPU): checks that every section runs")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip sections that would end past this")
    parser.add_argument("--sections", default="card,throughput,train_step,inference,loader,knobs,onnx")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else REAL
    device = resolve_device("auto")  # cuda:0 (with its index: ichdet.models.engine.init_runtime needs one) or cpu
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: running the smoke sizes on the CPU instead (ICHDET_GPU_SMOKE=1)")
        plan = SMOKE
    report = Report(args.out, time.monotonic() + args.budget_s)
    report.data.update(plan="smoke" if plan is SMOKE else "real", device=str(device), models=plan.models)
    if device.type != "cuda":
        print("CPU: the bf16 modes run in fp32 (channels_last kept); figures only check that the code runs")
    wanted = args.sections.split(",")
    # rough seconds each section needs on an H100 (skipped if less is left; the smoke run needs far less)
    needs = {"card": 0, "throughput": 60, "train_step": 60, "inference": 50, "loader": 90, "knobs": 40, "onnx": 40}
    if plan is SMOKE:
        needs = dict.fromkeys(needs, 0)
    sections: dict[str, Callable[[], Any]] = {
        "card": lambda: section_card(device),
        "throughput": lambda: section_throughput(plan, device),
        "train_step": lambda: section_versus(plan, device, "bench_train_step.py", 1),
        "inference": lambda: section_versus(plan, device, "bench_inference.py", 2),
        "loader": lambda: section_loader(plan, device),
        "knobs": lambda: section_knobs(plan, device),
        "onnx": lambda: section_onnx(plan, device),
    }
    for name in wanted:
        report.section(name, sections[name], needs[name])
    summary = {name: entry["status"] for name, entry in report.data["sections"].items()}
    report.data["summary"] = summary
    report.write()
    print(f"\nsections: {summary}\nwritten: {args.out}")
    return 0 if all(v == "ok" for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
