"""``predict-study`` on one 40-slice head CT, split into reading/ordering, inference and writing.

Two bundles with random weights (timing does not depend on the weights), written by the real
``ichdet bundle`` code: a demo-like bundle (resnet10t at 128 and 96 px, 2 folds each, as ``ichdet demo``
trains) and a resnet34 5-fold bundle at 256 px. The study: a 40-slice synthetic study at 512 x 512
(``ichdet synth``), in nested folders with opaque file names. Each repeat runs, interleaved with the
others: the full :func:`ichdet.study.predict.predict_study` + :func:`ichdet.study.result.write_result` (flip TTA)
per bundle, and two baselines on the same files and networks:

* reading baseline: ``pydicom.dcmread`` + ``pixel_array`` of the 40 files (no ordering, no selection);
* inference baseline: the bundle's fold networks (the same ``Member.load_models``) called bare on a
  ready float batch of the 40 slices and its mirror image, in ``torch.inference_mode``.

Reported: median seconds of each phase and end to end, ratios to the baselines, the targets
(reading and ordering <= 1 s; resnet34 5-fold with flip TTA <= 60 s end to end on CPU).

Usage::

    .venv/bin/python bench/bench_study.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_machine, machine_info, median, save_json, table, verdict

BUNDLES: dict[str, list[tuple[str, str, int, int]]] = {  # name -> members (name, backbone, size, folds)
    "demo": [("resnet10t_128", "resnet10t", 128, 2), ("resnet10t_96", "resnet10t", 96, 2)],
    "resnet34x5": [("resnet34_256", "resnet34", 256, 5)],
}


def make_study(root: Path, n_slices: int = 40) -> Path:
    """A synthetic 40-slice study at 512 px, copied into nested folders under opaque names."""
    from ichdet.synth import SynthSpec, make_dataset

    make_dataset(root / "synth", SynthSpec(n_studies=3, n_test_studies=1, size=512,
                                           slices_per_study=(n_slices, n_slices), seed=7))
    study = root / "study"
    for i, f in enumerate(sorted((root / "synth" / "stage_2_test_images").iterdir())):
        target = study / f"SER{i % 2}" / f"{i % 4:03d}" / f"IM{i:04d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    return study


def make_bundle(root: Path, name: str) -> Path:
    """Run folders with random weights for ``BUNDLES[name]``, packed by :func:`ichdet.infer.bundle.write_bundle`."""
    from ichdet.infer.bundle import write_bundle
    from ichdet.io import write_text_atomic
    from ichdet.models.backbones import build_model
    from ichdet.models.checkpoint import save_weights
    from ichdet.models.config import build_config, config_to_yaml

    runs = []
    for run_name, backbone, size, folds in BUNDLES[name]:
        cfg = build_config({}, [f"model.backbone={backbone}", f"data.image_size={size}", "train.device=cpu",
                                "train.amp=off", "train.channels_last=false", "train.batch_size=16"])
        run = root / name / run_name
        write_text_atomic(run / "config.yaml", config_to_yaml(cfg))
        for k in range(folds):
            save_weights(build_model(cfg.model, cfg.data.in_chans), run / f"fold{k}" / "best.safetensors")
        runs.append(run)
    return write_bundle(runs, root / f"{name}.ichdet")


def read_baseline(study: Path) -> float:
    """Seconds to read every file with pixels through plain pydicom (no selection, no ordering)."""
    import pydicom

    start = time.perf_counter()
    for f in sorted(p for p in study.rglob("*") if p.is_file()):
        _ = pydicom.dcmread(f).pixel_array
    return time.perf_counter() - start


def inference_baseline(bundle: Path, n: int) -> float:
    """Seconds for the bundle's networks called bare on a ready batch of ``n`` slices and their mirror."""
    import torch

    from ichdet.infer.bundle import load_ensemble

    ens = load_ensemble(bundle)
    total = 0.0
    for m in ens.members:
        models = m.load_models(torch.device("cpu"))
        data = m.run_config.data  # the bench bundles hold 2D runs only
        size = data.image_size
        x = torch.rand(n, data.in_chans, size, size)
        x = torch.cat([x, torch.flip(x, dims=[3])])
        start = time.perf_counter()
        with torch.inference_mode():
            for model in models:
                for part in x.split(m.run_config.train.batch_size * 2):
                    torch.sigmoid(model(part))
        total += time.perf_counter() - start
    return total


