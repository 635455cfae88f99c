"""The cost of the study report's figures against plain inference of the same members on the same slices.

A study's report explains its top ``--top`` slices with Grad-CAM on every member (``--folds`` networks
of ``--arch`` at ``--size`` px, random weights: the cost does not depend on them). Timed, interleaved:

- ``inference`` (the baseline): a ``torch.inference_mode`` forward pass of every member over the top
  slices' windowed inputs, sigmoid, no TTA (what the predictor spends on those slices);
- ``gradcam``: :func:`ichdet.study.gradcam.cam_overlays` over the same inputs and members (forward + backward);
- ``figures``: :func:`ichdet.study.gradcam.study_figures` end to end (inputs from HU, CAMs, the overlay
  images in the three report windows at the slices' full 512 px);
- ``render``: :func:`ichdet.study.html.render_report` of those figures (PNG encoding, the page).

The slices are real RSNA slices (the first study of the sample), read once before timing. Reported:
median seconds per study and the ratio of each to ``inference``.

Usage::

    .venv/bin/python bench/bench_report.py                          # resnet34, 256 px, 5 folds, top 3
    .venv/bin/python bench/bench_report.py --arch resnet18 --size 64 --folds 1
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RSNA_SAMPLE,
    Variant,
    add_common_args,
    format_machine,
    machine_info,
    run_interleaved,
    save_json,
    table,
)


def _study(n_slices: int) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """The first ``n_slices`` slices of the sample's first study as a study result (docs/study-result.md,
    built by the study pipeline's scan_folder and build_result) with made-up probabilities (a bump in the
    middle), the study entry, and their HU arrays by SOP Instance UID."""
    import tempfile

    import pydicom

    from ichdet.dicom.read import read_hu
    from ichdet.infer.bundle import Ensemble
    from ichdet.names import LABELS
    from ichdet.study.result import build_result
    from ichdet.study.scan import StudySlice, scan_folder

    files = sorted((RSNA_SAMPLE / "stage_2_train_images").glob("*.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        files = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID == study_uid]
    with tempfile.TemporaryDirectory() as tmp:
        for f in files[:n_slices]:
            (Path(tmp) / f.name).symlink_to(f)
        scan = scan_folder(Path(tmp), min_slices=1)
        (entry,) = scan.studies
        (series,) = entry.selected
        slices = [StudySlice(entry.study_uid, series.series_uid, i, ref.sop_uid, ref.path, ref.position_mm, i)
                  for i, ref in enumerate(series.slices)]
        hu_by_sop = {s.sop_uid: read_hu(s.path) for s in slices}
    probs = np.repeat(np.sin(np.linspace(0.1, 3.0, len(slices)))[:, None], len(LABELS), axis=1)
    ensemble = Ensemble((), dict.fromkeys(LABELS, 0.5), {"bundle_sha256": None, "members": [], "bench": True})
    result = build_result(scan, slices, probs, ensemble, {}, {"tta": False, "device": "cpu", "min_slices": 1})
    return result, result["studies"][0], hu_by_sop


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the members and the study, time the four variants interleaved, return the results."""
    from ichdet.models.backbones import build_model, input_stats
    from ichdet.models.config import DataConfig, ModelConfig
    from ichdet.models.engine import Normalizer
    from ichdet.study.gradcam import cam_overlays, model_inputs, study_figures
    from ichdet.study.html import render_report, study_slices, top_slices

    torch.manual_seed(0)
    data_cfg = DataConfig(image_size=args.size)
    models = [build_model(ModelConfig(backbone=args.arch), data_cfg.in_chans).eval() for _ in range(args.folds)]
    result, study, hu_by_sop = _study(args.slices)
    ordered = study_slices(study)
    chosen = top_slices(study, args.top)
    images = model_inputs([hu_by_sop[ordered[i]["sop_instance_uid"]] for i in chosen], data_cfg)
    normalize = Normalizer(*input_stats(models[0], data_cfg.in_chans), channels_last=False)
    figures = study_figures(study, hu_by_sop, models, data_cfg, top_k=args.top)

    @torch.inference_mode()
    def inference() -> int:
        x = normalize(torch.from_numpy(images))
        for model in models:
            torch.sigmoid(model(x))
        return 1

    variants = [
        Variant("inference", inference, unit="studies"),
        Variant("gradcam", lambda: (cam_overlays(models, data_cfg, images), 1)[1], unit="studies"),
        Variant("figures", lambda: (study_figures(study, hu_by_sop, models, data_cfg, top_k=args.top), 1)[1],
                unit="studies"),
        Variant("render", lambda: (render_report(result, study, figures), 1)[1], unit="studies"),
    ]
    results = run_interleaved(variants, args.repeats)
    base = results["inference"]["median_seconds"]
    rows = [(name, f"{r['median_seconds']:.3f}", f"{r['median_seconds'] / base:.2f}",
             f"{min(r['seconds']):.3f}-{max(r['seconds']):.3f}") for name, r in results.items()]
    print(f"\n{args.arch} at {args.size} px, {args.folds} members, top {args.top} of {len(ordered)} slices, "
          f"{torch.get_num_threads()} torch threads")
    print(table(["variant", "median s/study", "x inference", "min-max s"], rows))
    return {"machine": machine_info(), "args": vars(args) | {"json": str(args.json)}, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--folds", type=int, default=5, help="members (models x folds) explained")
    parser.add_argument("--top", type=int, default=3, help="top slices per study")
    parser.add_argument("--slices", type=int, default=30, help="slices of the study")
    add_common_args(parser, repeats=5)
    args = parser.parse_args()
    print(format_machine(machine_info()))
    save_json(args.json, run(args))


if __name__ == "__main__":
    main()
