"""Any DICOM folder -> studies -> series, selected or skipped with the reason, slices in order.

:func:`scan_folder` reads only headers (``stop_before_pixels``) of every file under a folder as a PACS
export leaves it (nested folders, any file names, several studies, non-image objects, files that are
not DICOM), groups them into studies and series, selects the axial head-CT series
(:func:`ichdet.dicom.series.series_reason` says why another is skipped) and orders their slices along the
slice normal (:func:`ichdet.dicom.series.order_series`). Nothing under the folder is modified.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ichdet.cache.index import scan_dicom_files
from ichdet.dicom.read import read_header, read_hu
from ichdet.dicom.series import (
    MIN_SLICES,
    Duplicate,
    SliceHeader,
    SliceRef,
    header_from_dataset,
    order_series,
    series_reason,
)
from ichdet.errors import DicomError

__all__ = ["SeriesScan", "SkippedFile", "StudyEntry", "StudyScan", "StudySlice", "scan_folder"]

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
    reason, and so are entries that cannot be read as files (a FIFO, a dangling link, a folder that cannot
    be listed, a link back to a folder already scanned: the rule of :func:`ichdet.cache.index.scan_dicom_files`,
    which ``preprocess`` lists in its errors.csv); nothing is read past the header and nothing under
    ``path`` is written.
    """
    root = Path(path)
    keys, problems = scan_dicom_files(root)
    files = [root / key[0] for key in keys]
    skipped = [SkippedFile(rel, reason) for rel, reason in problems]
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
    return StudyScan(root, tuple(studies), tuple(sorted(skipped, key=lambda f: f.path)), len(files))


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
    instance_number: int | None = None  # InstanceNumber (0020,0013): how a PACS numbers the slice

    def hu(self) -> np.ndarray:
        """The slice's pixels in HU, float32 (H, W), as :func:`ichdet.dicom.read.read_hu` reads them."""
        return read_hu(self.path)
