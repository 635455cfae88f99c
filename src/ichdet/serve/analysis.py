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


def _top_slice_images(study_dir: Path, study: dict[str, Any], k: int = 3) -> list[np.ndarray]:
    """Brain-window RGB images of the ``k`` slices most likely to bleed ("any"), for the SC series.

    These are plain windowed slices: Grad-CAM overlays (ichdet.gradcam) replace them where the
    integrator wires them in; the secondary captures are marked not for diagnosis either way.
    """
    from ichdet.dicom import read_hu
    from ichdet.windowing import apply_windows, resolve_windows

    slices = [(s.get("probabilities", {}).get("any", 0.0), s) for series in study.get("series", [])
              for s in series.get("slices", [])]
    top = sorted(slices, key=lambda item: -float(item[0]))[:k]
    images = []
    for _, item in top:
        path = study_dir / f"{item.get('sop_uid')}.dcm"  # the spool names every instance by its SOP UID
        if path.is_file():
            brain = apply_windows(read_hu(path), resolve_windows(["brain"]))[..., 0]
            images.append(np.repeat(brain[..., None], 3, axis=2))
    return images


def analyse_study(study_dir: Path, ensemble: Any, out_dir: Path, *, tta: bool = True,
                  device: str = "auto") -> AnalysisResult:
    """Run ``predict_study`` on one study's folder, write ``result.json`` and the DICOM results into ``out_dir``.

    The spool holds one study per folder, so the result has one study; every DICOM file returned is
    inside ``out_dir``.
    """
    from ichdet.dicom_out import write_dicom_results
    from ichdet.study import predict_study

    prediction = predict_study(study_dir, ensemble, tta=tta, device=device)
    result = prediction.result
    json_path = write_json_atomic(out_dir / "result.json", result)
    source_files = sorted(p for p in study_dir.iterdir() if p.is_file())
    dicom_files: list[Path] = []
    for study in result["studies"]:
        overlays = _top_slice_images(study_dir, study)
        dicom_files += write_dicom_results(study, source_files, overlays, out_dir / "dicom")
    return AnalysisResult(json_path, dicom_files)


def bundle_analyser(bundle: Path, *, tta: bool = True, device: str = "auto") -> Analyser:
    """Load (and verify) the bundle once; return the analyser the worker calls for every study."""
    from ichdet.bundle import load_ensemble

    ensemble = load_ensemble(bundle)

    def analyse(study_dir: Path, out_dir: Path) -> AnalysisResult:
        return analyse_study(study_dir, ensemble, out_dir, tta=tta, device=device)
    return analyse
