"""ONNX Runtime against torch on the CPU: the same bundle's prediction both ways, graph optimisation levels,
int8 dynamic quantisation and its accuracy cost (issue 19, item 2).

Runs: a 2D run (``--backbone`` at ``--size`` px, ``--folds`` folds) and a BiGRU sequence run over it, random
weights written by the real run-folder code (timing does not depend on the weights), or trained run
folders given with ``--run`` (then ``--data`` should be their labelled cache, so that the accuracy
figures mean something). Two bundles of the same runs, written by ``write_bundle``: ``--runtime torch``
and ``--runtime onnx``. Images: a labelled synthetic cache (``--studies`` studies of ``--slices``
slices), or ``--data``.

1. End to end (``ensemble_probs``: load the bundle, every fold, flip TTA, the sequence member): torch vs
   onnxruntime, interleaved, medians over ``--repeats``; the largest probability difference.
2. One fold's 2D network over the images and their mirrors: torch (``embed`` after the Normalizer) vs
   onnxruntime at each graph optimisation level (disable, basic, extended, all) vs the graph quantised
   by ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, level all); for the int8 graph, the
   largest probability difference from float32 and the change in weighted log loss on the labels.

Usage::

    .venv/bin/python bench/bench_onnx.py [--backbone resnet34 --size 256 --folds 2] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Variant, format_machine, machine_info, run_interleaved, save_json, table

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_runs(root: Path, backbone: str, size: int, folds: int) -> list[Path]:
    """A 2D run and a sequence run over it (BiGRU, default SeqConfig), random weights, run-folder layout."""
    from ichdet.io import write_text_atomic
    from ichdet.models.backbones import build_model, build_seq_model
    from ichdet.models.checkpoint import save_weights
    from ichdet.models.config import build_config, config_to_yaml, load_seq_config

    cfg = build_config({}, [f"model.backbone={backbone}", f"data.image_size={size}", "model.pretrained=false",
                            "train.device=cpu", "train.amp=off", "train.channels_last=false", "train.batch_size=16",
                            "train.num_workers=0"])
    base = root / "runs" / "base"
    write_text_atomic(base / "config.yaml", config_to_yaml(cfg))
    for k in range(folds):
        save_weights(build_model(cfg.model, cfg.data.in_chans), base / f"fold{k}" / "best.safetensors")
    seq_cfg = load_seq_config(None, ["features.num_workers=0", "train.device=cpu"])
    width = int(build_model(cfg.model, cfg.data.in_chans).num_features) + 6
    seq = root / "runs" / "seq"
    write_text_atomic(seq / "config.yaml", config_to_yaml(seq_cfg))
    write_text_atomic(seq / "seq.json", json.dumps({"bases": [str(base.resolve())]}) + "\n")
    for k in range(folds):
        save_weights(build_seq_model(seq_cfg.model, width, [width - 6]), seq / f"fold{k}" / "best.safetensors")
    return [base, seq]


def make_cache(root: Path, size: int, studies: int, slices: int) -> Path:
    """A labelled synthetic cache at ``size`` px."""
    from ichdet.cache.writer import PreprocessOptions, preprocess
    from ichdet.synth import SynthSpec, make_dataset

    make_dataset(root / "data", SynthSpec(n_studies=studies, n_test_studies=0, size=size,
                                          slices_per_study=(slices, slices), seed=0))
    preprocess(root / "data" / "stage_2_train_images", root / "cache", root / "data" / "stage_2_train.csv",
               PreprocessOptions(size=size, workers=1, n_folds=2, progress=False))
    return root / "cache"


def end_to_end(bundles: dict[str, Path], cache_dir: Path, repeats: int) -> dict[str, Any]:
    """Torch vs onnx bundle through ``ensemble_probs``, interleaved; medians, ratio, largest difference."""
    import numpy as np
    import torch

    from ichdet.cache.store import PixelCache
    from ichdet.infer.bundle import load_ensemble
    from ichdet.infer.predict import ensemble_probs

    cache = PixelCache(cache_dir)
    found: dict[str, np.ndarray] = {}

    def variant(name: str) -> Variant:
        def run() -> int:
            ens = load_ensemble(bundles[name])
            probs = ensemble_probs(ens.members, cache, torch.device("cpu"), tta=True, num_workers=0)
            found[name] = ens.combine([p.mean(0) for p in probs])
            return len(cache)
        return Variant(name, run, unit="images")

    timed = run_interleaved([variant("torch"), variant("onnx")], repeats)
    return {"images": len(cache), "timings": timed, "max_abs_diff": float(np.abs(found["torch"] - found["onnx"]).max()),
            "ratio_onnx_over_torch": timed["onnx"]["median_seconds"] / timed["torch"]["median_seconds"]}


def one_network(bundles: dict[str, Path], cache_dir: Path, repeats: int, tmp: Path) -> dict[str, Any]:
    """One fold's 2D network: torch vs onnxruntime levels vs int8 dynamic quantisation."""
    import numpy as np
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ichdet.cache.labels import LABELS
    from ichdet.cache.store import PixelCache
    from ichdet.evaluate.metrics import weighted_log_loss
    from ichdet.infer.bundle import load_ensemble
    from ichdet.infer.onnx_runtime import session
    from ichdet.models.backbones import input_stats
    from ichdet.models.engine import Normalizer, embed
    from ichdet.models.inputs import SliceDataset

    member = load_ensemble(bundles["onnx"]).members[0].image_members()[0]
    cfg = member.run_config
    cache = PixelCache(cache_dir)
    ds = SliceDataset(cache, np.arange(len(cache)), cfg.data)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    batch = torch.cat([images, torch.flip(images, dims=[3])]).contiguous()
    feed = {"image": batch.numpy()}
    model = member.load_fold(member.folds[0], torch.device("cpu"))
    normalize = Normalizer(*input_stats(model, cfg.data.in_chans), channels_last=False)
    graph = member.onnx_bytes(member.folds[0])
    (tmp / "f32.onnx").write_bytes(graph)
    # onnxruntime's pre-processing first (shape inference, constant folding): the TorchScript exporter
    # passes some Conv weights through Identity nodes, which quantize_dynamic refuses ("not an initializer")
    quant_pre_process(str(tmp / "f32.onnx"), str(tmp / "pre.onnx"))
    quantize_dynamic(str(tmp / "pre.onnx"), str(tmp / "int8.onnx"), weight_type=QuantType.QInt8)
    levels = ("disable", "basic", "extended", "all")
    sessions = {f"ort {level}": session(graph, "bench", level=level) for level in levels}
    sessions["ort int8 (all)"] = session((tmp / "int8.onnx").read_bytes(), "bench int8", level="all")
    out: dict[str, np.ndarray] = {}

    def torch_run() -> int:
        with torch.inference_mode():
            out["torch"] = embed(model, normalize(batch)).numpy()
        return len(batch)

    def ort_run(name: str) -> Variant:
        def run() -> int:
            out[name] = sessions[name].run(None, feed)[0]
            return len(batch)
        return Variant(name, run, unit="images")

    timed = run_interleaved([Variant("torch", torch_run, unit="images"), *(ort_run(n) for n in sessions)], repeats)

    def probs(name: str) -> np.ndarray:
        logits = out[name][:, -len(LABELS):].reshape(2, len(images), len(LABELS)).mean(0)  # TTA: mean of logits'
        return 1.0 / (1.0 + np.exp(-logits))                                               # sigmoid, as a proxy

    labels = np.stack([ds[i][1].numpy() for i in range(len(ds))]).astype(np.float64)
    truth = labels if ((labels == 0) | (labels == 1)).all() else None  # an unlabelled cache: no log loss
    acc = {name: {"max_abs_prob_diff_vs_torch": float(np.abs(probs(name) - probs("torch")).max()),
                  "weighted_log_loss": None if truth is None else weighted_log_loss(truth, probs(name))}
           for name in out}
    sizes = {"f32_mb": len(graph) / 2**20, "int8_mb": (tmp / "int8.onnx").stat().st_size / 2**20}
    return {"batch": len(batch), "timings": timed, "accuracy": acc, "sizes": sizes, "backbone": cfg.model.backbone,
            "image_size": cfg.data.image_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--run", type=Path, action="append", help="trained run folders instead of random weights")
    parser.add_argument("--data", type=Path, help="labelled cache instead of a synthetic one")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from ichdet.infer.bundle import write_bundle
    from ichdet.infer.onnx_runtime import cpu_threads

    info = machine_info()
    print(format_machine(info))
    print(f"onnxruntime intra-op threads {cpu_threads()}; torch threads {__import__('torch').get_num_threads()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    try:
        runs = args.run or make_runs(tmp, args.backbone, args.size, args.folds)
        cache = args.data or make_cache(tmp, args.size, args.studies, args.slices)
        t0 = time.perf_counter()
        bundles = {"torch": write_bundle(runs, tmp / "torch.ichdet")}
        t1 = time.perf_counter()
        bundles["onnx"] = write_bundle(runs, tmp / "onnx.ichdet", runtime="onnx")
        t2 = time.perf_counter()
        print(f"bundle: torch {t1 - t0:.1f} s, onnx (export + check) {t2 - t1:.1f} s")
        e2e = end_to_end(bundles, cache, args.repeats)
        print(table(["variant", "median s", "images/s"],
                    [[n, f"{v['median_seconds']:.2f}", f"{v['median_rate']:.1f}"] for n, v in e2e["timings"].items()]))
        print(f"end to end: onnx / torch = {e2e['ratio_onnx_over_torch']:.2f} (target <= 0.8); largest ensemble "
              f"probability difference {e2e['max_abs_diff']:.2e} (target <= 1e-4)")
        net = one_network(bundles, cache, args.repeats, tmp)
        base = net["timings"]["torch"]["median_seconds"]
        print(table(["variant", "median s", "ratio to torch", "max |p - p_torch|", "weighted log loss"],
                    [[n, f"{v['median_seconds']:.3f}", f"{v['median_seconds'] / base:.2f}",
                      f"{net['accuracy'][n]['max_abs_prob_diff_vs_torch']:.2e}",
                      "" if net["accuracy"][n]["weighted_log_loss"] is None
                      else f"{net['accuracy'][n]['weighted_log_loss']:.5f}"] for n, v in net["timings"].items()]))
        print(f"graph sizes: float32 {net['sizes']['f32_mb']:.1f} MiB, int8 {net['sizes']['int8_mb']:.1f} MiB")
        info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        result = {"machine": info, "end_to_end": e2e, "one_network": net,
                  "args": {k: str(v) for k, v in vars(args).items()},
                  "bundle_seconds": {"torch": t1 - t0, "onnx": t2 - t1}}
        if args.json:
            save_json(args.json, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
