"""One series' headers -> is it an axial CT image series (and why not) -> its slices in order.

Pure functions over :class:`SliceHeader` records (what :mod:`ichdet.study.predict` reads from each file's
header); no I/O except :func:`header_from_dataset`'s parsing of a header already read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ichdet.errors import DicomError

__all__ = ["MAX_TILT_DEG", "MIN_SLICES", "PHI_KEYWORDS", "Duplicate", "SliceHeader", "SliceRef",
           "header_from_dataset", "order_series", "series_reason", "slice_normal"]

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
