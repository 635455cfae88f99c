"""One completed study -> result JSON + DICOM results, through the study pipeline's public functions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichdet.io import write_json_atomic

__all__ = ["Analyser", "AnalysisResult", "analyse_study", "bundle_analyser"]


@dataclass(frozen=True)
class AnalysisResult:
    """What one analysis wrote: the JSON result and the DICOM files (SR + secondary captures) to send."""

    json_path: Path
    dicom_files: list[Path]


#: The worker's view of an analysis: (folder of one study's instances, empty output folder) -> result.
Analyser = Callable[[Path, Path], AnalysisResult]


def _overlays(prediction: Any, study: dict[str, Any], ensemble: Any, device: str,
              top_k: int) -> tuple[list[np.ndarray], list[str]]:
    """Grad-CAM overlays (brain window) of the study's ``top_k`` slices, and the SOP UIDs they show.

    The CAM is the mean over the folds of the ensemble's first 2D member (ichdet.gradcam); the secondary
    captures made of them are marked not for diagnosis by ichdet.dicom_out.
    """
    import torch

    from ichdet.gradcam import study_figures

    members = [m for m in ensemble.members if m.kind == "2d"]
    if not members:
        return [], []
    use_gpu = device != "cpu" and torch.cuda.is_available()
    dev = torch.device(("cuda" if device == "auto" else device) if use_gpu else "cpu")
    models = members[0].load_models(dev)
    hu_by_sop = {s.sop_uid: s.hu() for s in prediction.slices(study["study_uid"])}
    figures = study_figures(study, hu_by_sop, models, members[0].config.data, top_k=top_k, device=dev)
    return [f.overlays["brain"] for f in figures.slices], [f.sop_uid for f in figures.slices]


def analyse_study(study_dir: Path, ensemble: Any, out_dir: Path, *, tta: bool = True,
                  device: str = "auto", top_k: int = 3) -> AnalysisResult:
    """Run ``predict_study`` on one study's folder, write ``result.json`` and the DICOM results into ``out_dir``.

    The result's DICOM objects are an SR of the findings and one secondary capture per top slice (Grad-CAM
    overlay), in the source study; every file returned is inside ``out_dir``. The spool holds one study
    per folder, so the result normally has one study.
    """
    from ichdet.dicom_out import write_dicom_results
    from ichdet.study import predict_study

    prediction = predict_study(study_dir, ensemble, tta=tta, device=device)
    result = prediction.result
    json_path = write_json_atomic(out_dir / "result.json", result)
    dicom_files: list[Path] = []
    for study in result["studies"]:
        source_files = [s.path for s in prediction.slices(study["study_uid"])]  # the analysed slices
        overlays, shown = _overlays(prediction, study, ensemble, device, top_k)
        dicom_files += write_dicom_results(study, source_files, overlays, out_dir / "dicom", overlay_sources=shown)
    return AnalysisResult(json_path, dicom_files)


def bundle_analyser(bundle: Path, *, tta: bool = True, device: str = "auto") -> Analyser:
    """Load (and verify) the bundle once; return the analyser the worker calls for every study."""
    from ichdet.bundle import load_ensemble

    ensemble = load_ensemble(bundle)

    def analyse(study_dir: Path, out_dir: Path) -> AnalysisResult:
        return analyse_study(study_dir, ensemble, out_dir, tta=tta, device=device)
    return analyse
