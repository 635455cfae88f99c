"""One study folder's selected series -> ensemble predictions -> the result JSON.

:func:`ichdet.study.scan.scan_folder` reads only headers (``stop_before_pixels``) of every file under a folder as a PACS
export leaves it (nested folders, any file names, several studies, non-image objects, files that are
not DICOM), groups them into studies and series, selects the axial head-CT series
(:func:`ichdet.dicom.series.series_reason` says why another is skipped) and orders their slices along the
slice normal (:func:`ichdet.dicom.series.order_series`).
:func:`predict_study` then reads the selected slices' pixels (HU through :func:`ichdet.dicom.read.read_hu`),
stores them as the preprocessor does (:func:`ichdet.cache.writer.hu_to_store`) in an in-memory
:class:`~ichdet.cache.store.PixelCache` and runs the ensemble through the same dataset, engine, member path
(:func:`ichdet.infer.predict.ensemble_probs`: 2D and sequence members, each selected series one sequence) and
ensemble rule as ``ichdet predict``; :mod:`ichdet.study.result` turns that into the result JSON
(docs/study-result.md). Nothing under the folder is modified.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ichdet.cache.store import PixelCache
from ichdet.cache.writer import hu_to_store
from ichdet.dicom.series import MIN_SLICES
from ichdet.errors import IchdetError
from ichdet.infer.bundle import Ensemble, Member
from ichdet.infer.predict import ensemble_probs
from ichdet.models.engine import init_runtime
from ichdet.models.inputs import SliceDataset
from ichdet.names import LABELS
from ichdet.study.result import build_result
from ichdet.study.scan import StudyScan, StudySlice, scan_folder

__all__ = ["MemoryCache", "StudyPrediction", "predict_study", "stored_stack"]

# --------------------------------------------------------------------------------------------- pixels


class MemoryCache(PixelCache):
    """A :class:`PixelCache` over an in-memory stack of stored slices (one study's selected series).

    Same reading interface (``index`` with image_id/prev_id/next_id/series_uid/slice_index/LABELS,
    ``rows_of``, ``view_row``), so :class:`ichdet.models.inputs.SliceDataset` windows, resizes and stacks
    neighbours exactly as in training, and a sequence member reads each series in slice order.
    """

    def __init__(self, stack: np.ndarray, series: Sequence[int]) -> None:
        """``stack``: int16 (N, size, size) from :func:`ichdet.cache.writer.hu_to_store`; ``series``: per row, its
        series number in this stack (rows of one series are consecutive, in slice order)."""
        self.root = Path("<memory>")
        self.settings = {"size": int(stack.shape[1])}
        ids = [f"s{s}_{i}" for i, s in enumerate(series)]
        same_prev = [i > 0 and series[i - 1] == series[i] for i in range(len(ids))]
        same_next = [i + 1 < len(ids) and series[i + 1] == series[i] for i in range(len(ids))]
        # series_uid, slice_index: the series and slice order a sequence member reads (models.sequence.series_rows)
        slice_index = [0] * len(ids)
        for i in range(1, len(ids)):
            slice_index[i] = slice_index[i - 1] + 1 if same_prev[i] else 0
        index = pd.DataFrame({"image_id": ids,
                              "prev_id": [ids[i - 1] if p else None for i, p in enumerate(same_prev)],
                              "next_id": [ids[i + 1] if n else None for i, n in enumerate(same_next)],
                              "series_uid": [f"s{s}" for s in series],
                              "slice_index": np.array(slice_index, np.int32)})
        for name in LABELS:
            index[name] = np.nan
        self.index = index
        self._position = pd.Index(index["image_id"])
        self._stack = stack
        self._maps = {}

    def view_row(self, row: int) -> np.ndarray:
        """The stored int16 HU image of row ``row``."""
        return self._stack[row]


def stored_stack(hu_slices: Sequence[np.ndarray], size: int) -> np.ndarray:
    """HU slices stored as the preprocessor stores them (:func:`ichdet.cache.writer.hu_to_store`) at ``size``."""
    out = np.empty((len(hu_slices), size, size), np.int16)
    for hu, dst in zip(hu_slices, out, strict=True):
        hu_to_store(hu, size, dst)
    return out


# --------------------------------------------------------------------------------------------- predict


class StudyPrediction:
    """The result of :func:`predict_study`: ``result`` (the JSON dict) and access to the analysed slices."""

    def __init__(self, result: dict[str, Any], slices: list[StudySlice], hu: list[np.ndarray],
                 series_of_row: list[int], ensemble: Ensemble) -> None:
        self.result = result
        self._slices = slices
        self._hu = hu
        self.series_of_row = series_of_row
        self.ensemble = ensemble
        self._caches: dict[int, MemoryCache] = {}

    def slices(self, study_uid: str) -> list[StudySlice]:
        """The analysed slices of one study: series by series, each in slice order."""
        found = [s for s in self._slices if s.study_uid == study_uid]
        if not found:
            raise KeyError(f"study {study_uid!r} has no analysed slices")
        return found

    def cache(self, size: int) -> MemoryCache:
        """Every analysed slice stored at ``size`` pixels, as the model input is built from it."""
        if size not in self._caches:
            self._caches[size] = MemoryCache(stored_stack(self._hu, size), self.series_of_row)
        return self._caches[size]

    def model_input(self, item: StudySlice, member: Member) -> torch.Tensor:
        """The uint8 (C, H, W) input a 2D ``member`` sees for one slice (windows, size, neighbours), before
        normalisation (:class:`ichdet.models.engine.Normalizer` on the device does that). A sequence member's
        images go through its bases: pass one of ``member.bases``."""
        data = member.run_config.data
        ds = SliceDataset(self.cache(data.image_size), [item.row], data)
        return ds[0][0]


def _members_probs(members: Sequence[Member], prediction: StudyPrediction, tta: bool,
                   device: torch.device) -> list[np.ndarray]:
    """Fold-mean (N, 6) probabilities of each member (2D or sequence) over every analysed slice, in one
    call of the path ``ichdet predict`` takes (each network sees the slices stored at its own image size,
    each CNN fold runs once for all the members that read it; a sequence member reads each selected
    series, in slice order, as one sequence)."""
    found = ensemble_probs(members, prediction.cache, device, tta, num_workers=0)  # in memory: no loader workers
    return [probs.astype(np.float64).mean(axis=0) for probs in found]


def _no_usable_series(scan: StudyScan) -> IchdetError:
    reasons = sorted({s.reason or "" for st in scan.studies for s in st.series})
    found = f"{len(scan.studies)} studies, {sum(len(st.series) for st in scan.studies)} series"
    why = f"; skipped because: {'; '.join(reasons[:5])}" if reasons else ""
    return IchdetError(f"{scan.root}: no usable axial CT series ({scan.n_files} files, {found}, "
                       f"{len(scan.skipped_files)} unreadable{why}). Pass the folder of a head CT export")


def predict_study(path: Path, ensemble: Ensemble, tta: bool = True, device: str = "auto",
                  include_phi: bool = False, min_slices: int = MIN_SLICES) -> StudyPrediction:
    """Scan ``path``, predict every selected series of every study with ``ensemble``, build the result.

    Raises IchdetError (exit 2 on the command line) when no study has a usable axial CT series.
    """
    start = time.perf_counter()
    scan = scan_folder(path, min_slices)
    scanned = time.perf_counter()
    slices: list[StudySlice] = []
    series_of_row: list[int] = []
    selected = [(study, series) for study in scan.studies for series in study.selected]
    for number, (study, series) in enumerate(selected):
        for i, ref in enumerate(series.slices):
            slices.append(StudySlice(study.study_uid, series.series_uid, i, ref.sop_uid, ref.path,
                                     ref.position_mm, len(slices), ref.instance_number))
            series_of_row.append(number)
    if not slices:
        raise _no_usable_series(scan)
    hu = [s.hu() for s in slices]
    read = time.perf_counter()
    rt = init_runtime(device)
    prediction = StudyPrediction({}, slices, hu, series_of_row, ensemble)
    probs = ensemble.combine(_members_probs(ensemble.members, prediction, tta, rt.device))
    inferred = time.perf_counter()
    timings = {"read_headers_and_order": scanned - start, "read_pixels": read - scanned,
               "inference": inferred - read}
    prediction.result.update(build_result(scan, slices, probs, ensemble, timings,
                                          {"tta": tta, "device": str(rt.device), "min_slices": min_slices},
                                          include_phi))
    return prediction
