"""The image index: one row per DICOM image with its ids, slice order, neighbours, labels and fold.

The index is built from the headers the preprocessor reads (``ichdet.dicom.DicomMeta`` rows); this
module only orders and joins tables, it does no I/O except :func:`scan_folder`.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ichdet.dicom import read_meta
from ichdet.errors import DicomError, IchdetError, LabelError
from ichdet.folds import assign_folds
from ichdet.labels import LABELS

#: Files a DICOM folder scan never reads (DICOMDIR is an index, not an image).
_IGNORED_NAMES = frozenset({"DICOMDIR"})
_NOT_DICOM_SUFFIXES = frozenset({".csv", ".txt", ".json", ".md", ".parquet", ".xml", ".html", ".zip"})


def default_workers() -> int:
    """The number of cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def list_dicom_files(folder: str | Path) -> list[Path]:
    """All candidate DICOM files under ``folder``, recursively, sorted by relative path.

    Hospital exports often have no file extension, so every regular file counts except hidden files,
    ``DICOMDIR`` and files whose suffix says they are something else (``.csv``, ``.txt``, ...).
    """
    root = Path(folder)
    return [root / rel for rel in relative_dicom_files(root)]


def relative_dicom_files(folder: str | Path) -> list[str]:
    """:func:`list_dicom_files` as paths relative to ``folder`` with ``/`` separators, sorted.

    Plain strings: a walk over the 752,803 RSNA files builds no Path object per file.
    """
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a folder; pass the folder that holds the DICOM files")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        prefix = os.path.relpath(dirpath, root).replace(os.sep, "/") + "/" if dirpath != root else ""
        found.extend(prefix + name for name in filenames
                     if not name.startswith(".") and name not in _IGNORED_NAMES
                     and os.path.splitext(name)[1].lower() not in _NOT_DICOM_SUFFIXES)
    found.sort()
    return found


def _meta_or_error(path: Path) -> dict[str, object]:
    try:
        row: dict[str, object] = dict(read_meta(path).as_row())
    except DicomError as err:
        return {"path": str(path), "error": err.reason}
    row["path"] = str(path)
    return row


def scan_folder(folder: str | Path, workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every header under ``folder`` in parallel: (one row per image, one row per bad file).

    The second table has columns ``path, reason``; nothing is dropped silently.
    """
    files = list_dicom_files(folder)
    workers = workers or default_workers()
    if workers > 1 and len(files) > 64:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_meta_or_error, files, chunksize=64))
    else:
        rows = [_meta_or_error(p) for p in files]
    good = [r for r in rows if "error" not in r]
    bad = pd.DataFrame([{"path": r["path"], "reason": r["error"]} for r in rows if "error" in r],
                       columns=["path", "reason"])
    return pd.DataFrame(good), bad


def order_slices(meta: pd.DataFrame) -> pd.DataFrame:
    """Add ``slice_index``, ``n_slices``, ``prev_id`` and ``next_id`` within each series.

    Slices are ordered by ``z`` (ImagePositionPatient z; missing z sorts last), ties broken by
    ``instance_number`` and then ``image_id`` so the order is total and reproducible. Neighbours are
    ``None`` at the ends of a series. Rows come back sorted by series, then slice index.
    """
    out = meta.sort_values(["series_uid", "z", "instance_number", "image_id"], na_position="last",
                           kind="stable").reset_index(drop=True)
    series = out.groupby("series_uid", sort=False)
    out["slice_index"] = series.cumcount().astype("int32")
    out["n_slices"] = series["image_id"].transform("size").astype("int32")
    for column, shift in (("prev_id", 1), ("next_id", -1)):
        ids = series["image_id"].shift(shift).astype(object)
        out[column] = ids.where(ids.notna(), None)
    return out


def attach_labels(index: pd.DataFrame, labels: pd.DataFrame | None) -> tuple[pd.DataFrame, list[str]]:
    """Join the wide label table (from :func:`ichdet.labels.read_labels`) onto the index.

    Images without labels get NaN; returns the index and the labelled ids that have no image, so the
    caller can report them (a label without an image usually means a missing or corrupt file).
    """
    out = index.copy()
    if labels is None:
        for name in LABELS:
            out[name] = np.nan
        return out, []
    missing = labels.index.difference(pd.Index(out["image_id"]))
    joined = labels.reindex(out["image_id"])
    for name in LABELS:
        out[name] = joined[name].to_numpy(dtype="float32")
    return out, [str(i) for i in missing]


def build_index(meta: pd.DataFrame, labels: pd.DataFrame | None = None, n_folds: int = 5,
                seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Order slices, attach labels, and assign patient-grouped folds to the labelled images.

    Unlabelled images (test sets, hospital series) get fold ``-1``. Returns the index and the
    labelled ids that have no image.
    """
    _check_unique_ids(meta)
    index, missing = attach_labels(order_slices(meta), labels)
    fold = np.full(len(index), -1, dtype=np.int16)
    labelled = index[list(LABELS)].notna().all(axis=1).to_numpy()
    if labelled.any():
        try:
            fold[labelled] = assign_folds(index.loc[labelled], n_folds=n_folds, seed=seed)
        except ValueError as err:
            raise IchdetError(f"cannot split the labelled images into folds: {err}; "
                              "pass a smaller --folds") from None
    index["fold"] = fold
    return index, missing


def _check_unique_ids(meta: pd.DataFrame) -> None:
    dup = meta["image_id"][meta["image_id"].duplicated()]
    if len(dup):
        raise LabelError(f"image ids occur in more than one file: {sorted(set(dup))[:10]} "
                         f"({dup.nunique()} ids); remove the duplicate files")

