"""A study prediction's outputs besides the JSON: Grad-CAM figures, the HTML report and the DICOM results.

One place for the steps that ``ichdet report``, ``ichdet predict-study --dicom-out`` and the DICOM node
(:mod:`ichdet.serve.analysis`) share, so the three make the same figures and the same DICOM objects
from a :class:`ichdet.study.predict.StudyPrediction`:

- :func:`prediction_figures`: per analysed study, its top slices in the report's windows with the
  Grad-CAM of the ensemble's CNNs: every fold of every 2D member and of every sequence member's base
  runs (a sequence model reads embeddings, not pixels: its base runs' CNNs explain it), those sharing
  the first one's input settings;
- :func:`check_dicom_out`: before any work, refuse a folder whose analysed slices cannot be referred to
  (RSNA-style ``ID_...`` UIDs, no SOP Class UID);
- :func:`write_prediction_dicom`: per analysed study, one secondary capture per top slice (its overlay in
  the brain window), a Key Object Selection of those slices and a TID 1500 SR, in the source study
  (:mod:`ichdet.study.dicom_out`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ichdet.infer.bundle import Ensemble, Member
from ichdet.study.html import ReportFigures
from ichdet.study.predict import StudyPrediction
from ichdet.study.scan import StudySlice, scan_folder

__all__ = ["SC_WINDOW", "cam_members", "cam_sources", "check_dicom_out", "prediction_figures", "write_prediction_dicom"]

#: The window of the overlay each secondary capture shows (one capture per top slice).
SC_WINDOW = "brain"


class _LazyHU(Mapping[str, np.ndarray]):
    """SOP Instance UID -> HU slice, read from the file on first use (Grad-CAM needs only a few slices)."""

    def __init__(self, slices: list[StudySlice]) -> None:
        self._slices = {s.sop_uid: s for s in slices}
        self._read: dict[str, np.ndarray] = {}

    def __getitem__(self, sop_uid: str) -> np.ndarray:
        if sop_uid not in self._read:
            self._read[sop_uid] = self._slices[sop_uid].hu()
        return self._read[sop_uid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._slices)

    def __len__(self) -> int:
        return len(self._slices)


def cam_members(ensemble: Ensemble) -> list[Member]:
    """The 2D runs whose Grad-CAM is averaged: the 2D members and the sequence members' base runs (each
    run once, in member order), those with the first one's input settings.

    Runs that window, size or stack slices differently see another input, so their maps cannot be
    averaged pixel for pixel with the first one's.
    """
    runs: dict[str, Member] = {}
    for member in ensemble.members:
        for run in member.image_members():
            runs.setdefault(run.name, run)
    first = next(iter(runs.values()), None)
    return [m for m in runs.values() if first is not None and m.run_config.data == first.run_config.data]


def cam_sources(ensemble: Ensemble, runs: list[Member]) -> tuple[str, ...]:
    """What each of ``runs`` is to the ensemble, for the report: "a (2D member)", "b (base run of seq)"."""
    out = []
    for run in runs:
        roles = ["2D member" for m in ensemble.members if m.kind == "2d" and m.name == run.name]
        roles += [f"base run of sequence member {m.name}" for m in ensemble.members
                  if m.kind == "seq" and run.name in {b.name for b in m.bases}]
        out.append(f"{run.name} ({', '.join(roles)})")
    return tuple(out)


def _analysed(prediction: StudyPrediction) -> list[dict[str, Any]]:
    return [s for s in prediction.result["studies"] if s["summary"]["analysed"]]


def prediction_figures(prediction: StudyPrediction, top_k: int = 3) -> dict[str, ReportFigures]:
    """Study Instance UID -> the report figures of each analysed study (:func:`ichdet.study.gradcam.study_figures`).

    The networks (:func:`cam_members`) are loaded once, on the device the prediction ran on; the figures
    name them (``cam_models``).
    """
    from ichdet.study.gradcam import study_figures

    members = cam_members(prediction.ensemble)
    if not members:
        return {s["study_instance_uid"]: ReportFigures() for s in _analysed(prediction)}
    device = torch.device(prediction.result["settings"]["device"])
    models = [model for m in members for model in m.load_models(device)]
    data_cfg = members[0].run_config.data
    sources = cam_sources(prediction.ensemble, members)
    return {s["study_instance_uid"]: replace(study_figures(s, _LazyHU(prediction.slices(s["study_instance_uid"])),
                                                           models, data_cfg, top_k=top_k, device=device),
                                             cam_models=sources)
            for s in _analysed(prediction)}


def check_dicom_out(path: Path) -> None:
    """IchdetError naming the file and the fix unless every slice ``predict-study`` would analyse under
    ``path`` can be referred to by DICOM results (:func:`ichdet.study.dicom_out.check_dicom_ready`). Headers only."""
    from ichdet.study.dicom_out import check_dicom_ready

    for study in scan_folder(path).studies:
        files = [ref.path for series in study.selected for ref in series.slices]
        if files:
            check_dicom_ready(files)


def write_prediction_dicom(prediction: StudyPrediction, figures: Mapping[str, ReportFigures], out_dir: Path,
                           include_phi: bool = False) -> list[Path]:
    """Write every analysed study's secondary captures, key object selection and SR into ``out_dir``;
    return the files written.

    Each top slice of ``figures`` becomes one secondary capture (its :data:`SC_WINDOW` overlay) whose
    Source Image Sequence names the slice; the key object selection names the same slices. File names are
    new SOP Instance UIDs (no patient value).
    """
    from ichdet.study.dicom_out import write_dicom_results

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for study in _analysed(prediction):
        uid = study["study_instance_uid"]
        shown = figures.get(uid, ReportFigures()).slices
        written += write_dicom_results(study, prediction.result["model"], [s.path for s in prediction.slices(uid)],
                                       [f.overlays[SC_WINDOW] for f in shown], out_dir, include_phi=include_phi,
                                       overlay_sources=[f.sop_uid for f in shown])
    return written