def study_run(study: Path, bundle: Path, out: Path) -> dict[str, float]:
    """One end-to-end predict-study (load, read, infer, write) with its phase timings."""
    from ichdet.infer.bundle import load_ensemble
    from ichdet.study.predict import predict_study
    from ichdet.study.result import write_result

    start = time.perf_counter()
    ens = load_ensemble(bundle)
    loaded = time.perf_counter()
    pred = predict_study(study, ens, tta=True, device="cpu")
    write_result(pred.result, out)
    t = pred.result["timings_s"]
    return {"load_bundle": loaded - start, "read_order": t["read_headers_and_order"] + t["read_pixels"],
            "headers_order": t["read_headers_and_order"], "inference": t["inference"], "write": t["write"],
            "end_to_end": time.perf_counter() - start,
            "n_slices": float(sum(s["n_slices"] for st in pred.result["studies"] for s in st["series"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = machine_info()
    print(format_machine(info))
    tmp = Path(tempfile.mkdtemp(prefix="bench_study_"))
    try:
        study = make_study(tmp)
        bundles = {name: make_bundle(tmp, name) for name in BUNDLES}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in bundles}
        base: dict[str, list[float]] = {"read": [], **{f"infer_{name}": [] for name in bundles}}
        for r in range(args.repeats):
            base["read"].append(read_baseline(study))
            print(f"round {r + 1}: plain pydicom read {base['read'][-1]:.3f} s", flush=True)
            for name, path in bundles.items():
                runs[name].append(study_run(study, path, tmp / f"{name}.json"))
                base[f"infer_{name}"].append(inference_baseline(path, int(runs[name][-1]["n_slices"])))
                print(f"round {r + 1}: {name} " + ", ".join(f"{k} {v:.3f}" for k, v in runs[name][-1].items())
                      + f", bare nets {base[f'infer_{name}'][-1]:.3f} s", flush=True)
        results: dict[str, Any] = {"machine": info, "repeats": args.repeats, "runs": runs, "baselines": base}
        rows = []
        for name in bundles:
            med = {k: median(r[k] for r in runs[name]) for k in runs[name][0]}
            infer_base = median(base[f"infer_{name}"])
            results[name] = {"median": med, "inference_baseline": infer_base}
            rows.append([name, f"{med['load_bundle']:.2f}", f"{med['headers_order']:.3f}", f"{med['read_order']:.3f}",
                         f"{med['inference']:.2f}", f"{infer_base:.2f}", f"{med['inference'] / infer_base:.2f}",
                         f"{med['write'] * 1000:.1f}", f"{med['end_to_end']:.2f}"])
        print(table(["bundle", "load s", "headers+order s", "read+order s", "inference s", "bare nets s",
                     "ratio", "write ms", "end to end s"], rows))
        read_base = median(base["read"])
        read_ours = median(r["read_order"] for rs in runs.values() for r in rs)
        print(f"reading: ichdet (headers, selection, order, pixels -> HU) {read_ours:.3f} s vs plain pydicom "
              f"{read_base:.3f} s (ratio {read_ours / read_base:.2f}); target <= 1 s: {verdict(read_ours <= 1.0)}")
        e2e = results["resnet34x5"]["median"]["end_to_end"]
        print(f"resnet34 5-fold 256 px, flip TTA, end to end {e2e:.1f} s; target <= 60 s: {verdict(e2e <= 60.0)}")
        results["reading"] = {"ichdet": read_ours, "pydicom": read_base}
        save_json(args.json, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
