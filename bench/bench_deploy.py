"""Per-study CPU latency of the seed's six-model ensemble (torch and ONNX bundles) against one student network
(issue 19, item 6), side by side in one run.

Random weights at the seed's sizes (timing does not depend on the weights), written by the real
run-folder and bundle code: SE-ResNeXt50 at 512 and at 224, VGG19 at 224, EfficientNet-B0 at 256, -B2 at
288 and ResNet34 at 256 (``src/ichdet/configs``), ``--folds`` folds each. Three variants over one study
of ``--slices`` slices (a synthetic cache):

* ``ensemble torch``: the six models, every fold, flip TTA (as ``predict-study``);
* ``ensemble onnx``: the same bundle written with ``--runtime onnx``;
* ``student``: one ResNet34 at 256 (the distilled student's default: the bundle's first 2D member
  would be SE-ResNeXt50 at 512; ResNet34 is the smaller choice ``--config`` allows), one fold, no TTA.

Each repeat runs the three, interleaved (load the bundle, ``ensemble_probs``, combine). The cost of the
ensembles is linear in the folds and the slices: figures at ``--folds 1`` are a fifth of the seed's
five folds, and the report says what was measured.

Usage::

    .venv/bin/python bench/bench_deploy.py [--folds 1 --slices 8 --repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_onnx import make_cache
from common import Variant, format_machine, machine_info, run_interleaved, save_json, table

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED = ("seresnext50_512", "seresnext50_224", "vgg19", "efficientnet_b0", "efficientnet_b2", "resnet34")
CPU = ["model.pretrained=false", "train.device=cpu", "train.amp=off", "train.channels_last=false",
       "train.num_workers=0"]


def make_run(root: Path, name: str, config: str, folds: int, extra: tuple[str, ...] = ()) -> Path:
    """A run folder of ``configs/<config>.yaml`` with random weights for ``folds`` folds."""
    from importlib import resources

    from ichdet.io import write_text_atomic
    from ichdet.models.backbones import build_model
    from ichdet.models.checkpoint import save_weights
    from ichdet.models.config import config_to_yaml, load_config

    path = resources.files("ichdet") / "configs" / f"{config}.yaml"
    cfg = load_config(Path(str(path)), [*CPU, *extra])
    run = root / "runs" / name
    write_text_atomic(run / "config.yaml", config_to_yaml(cfg))
    for k in range(folds):
        save_weights(build_model(cfg.model, cfg.data.in_chans), run / f"fold{k}" / "best.safetensors")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    from ichdet.cache.store import PixelCache
    from ichdet.infer.bundle import load_ensemble, write_bundle
    from ichdet.infer.predict import ensemble_probs

    info = machine_info()
    print(format_machine(info))
    tmp = Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    try:
        cache = PixelCache(make_cache(tmp, 512, 2, args.slices))
        study = cache.index["study_uid"].iloc[0]
        rows = cache.index.index[cache.index["study_uid"] == study].to_numpy()
        runs = [make_run(tmp, name, name, args.folds) for name in SEED]
        student_run = make_run(tmp, "student", "resnet34", 1)
        t0 = time.perf_counter()
        bundles = {"ensemble torch": write_bundle(runs, tmp / "seed.ichdet")}
        t1 = time.perf_counter()
        bundles["ensemble onnx"] = write_bundle(runs, tmp / "seed_onnx.ichdet", runtime="onnx")
        t2 = time.perf_counter()
        bundles["student"] = write_bundle([student_run], tmp / "student.ichdet")
        print(f"bundles: torch {t1 - t0:.1f} s, onnx (export + check of {len(SEED) * args.folds} networks) "
              f"{t2 - t1:.1f} s")

        def variant(name: str) -> Variant:
            tta = name != "student"

            def run() -> int:
                ens = load_ensemble(bundles[name])
                found = ensemble_probs(ens.members, cache, torch.device("cpu"), tta, num_workers=0, rows=rows)
                ens.combine([p.mean(0) for p in found])
                return len(rows)
            return Variant(name, run, unit="slices")

        timed = run_interleaved([variant(n) for n in bundles], args.repeats)
        base = timed["ensemble torch"]["median_seconds"]
        passes = {"ensemble torch": len(SEED) * args.folds * 2, "ensemble onnx": len(SEED) * args.folds * 2,
                  "student": 1}
        print(table(["variant", "networks x views", "median s / study", "x faster than torch ensemble"],
                    [[n, passes[n], f"{v['median_seconds']:.2f}", f"{base / v['median_seconds']:.1f}"]
                     for n, v in timed.items()]))
        print(f"one study of {len(rows)} slices, {args.folds} fold(s) per ensemble member")
        info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        save_json(args.json, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "timings": timed,
                              "slices": len(rows), "bundle_seconds": {"torch": t1 - t0, "onnx": t2 - t1}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
