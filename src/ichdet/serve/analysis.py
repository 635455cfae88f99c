"""One completed study -> result JSON + DICOM results, through the study pipeline's public functions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ichdet.io import write_json_atomic

__all__ = ["Analyser", "AnalysisResult", "analyse_study", "bundle_analyser"]


@dataclass(frozen=True)
class AnalysisResult:
    """What one analysis wrote: the JSON result and the DICOM files (SR + secondary captures) to send."""

    json_path: Path
    dicom_files: list[Path]


#: The worker's view of an analysis: (folder of one study's instances, empty output folder) -> result.
Analyser = Callable[[Path, Path], AnalysisResult]


def analyse_study(study_dir: Path, ensemble: Any, out_dir: Path, *, tta: bool = True,
                  device: str = "auto", top_k: int = 3) -> AnalysisResult:
    """Run ``predict_study`` on one study's folder, write ``result.json`` and the DICOM results into ``out_dir``.

    The result's DICOM objects are an SR of the findings and one secondary capture per top slice (Grad-CAM
    overlay), in the source study, made as ``ichdet predict-study --dicom-out`` makes them
    (:mod:`ichdet.study.outputs`); every file returned is inside ``out_dir``. The spool holds one study
    per folder, so the result normally has one study.
    """
    from ichdet.study.outputs import prediction_figures, write_prediction_dicom
    from ichdet.study.predict import predict_study

    prediction = predict_study(study_dir, ensemble, tta=tta, device=device)
    json_path = write_json_atomic(out_dir / "result.json", prediction.result)
    figures = prediction_figures(prediction, top_k=top_k)
    return AnalysisResult(json_path, write_prediction_dicom(prediction, figures, out_dir / "dicom"))


def bundle_analyser(bundle: Path, *, tta: bool = True, device: str = "auto") -> Analyser:
    """Load (and verify) the bundle once; return the analyser the worker calls for every study."""
    from ichdet.infer.bundle import load_ensemble

    ensemble = load_ensemble(bundle)

    def analyse(study_dir: Path, out_dir: Path) -> AnalysisResult:
        return analyse_study(study_dir, ensemble, out_dir, tta=tta, device=device)
    return analyse
