"""Helpers shared by the torch benchmarks (bench_train_step, bench_inference, gpu_bench).

Self-contained on purpose: this module imports only the standard library, numpy and torch at import
time, so the bare-timm parts of ``gpu_bench.py`` still run on a machine where ichdet's own
dependencies (pydantic, albumentations, pydicom) are missing; ichdet is imported inside the
functions that need it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import common  # bench/common.py: shared with the data benchmarks
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TARGET_RATIO = 1.1  # ichdet's step may cost at most 10 % more than the bare timm step


# ----------------------------------------------------------------------------------------- machine


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, torch build and threads, GPU if any."""
    info: dict[str, Any] = {
        "cpu": common.cpu_model(), "cores": common.usable_cores(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line for the report header."""
    where = f"{info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else "CPU"
    return (f"machine: {info['cpu']}, {info['cores']} cores; {where}; torch {info['torch']} "
            f"({info['torch_threads']} threads), python {info['python']}")


def nvidia_smi() -> str | None:
    """``nvidia-smi``'s card name, memory and driver, or None where there is no nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit"
    done = subprocess.run([exe, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                          check=False)
    return done.stdout.strip() or done.stderr.strip()


# ------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the device queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(runs: dict[str, Callable[[], object]], steps: int, repeats: int,
                device: torch.device) -> dict[str, list[float]]:
    """Per-step milliseconds of each run, ``repeats`` times, the order rotated every repeat.

    Each ``runs[name]()`` does ``steps`` steps, timed by :func:`common.run_interleaved` with the device
    queue drained before and after; rotating the order spreads slow phases of a shared, noisy machine
    over all candidates instead of charging them to one.
    """
    def counted(fn: Callable[[], object]) -> Callable[[], int]:
        def run() -> int:
            fn()
            return steps
        return run

    variants = [common.Variant(name, counted(fn)) for name, fn in runs.items()]
    timings = common.run_interleaved(variants, repeats, log=None, sync=lambda: sync(device))
    return {name: [1000.0 * s / steps for s in t["seconds"]] for name, t in timings.items()}


def summarize(ms: dict[str, list[float]], batch: int) -> dict[str, dict[str, float | list[float]]]:
    """Median, min and max ms/step and the median images/s of each run."""
    return {name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                   "images_per_s": 1000.0 * batch / statistics.median(v), "ms": [round(x, 3) for x in v]}
            for name, v in ms.items()}


def paired_ratio(ms: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of num/den measured side by side in the same repeat."""
    return statistics.median(a / b for a, b in zip(ms[num], ms[den], strict=True))


def rate_with_budget(step: Callable[[], object], device: torch.device, warmup: int, chunk: int,
                     min_chunks: int, budget_s: float) -> dict[str, float]:
    """Median ms/step over chunks of ``chunk`` steps after ``warmup`` steps; stops after ``budget_s``."""
    for _ in range(warmup):
        step()
    chunks: list[float] = []
    start = time.perf_counter()
    while len(chunks) < min_chunks or time.perf_counter() - start < budget_s:
        chunks.append(1000.0 * timed(lambda: [step() for _ in range(chunk)], device) / chunk)
        if len(chunks) >= 50:
            break
    return {"median_ms": statistics.median(chunks), "min_ms": min(chunks), "max_ms": max(chunks),
            "chunks": len(chunks), "steps_per_chunk": chunk}


# ----------------------------------------------------------------------------------------- options


def add_common_args(parser: argparse.ArgumentParser, batch: int) -> None:
    """The options every ichdet-vs-bare benchmark takes."""
    parser.add_argument("--arch", default="resnet18", help="timm architecture (or an ichdet seed alias)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=batch, help="images per batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                        help="ichdet's train.amp (auto: bf16/fp16 on CUDA, off on CPU); the bare loop matches it")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="ichdet's train.channels_last (default: on for CUDA, off on CPU, like the configs)")
    parser.add_argument("--input", choices=["host", "device"], default="host",
                        help="where ichdet's uint8 batch starts: host (pinned on CUDA, as the DataLoader hands "
                             "it over, so the copy to the device is timed) or device. The bare loop always "
                             "gets the normalized float batch already on the device")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    common.add_common_args(parser, repeats=7)  # --repeats (interleaved), --json


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a bare ``cuda`` gets its index (``cuda:0``).

    The index matters: ``ichdet.models.engine.init_runtime("cuda")`` calls ``torch.cuda.set_device``, which
    refuses a CUDA device without an index.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """ichdet's rule (``ichdet.models.engine.precision``) for ``auto``: bf16 if supported, else fp16; off on CPU."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_for(amp: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A plain ``torch.autocast`` factory for the bare loops (nullcontext when amp is off)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    """channels_last or the default NCHW layout."""
    return torch.channels_last if channels_last else torch.contiguous_format


def setup(args: argparse.Namespace) -> tuple[torch.device, str, bool]:
    """``--threads``, then (device, amp, channels_last) from ``--device``, ``--amp``, ``--channels-last``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    return device, resolve_amp(args.amp, device), channels_last


def versus_main(doc: str, batch: int, run: Callable[[argparse.Namespace], dict[str, Any]],
                argv: list[str] | None = None) -> int:
    """The ichdet-vs-bare scripts' ``main``: options, ``run(args)``, ``--json``; 0 whatever the verdict."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_common_args(parser, batch=batch)
    args = parser.parse_args(argv)
    result = run(args)
    if args.json is not None:
        common.write_json(args.json, result)
    return 0


# --------------------------------------------------------------------------------- ichdet vs bare


def versus_result(bench: str, device: torch.device, settings: dict[str, Any], ms: dict[str, list[float]],
                  batch: int, **extra: Any) -> dict[str, Any]:
    """The result of an ichdet-vs-bare run (``ms`` from :func:`interleaved`, with ``ichdet`` and
    ``bare_timm``): ``extra`` goes before the per-run results, then ichdet/bare as the ratio of medians
    (the target), the median of the per-repeat ratios and the ratio of minima."""
    stats = summarize(ms, batch)
    ratio_of_medians = stats["ichdet"]["median_ms"] / stats["bare_timm"]["median_ms"]  # type: ignore[operator]
    return {
        "bench": bench, "machine": describe_machine(device), "settings": settings, **extra, "results": stats,
        "ratio_of_medians": ratio_of_medians, "ratio_paired_median": paired_ratio(ms, "ichdet", "bare_timm"),
        "ratio_of_minima": stats["ichdet"]["min_ms"] / stats["bare_timm"]["min_ms"],  # type: ignore[operator]
        "target_ratio": TARGET_RATIO, "pass": ratio_of_medians <= TARGET_RATIO}


def versus_report(result: dict[str, Any], title: str, unit: str) -> None:
    """Print the machine, ``title``, ms per ``unit`` of each run and the ichdet / bare ratios."""
    print(machine_line(result["machine"]))
    print(title)
    for name, st in result["results"].items():
        print(f"  {name:10s} median {st['median_ms']:9.2f} {'ms/' + unit:8s} (min {st['min_ms']:.2f}, "
              f"max {st['max_ms']:.2f})  {st['images_per_s']:8.1f} img/s")
    print(f"  ichdet / bare: {result['ratio_of_medians']:.3f} (ratio of medians), "
          f"{result['ratio_paired_median']:.3f} (median of per-repeat ratios), "
          f"{result['ratio_of_minima']:.3f} (ratio of minima); target <= {TARGET_RATIO} on the medians: "
          f"{common.verdict(result['pass'])}")


def bare_twin(arch: str, ichdet_model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """``timm.create_model(arch)`` (ichdet's alias resolved) with ``ichdet_model``'s weights, on ``device``."""
    import timm

    from ichdet.models.backbones import resolve_backbone, unwrap

    bare = timm.create_model(resolve_backbone(arch), num_classes=6)
    bare.load_state_dict(unwrap(ichdet_model).state_dict())
    return bare.to(device).to(memory_format=memory_format(channels_last))


def bare_train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                    autocast: Callable[[], AbstractContextManager[Any]], scaler: Any = None) -> None:
    """One plain training step: BCE-with-logits under ``autocast``, zero_grad, backward, optimizer step
    (through ``scaler``, a ``torch.amp.GradScaler``, where one is given)."""
    with autocast():
        loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


# --------------------------------------------------------------------------------------- ichdet bits


def bench_config(arch: str, size: int, batch: int, device: torch.device, amp: str, channels_last: bool,
                 workers: int = 0, extra: Sequence[str] = ()) -> Any:
    """An ichdet Config for ``arch`` at ``size`` px (no pretrained weights: nothing to download)."""
    from ichdet.models.config import build_config

    overrides = [f"model.backbone={arch}", "model.pretrained=false", f"data.image_size={size}",
                 f"train.batch_size={batch}", f"train.num_workers={workers}", f"train.device={device}",
                 f"train.amp={amp}", f"train.channels_last={str(channels_last).lower()}", *extra]
    return build_config({}, overrides, source="bench")


def _synth_part(args: tuple[Path, int, int, int, int]) -> Path:
    from ichdet.synth import SynthSpec, make_dataset

    folder, studies, px, slices, seed = args
    make_dataset(folder, SynthSpec(n_studies=studies, n_test_studies=0, size=px, slices_per_study=(slices, slices),
                                   seed=seed))
    return folder


def make_cache(root: Path, size: int, n_images: int, workers: int = 1, slices: int = 8) -> Path:
    """A labelled, 2-fold ichdet cache of about ``n_images`` synthetic images at ``size`` px under ``root``.

    The synthetic studies are drawn in ``workers`` processes (parts with distinct seeds), their files
    merged into one folder and preprocessed with ``workers`` processes. Returns the cache folder.
    """
    from ichdet.cache.writer import PreprocessOptions, preprocess

    px = min(max(size, 32), 1024)
    studies = max(2, -(-n_images // slices))
    parts = max(1, min(workers, studies // 2))
    plan = [(root / f"part{i}", len(range(i, studies, parts)), px, slices, 1000 + i) for i in range(parts)]
    if parts == 1:
        folders = [_synth_part(plan[0])]
    else:
        with ProcessPoolExecutor(parts) as pool:
            folders = list(pool.map(_synth_part, plan))
    images, csv_lines = root / "images", ["ID,Label"]
    images.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        for dcm in (folder / "stage_2_train_images").glob("*.dcm"):
            dcm.rename(images / dcm.name)
        csv_lines += (folder / "stage_2_train.csv").read_text().splitlines()[1:]
    (root / "labels.csv").write_text("\n".join(csv_lines) + "\n")
    preprocess(images, root / "cache", root / "labels.csv",
               PreprocessOptions(size=px, workers=workers, n_folds=2, progress=False))
    return root / "cache"


class FixedBatchLoader:
    """Stands in for a training DataLoader: the same pre-made batch ``steps`` times.

    It has what :func:`ichdet.train.loop.train_one_epoch` reads of its loader (``sampler``, ``dataset``
    with ``set_epoch``, ``len`` and iteration), so the real epoch loop runs unchanged on it.
    """

    class _Dataset:
        def set_epoch(self, epoch: int) -> None:
            pass

    def __init__(self, batch: tuple[torch.Tensor, ...], steps: int) -> None:
        self.batch = batch
        self.steps = steps
        self.sampler = None
        self.dataset = self._Dataset()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for _ in range(self.steps):
            yield self.batch


def fixed_batch_epochs(trainer: Any, batch: tuple[torch.Tensor, ...]) -> Callable[[int], object]:
    """``run(n)``: ichdet's real epoch loop (``train_one_epoch``) over ``trainer`` on ``batch``, ``n`` steps."""
    from ichdet.train.loop import train_one_epoch

    return lambda n: train_one_epoch(dataclasses.replace(trainer, train_loader=FixedBatchLoader(batch, n)),
                                     epoch=0, progress=False)


def premade_batch(dataset: Any, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` samples of an ichdet SliceDataset (indices cycled), stacked like the DataLoader does."""
    items = [dataset[i % len(dataset)] for i in range(seed, seed + batch)]
    images = torch.stack([it[0] for it in items])
    target = torch.stack([it[1] for it in items])
    rows = torch.tensor([it[2] for it in items], dtype=torch.int64)
    return images, target, rows


def random_batches(n: int, batch: int, channels: int, size: int,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``n`` uint8 NCHW batches (random pixels; content does not change the speed), zero labels, rows."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=gen),
             torch.zeros(batch, 6), torch.arange(i * batch, (i + 1) * batch)) for i in range(n)]


def pin(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Page-locked copies for a CUDA device (what DataLoader(pin_memory=True) hands over)."""
    return tuple(t.pin_memory() for t in batch) if device.type == "cuda" else batch


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary folder removed on exit."""
    return tempfile.TemporaryDirectory(prefix=prefix)
