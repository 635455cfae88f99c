"""Any DICOM folder -> studies -> selected axial CT series in slice order -> ensemble predictions.

:func:`scan_folder` reads only headers (``stop_before_pixels``) of every file under a folder as a PACS
export leaves it (nested folders, any file names, several studies, non-image objects, files that are
not DICOM), groups them into studies and series, selects the axial head-CT series (:func:`series_reason`
says why another is skipped) and orders their slices along the slice normal (:func:`order_series`).
:func:`predict_study` then reads the selected slices' pixels (HU through :func:`ichdet.dicom.read_hu`),
stores them as the preprocessor does (:func:`ichdet.cache.hu_to_store`) in an in-memory
:class:`~ichdet.store.PixelCache` and runs the ensemble through the same dataset, engine and ensemble
rule as ``ichdet predict``; :mod:`ichdet.study_result` turns that into the result JSON
(docs/study-result.md). Nothing under the folder is modified.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydicom.dataset import Dataset

from ichdet.bundle import Ensemble, Member
from ichdet.dicom import read_header, read_hu
from ichdet.errors import DicomError, IchdetError
from ichdet.index import list_dicom_files
from ichdet.labels import LABELS
from ichdet.store import PixelCache

__all__ = ["MIN_SLICES", "SliceHeader", "SliceRef", "StudyPrediction", "StudyScan", "order_series",
           "predict_study", "scan_folder", "series_reason"]

#: Fewest distinct slice positions for a series to be analysed.
MIN_SLICES = 5
#: Largest angle (degrees) between the slice normal and the patient's head-foot axis: gantry tilts pass,
#: sagittal and coronal series do not.
MAX_TILT_DEG = 35.0
_POSITION_TOL_MM = 0.01  # two slices closer than this along the normal are at the same position
_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_NON_IMAGE = {"1.2.840.10008.5.1.4.1.1.88.": "structured report", "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
              "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document", "1.2.840.10008.5.1.4.1.1.66": "raw/registration"}
#: Header keywords that identify the patient: kept out of every output unless --include-phi.
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                "InstitutionAddress", "InstitutionalDepartmentName")


# --------------------------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class SliceHeader:
    """What series selection and ordering need from one file's header."""

    path: Path
    sop_uid: str
    sop_class: str
    modality: str
    study_uid: str
    series_uid: str
    series_number: int | None
    description: str
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    spacing: tuple[float, ...] | None
    rows: int
    cols: int
    frames: int
    instance_number: int | None
    phi: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


def _numbers(ds: Dataset, keyword: str, count: int, path: Path) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise DicomError(path, f"malformed {keyword} {value!r}: expected {count} numbers") from None
    if len(numbers) != count or not all(map(math.isfinite, numbers)):
        raise DicomError(path, f"malformed {keyword} {value!r}: expected {count} finite numbers")
    return numbers


def _integer(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def header_from_dataset(ds: Dataset, path: Path) -> SliceHeader:
    """The :class:`SliceHeader` of a header read from ``path``; DicomError on malformed geometry."""
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
    sop_uid = str(ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta else "") or "")
    if not sop_uid:
        raise DicomError(path, "no SOP Instance UID (0008,0018): the file cannot be identified")
    image_type = tuple(str(v).strip().upper() for v in (ds.get("ImageType") or ()))
    return SliceHeader(
        path=path, sop_uid=sop_uid.strip(), sop_class=sop_class.strip(),
        modality=str(ds.get("Modality") or "").strip().upper(),
        study_uid=str(ds.get("StudyInstanceUID") or "").strip(),
        series_uid=str(ds.get("SeriesInstanceUID") or "").strip(),
        series_number=_integer(ds, "SeriesNumber"), description=str(ds.get("SeriesDescription") or "").strip(),
        image_type=image_type, orientation=_numbers(ds, "ImageOrientationPatient", 6, path),
        position=_numbers(ds, "ImagePositionPatient", 3, path), spacing=_numbers(ds, "PixelSpacing", 2, path),
        rows=_integer(ds, "Rows") or 0, cols=_integer(ds, "Columns") or 0,
        frames=_integer(ds, "NumberOfFrames") or 1, instance_number=_integer(ds, "InstanceNumber"),
        phi={k: str(ds.get(k) or "") for k in PHI_KEYWORDS},
    )


# --------------------------------------------------------------------------------------------- selection


