"""A distilled student against its ensemble on held-out synthetic studies: log loss and time (issue 19, item 1).

A stand-in at the size two shared cores allow (the issue's benchmark is the seed's ensemble on RSNA):

* training cache: ``--studies`` labelled synthetic studies at ``--size`` px, ``--folds`` patient folds;
* teacher: ``--models`` 2D runs (``--backbone``, different seeds and windows) trained on every fold
  (``--epochs``), bundled; the ensemble predicts with flip TTA, every fold;
* student: ``ichdet distill``'s code path with the runs' out-of-fold predictions as soft targets
  (``--alpha``), one fold only (``--fold 0``: one network to run), predicted without TTA;
* held-out: ``--test-studies`` labelled studies of another seed, never seen by either.

Reported: weighted log loss of each on the held-out images and its ratio (target <= 1.10), and the
median inference time over the held-out cache (interleaved repeats) and its ratio (target >= 5x).

Usage::

    .venv/bin/python bench/bench_distill.py [--studies 24 --size 64 --folds 5 --epochs 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Variant, format_machine, machine_info, run_interleaved, save_json, table

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cache(root: Path, studies: int, size: int, folds: int, seed: int) -> Path:
    from ichdet.cache.writer import PreprocessOptions, preprocess
    from ichdet.synth import SynthSpec, make_dataset

    make_dataset(root / "data", SynthSpec(n_studies=studies, n_test_studies=0, size=size, seed=seed,
                                          slices_per_study=(10, 14)))
    preprocess(root / "data" / "stage_2_train_images", root / "cache", root / "data" / "stage_2_train.csv",
               PreprocessOptions(size=size, workers=1, n_folds=folds, progress=False))
    return root / "cache"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--test-studies", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--student-epochs", type=int, default=6)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import numpy as np
    import torch

    from ichdet.cache.labels import LABELS
    from ichdet.cache.store import PixelCache
    from ichdet.evaluate.metrics import weighted_log_loss
    from ichdet.infer.bundle import load_ensemble, write_bundle
    from ichdet.infer.predict import ensemble_probs
    from ichdet.infer.teacher import teacher_targets
    from ichdet.models.config import build_config
    from ichdet.train.distill import distill
    from ichdet.train.loop import train

    info = machine_info()
    print(format_machine(info))
    tmp = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    try:
        cache = _cache(tmp / "train", args.studies, args.size, args.folds, seed=11)
        held = _cache(tmp / "held", args.test_studies, args.size, 2, seed=12)
        base = [f"model.backbone={args.backbone}", f"data.image_size={args.size}", "model.pretrained=false",
                "train.device=cpu", "train.amp=off", "train.channels_last=false", "train.num_workers=0",
                "train.batch_size=32", "train.lr=0.003", "train.warmup_epochs=0.3"]
        variants = [[], ["data.windows=[brain,subdural,bone]", "train.seed=1"], ["train.seed=2"]]
        runs = []
        for i in range(args.models):
            run = tmp / "runs" / f"m{i}"
            train(build_config({}, [*base, f"train.epochs={args.epochs}", *variants[i % len(variants)]]), cache, run,
                  progress=False)
            runs.append(run)
        bundle = write_bundle(runs, tmp / "teacher.ichdet")
        targets = teacher_targets(bundle, cache, runs)
        student_run = tmp / "runs" / "student"
        distill(build_config({}, [*base, f"train.epochs={args.student_epochs}"]), cache, student_run, targets.probs,
                targets.record(), args.alpha, fold="0", progress=False)
        student = write_bundle([student_run], tmp / "student.ichdet")
        held_cache = PixelCache(held)
        truth = held_cache.index[list(LABELS)].to_numpy(np.float64)
        probs: dict[str, np.ndarray] = {}

        def variant(name: str, path: Path, tta: bool) -> Variant:
            def run() -> int:
                ens = load_ensemble(path)
                found = ensemble_probs(ens.members, held_cache, torch.device("cpu"), tta, num_workers=0)
                probs[name] = ens.combine([p.mean(0) for p in found])
                return len(held_cache)
            return Variant(name, run, unit="images")

        timed = run_interleaved([variant("teacher (TTA)", bundle, True), variant("student", student, False)],
                                args.repeats)
        loss = {name: weighted_log_loss(truth, p) for name, p in probs.items()}
        t_teacher, t_student = timed["teacher (TTA)"]["median_seconds"], timed["student"]["median_seconds"]
        passes = {"teacher (TTA)": args.models * args.folds * 2, "student": 1}
        print(table(["", "networks x views", "weighted log loss", "median s", "ms / image"],
                    [[n, passes[n], f"{loss[n]:.4f}", f"{timed[n]['median_seconds']:.2f}",
                      f"{1000 * timed[n]['median_seconds'] / len(held_cache):.1f}"] for n in timed]))
        ratio_loss = loss["student"] / loss["teacher (TTA)"]
        print(f"student / teacher log loss = {ratio_loss:.3f} (target <= 1.10); teacher / student time = "
              f"{t_teacher / t_student:.1f}x (target >= 5x); held-out images {len(held_cache)}")
        info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        save_json(args.json, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "loss": loss,
                              "timings": timed, "loss_ratio": ratio_loss, "speedup": t_teacher / t_student,
                              "targets": targets.record()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
