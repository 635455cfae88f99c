"""``predict-study`` on one 40-slice head CT with a sequence bundle vs the 2D bundle of its base run.

Random weights (timing does not depend on them), written by the real ``ichdet bundle`` code: a base run
(resnet10t at 128 px, 2 folds, as ``ichdet demo`` trains) and a sequence run over it (the default
SeqConfig: BiGRU, 2 folds). Three bundles: ``2d`` (the base alone), ``seq`` (the sequence run, which
carries the base), ``mixed`` (both as members; the base stored once). The study: the 40-slice synthetic
study of ``bench_study.py``. Each repeat runs the three, interleaved, with flip TTA on the CPU.

Reported: median seconds of inference and end to end per bundle, the ratio of each to ``2d``, and the
bundle sizes. A sequence member embeds each slice once per fold of its base run (pooled features and
logits) and runs its sequence model per series; ``mixed`` runs the base's CNNs once per fold and view
for both members (:class:`ichdet.infer.passes.FoldPasses`: the 2D member's probabilities are the sigmoid of
the logits the sequence member reads), so it should cost about what ``seq`` costs, about ``2d`` plus
the sequence models. The load average before and after is printed and saved.

Usage::

    .venv/bin/python bench/bench_seq_bundle.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_study import make_study, study_run
from common import format_machine, machine_info, median, save_json, table

FOLDS = 2


def make_runs(root: Path) -> tuple[Path, Path]:
    """A 2D base run and a sequence run over it, random weights, in run-folder layout."""
    from ichdet.io import write_text_atomic
    from ichdet.models.backbones import build_model, build_seq_model
    from ichdet.models.checkpoint import save_weights
    from ichdet.models.config import build_config, config_to_yaml, load_seq_config

    cfg = build_config({}, ["model.backbone=resnet10t", "data.image_size=128", "train.device=cpu", "train.amp=off",
                            "train.channels_last=false", "train.batch_size=16"])
    base = root / "runs" / "base"
    write_text_atomic(base / "config.yaml", config_to_yaml(cfg))
    for k in range(FOLDS):
        save_weights(build_model(cfg.model, cfg.data.in_chans), base / f"fold{k}" / "best.safetensors")
    seq_cfg = load_seq_config(None, ["features.num_workers=0", "train.device=cpu"])
    width = int(build_model(cfg.model, cfg.data.in_chans).num_features) + 6  # pooled features + 6 logits
    seq = root / "runs" / "seq"
    write_text_atomic(seq / "config.yaml", config_to_yaml(seq_cfg))
    write_text_atomic(seq / "seq.json", json.dumps({"bases": [str(base.resolve())]}) + "\n")
    for k in range(FOLDS):
        save_weights(build_seq_model(seq_cfg.model, width, [width - 6]), seq / f"fold{k}" / "best.safetensors")
    return base, seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = machine_info()
    print(format_machine(info))
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_seq_bundle_"))
    try:
        from ichdet.infer.bundle import write_bundle

        study = make_study(tmp)
        base, seq = make_runs(tmp)
        bundles = {"2d": write_bundle([base], tmp / "2d.ichdet"), "seq": write_bundle([seq], tmp / "seq.ichdet"),
                   "mixed": write_bundle([base, seq], tmp / "mixed.ichdet")}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in bundles}
        for r in range(args.repeats):
            for name, path in bundles.items():
                runs[name].append(study_run(study, path, tmp / f"{name}.json"))
                print(f"round {r + 1}: {name} " + ", ".join(f"{k} {v:.3f}" for k, v in runs[name][-1].items()),
                      flush=True)
        load_after = os.getloadavg()
        print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
        results: dict[str, Any] = {"machine": info, "repeats": args.repeats, "runs": runs,
                                   "loadavg": {"before": load_before, "after": load_after}}
        med = {name: {k: median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        rows = [[name, f"{bundles[name].stat().st_size / 2**20:.1f}", f"{m['inference']:.2f}",
                 f"{m['inference'] / med['2d']['inference']:.2f}", f"{m['end_to_end']:.2f}",
                 f"{m['end_to_end'] / med['2d']['end_to_end']:.2f}"] for name, m in med.items()]
        print(table(["bundle", "MiB", "inference s", "vs 2d", "end to end s", "vs 2d"], rows))
        results["median"] = med
        results["bundle_mib"] = {name: path.stat().st_size / 2**20 for name, path in bundles.items()}
        save_json(args.json, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