def _sop_kind(sop_class: str) -> str | None:
    for prefix, kind in _NON_IMAGE.items():
        if sop_class.startswith(prefix):
            return kind
    return None


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The unit normal of a slice: row direction x column direction (ImageOrientationPatient)."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    return n / max(float(np.linalg.norm(n)), 1e-12)


def series_reason(headers: Sequence[SliceHeader], min_slices: int = MIN_SLICES) -> str | None:
    """Why a series is not analysed (one line), or None when it is an axial CT image series.

    Checks in order: image storage (no SR, presentation state, document), not a secondary capture,
    Modality CT, single-frame CT Image Storage, not a localizer/scout, ORIGINAL and PRIMARY ImageType
    (where present: the RSNA files have none), position and orientation present, one orientation,
    near axial, one pixel size and matrix, at least ``min_slices`` distinct positions.
    """
    first = headers[0]
    kind = _sop_kind(first.sop_class)
    if kind or any(h.rows <= 0 for h in headers):
        return f"not an image ({kind or 'no Rows/Columns'}; SOP class {first.sop_class or 'absent'})"
    if first.sop_class.startswith(_SECONDARY_CAPTURE):
        return f"secondary capture (SOP class {first.sop_class}): screenshots are not analysed"
    if {h.modality for h in headers} != {"CT"}:
        return f"modality {'/'.join(sorted({h.modality or 'absent' for h in headers}))}, not CT"
    if any(h.sop_class not in ("", _CT_IMAGE) or h.frames > 1 for h in headers):
        return f"SOP class {first.sop_class} / {first.frames} frames: only single-frame CT Image Storage is analysed"
    types = sorted({h.image_type for h in headers})
    shown = "/".join("\\".join(t) for t in types)
    if any({"LOCALIZER", "SCOUT", "TOPOGRAM"} & set(t) for t in types):
        return f"localizer/scout (ImageType {shown})"
    if any(t and (t[0] != "ORIGINAL" or (len(t) > 1 and t[1] != "PRIMARY")) for t in types):
        return f"derived or secondary image (ImageType {shown}): reformats and derived images are not analysed"
    if any(h.position is None or h.orientation is None for h in headers):
        return "no ImagePositionPatient/ImageOrientationPatient: the slices cannot be ordered"
    orientations = np.array([h.orientation for h in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        return "ImageOrientationPatient differs between slices: not one stack of slices"
    tilt = math.degrees(math.acos(min(1.0, abs(float(slice_normal(orientations[0])[2])))))
    if tilt > MAX_TILT_DEG:
        return f"not axial: the slice normal is {tilt:.0f} degrees from the head-foot axis (sagittal/coronal?)"
    if len({(h.rows, h.cols) for h in headers}) > 1:
        return "Rows/Columns differ between slices"
    spacings = np.array([h.spacing or (math.nan, math.nan) for h in headers])
    if np.isnan(spacings).any() or np.abs(spacings - spacings[0]).max() > 1e-3 * spacings[0].max():
        return "PixelSpacing missing or different between slices"
    n = len(order_series(headers)[0])
    if n < min_slices:
        return f"too short: {n} distinct slice positions, at least {min_slices} needed"
    return None


@dataclass(frozen=True)
class SliceRef:
    """One selected slice: its file, SOP Instance UID, position along the normal (mm), InstanceNumber."""

    path: Path
    sop_uid: str
    position_mm: float
    instance_number: int | None


@dataclass(frozen=True)
class Duplicate:
    """A file left out because another slice of its series has its position or its SOP Instance UID."""

    path: Path
    sop_uid: str
    kept_sop_uid: str
    position_mm: float


def order_series(headers: Sequence[SliceHeader]) -> tuple[list[SliceRef], list[Duplicate]]:
    """Slices ordered along the slice normal (foot to head for an axial series), and the duplicates.

    The position along the normal is ImagePositionPatient projected on ImageOrientationPatient's row x
    column direction, so a tilted gantry orders right where the z coordinate alone may not. Ties
    (same position within 0.01 mm) and repeated SOP Instance UIDs keep the first by (InstanceNumber,
    SOP Instance UID); the others are reported.
    """
    normal = slice_normal(headers[0].orientation or (1, 0, 0, 0, 1, 0))
    keyed = sorted(((float(np.dot(h.position or (0, 0, 0), normal)), h) for h in headers),
                   key=lambda ph: (ph[0], ph[1].instance_number if ph[1].instance_number is not None else 1 << 31,
                                   ph[1].sop_uid, str(ph[1].path)))
    kept: list[SliceRef] = []
    duplicates: list[Duplicate] = []
    seen: dict[str, str] = {}
    for pos, h in keyed:
        if h.sop_uid in seen:
            duplicates.append(Duplicate(h.path, h.sop_uid, h.sop_uid, pos))
        elif kept and pos - kept[-1].position_mm < _POSITION_TOL_MM:
            duplicates.append(Duplicate(h.path, h.sop_uid, kept[-1].sop_uid, pos))
        else:
            kept.append(SliceRef(h.path, h.sop_uid, pos, h.instance_number))
        seen.setdefault(h.sop_uid, h.sop_uid)
    return kept, duplicates


# --------------------------------------------------------------------------------------------- scan


@dataclass(frozen=True)
class SeriesScan:
    """One series of a study: selected (``reason`` None, ``slices`` in order) or skipped with ``reason``."""

    series_uid: str
    series_number: int | None
    description: str
    modality: str
    n_files: int
    reason: str | None
    slices: tuple[SliceRef, ...] = ()
    duplicates: tuple[Duplicate, ...] = ()

    @property
    def selected(self) -> bool:
        """Whether the series is analysed."""
        return self.reason is None


@dataclass(frozen=True)
class StudyEntry:
    """One study: its series (selected and skipped) and, for ``--include-phi`` only, the patient fields."""

    study_uid: str
    series: tuple[SeriesScan, ...]
    patient: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def selected(self) -> list[SeriesScan]:
        """The series that are analysed."""
        return [s for s in self.series if s.selected]


@dataclass(frozen=True)
class SkippedFile:
    """A file under the folder that is not DICOM or whose header cannot be used; path relative to the root."""

    path: str
    reason: str


@dataclass(frozen=True)
class StudyScan:
    """Everything found under a folder: studies with their series, and the files skipped with reasons."""

    root: Path
    studies: tuple[StudyEntry, ...]
    skipped_files: tuple[SkippedFile, ...]
    n_files: int

    def study(self, study_uid: str) -> StudyEntry:
        """The study of ``study_uid``; KeyError naming it if absent."""
        for s in self.studies:
            if s.study_uid == study_uid:
                return s
        raise KeyError(f"study {study_uid!r} is not in the scan of {self.root}")


def _series_scan(headers: list[SliceHeader], min_slices: int) -> SeriesScan:
    reason = series_reason(headers, min_slices)
    first = headers[0]
    slices, duplicates = order_series(headers) if reason is None else ([], [])
    return SeriesScan(first.series_uid, first.series_number, first.description, first.modality, len(headers),
                      reason, tuple(slices), tuple(duplicates))


def scan_folder(path: Path, min_slices: int = MIN_SLICES) -> StudyScan:
    """Read every header under ``path`` (recursively, any file name) into studies and series.

    Series are selected or skipped (with the reason) by :func:`series_reason`, selected ones ordered by
    :func:`order_series`. Files that are not DICOM, or whose header is unusable, are listed with the
    reason; nothing is read past the header and nothing under ``path`` is written.
    """
    root = Path(path)
    files = list_dicom_files(root)
    skipped: list[SkippedFile] = []
    groups: dict[str, dict[str, list[SliceHeader]]] = defaultdict(lambda: defaultdict(list))
    for file in files:
        rel = file.relative_to(root).as_posix()
        try:
            h = header_from_dataset(read_header(file), file)
        except DicomError as err:
            skipped.append(SkippedFile(rel, err.reason))
            continue
        if not h.study_uid or not h.series_uid:
            skipped.append(SkippedFile(rel, "no Study/Series Instance UID: cannot be grouped into a series"))
            continue
        groups[h.study_uid][h.series_uid].append(h)
    studies = []
    for study_uid in sorted(groups):
        series = [_series_scan(groups[study_uid][uid], min_slices) for uid in groups[study_uid]]
        series.sort(key=lambda s: (s.series_number if s.series_number is not None else 1 << 31, s.series_uid))
        first = next(iter(groups[study_uid].values()))[0]
        studies.append(StudyEntry(study_uid, tuple(series), dict(first.phi)))
    return StudyScan(root, tuple(studies), tuple(skipped), len(files))


# --------------------------------------------------------------------------------------------- pixels


class MemoryCache(PixelCache):
    """A :class:`PixelCache` over an in-memory stack of stored slices (one study's selected series).

    Same reading interface (``index`` with image_id/prev_id/next_id/LABELS, ``rows_of``, ``view_row``),
    so :class:`ichdet.data.SliceDataset` windows, resizes and stacks neighbours exactly as in training.
    """

    def __init__(self, stack: np.ndarray, series: Sequence[int]) -> None:
        """``stack``: int16 (N, size, size) from :func:`ichdet.cache.hu_to_store`; ``series``: per row, its
        series number in this stack (rows of one series are consecutive, in slice order)."""
        self.root = Path("<memory>")
        self.settings = {"size": int(stack.shape[1])}
        ids = [f"s{s}_{i}" for i, s in enumerate(series)]
        same_prev = [i > 0 and series[i - 1] == series[i] for i in range(len(ids))]
        same_next = [i + 1 < len(ids) and series[i + 1] == series[i] for i in range(len(ids))]
        index = pd.DataFrame({"image_id": ids,
                              "prev_id": [ids[i - 1] if p else None for i, p in enumerate(same_prev)],
                              "next_id": [ids[i + 1] if n else None for i, n in enumerate(same_next)]})
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
    """HU slices stored as the preprocessor stores them (:func:`ichdet.cache.hu_to_store`) at ``size``."""
    from ichdet.cache import hu_to_store

    out = np.empty((len(hu_slices), size, size), np.int16)
    for hu, dst in zip(hu_slices, out, strict=True):
        hu_to_store(hu, size, dst)
    return out


# --------------------------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class StudySlice:
    """One analysed slice: study, series, place in the series order, file and SOP Instance UID."""

    study_uid: str
    series_uid: str
    index: int
    sop_uid: str
    path: Path
    position_mm: float
    row: int  # row in the prediction's in-memory stack

    def hu(self) -> np.ndarray:
        """The slice's pixels in HU, float32 (H, W), as :func:`ichdet.dicom.read_hu` reads them."""
        return read_hu(self.path)


class StudyPrediction:
    """The result of :func:`predict_study`: ``result`` (the JSON dict) and access to the analysed slices."""

    def __init__(self, result: dict[str, Any], slices: list[StudySlice], hu: list[np.ndarray],
                 series_of_row: list[int], ensemble: Ensemble) -> None:
        self.result = result
        self._slices = slices
        self._hu = hu
        self._series_of_row = series_of_row
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
            self._caches[size] = MemoryCache(stored_stack(self._hu, size), self._series_of_row)
        return self._caches[size]

    def model_input(self, item: StudySlice, member: Member) -> torch.Tensor:
        """The uint8 (C, H, W) input ``member`` sees for one slice (windows, size, neighbours), before
        normalisation (:class:`ichdet.engine.Normalizer` on the device does that)."""
        from ichdet.data import SliceDataset

        ds = SliceDataset(self.cache(member.config.data.image_size), [item.row], member.config.data)
        return ds[0][0]


def _member_probs(member: Member, cache: MemoryCache, tta: bool, device: torch.device) -> np.ndarray:
    """Fold-mean (N, 6) probabilities of one member over every row of ``cache``, as ``ichdet predict``."""
    from ichdet.predict import member_probs

    rows, probs = member_probs(member, cache, device, tta, num_workers=0)  # in memory: no loader workers
    out = np.empty((len(cache), len(LABELS)), np.float64)
    out[rows] = probs.astype(np.float64).mean(axis=0)
    return out


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
    from ichdet.engine import init_runtime
    from ichdet.study_result import build_result

    start = time.perf_counter()
    scan = scan_folder(path, min_slices)
    scanned = time.perf_counter()
    slices: list[StudySlice] = []
    series_of_row: list[int] = []
    for study in scan.studies:
        for series in study.selected:
            number = len({(s.study_uid, s.series_uid) for s in slices})
            for i, ref in enumerate(series.slices):
                slices.append(StudySlice(study.study_uid, series.series_uid, i, ref.sop_uid, ref.path,
                                         ref.position_mm, len(slices)))
                series_of_row.append(number)
    if not slices:
        raise _no_usable_series(scan)
    hu = [s.hu() for s in slices]
    read = time.perf_counter()
    rt = init_runtime(device)
    prediction = StudyPrediction({}, slices, hu, series_of_row, ensemble)
    member_probs = [_member_probs(m, prediction.cache(m.config.data.image_size), tta, rt.device)
                    for m in ensemble.members]
    probs = ensemble.combine(member_probs)
    inferred = time.perf_counter()
    timings = {"read_headers_and_order": scanned - start, "read_pixels": read - scanned,
               "inference": inferred - read}
    prediction.result.update(build_result(scan, slices, probs, ensemble, timings,
                                          {"tta": tta, "device": str(rt.device), "min_slices": min_slices},
                                          include_phi))
    return prediction
