"""The image index: one row per DICOM image with its ids, slice order, neighbours, labels and fold.

The index is built from the headers the preprocessor reads (``ichdet.dicom.read.DicomMeta`` rows); this
module only orders and joins tables; its only I/O is listing a folder (:func:`scan_dicom_files`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd

from ichdet.cache.folds import assign_folds
from ichdet.errors import IchdetError, LabelError
from ichdet.names import LABELS

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
    """:func:`list_dicom_files` as paths relative to ``folder`` with ``/`` separators, sorted."""
    return [key[0] for key in scan_dicom_files(folder)[0]]


#: A file as the cache keys it: (path relative to the scanned folder, size in bytes, mtime in ns).
FileKey = tuple[str, int, int]


def _candidate(name: str) -> bool:
    return (not name.startswith(".") and name not in _IGNORED_NAMES
            and os.path.splitext(name)[1].lower() not in _NOT_DICOM_SUFFIXES)


def scan_dicom_files(folder: str | Path) -> tuple[list[FileKey], list[tuple[str, str]]]:
    """Every candidate DICOM file under ``folder`` (see :func:`list_dicom_files`) with its size and mtime,
    sorted by path, and every entry that cannot be read as a file, with the reason (path, reason).

    Only regular files (or links to them) are listed: a FIFO, socket or device named ``.dcm`` is
    reported and never opened (opening a FIFO blocks); so are a dangling link and a sub-folder that
    cannot be listed. Links are followed, but each real folder (device, inode) is walked once: a link
    back to a folder already walked (a loop such as ``x -> .`` or ``up -> ..``) is reported, not
    entered, so the walk ends and lists every file once (under the path that comes first in a depth-first
    walk in name order). Plain strings: a walk over the 752,803 RSNA
    files builds no Path object per file.

    Raises:
        IchdetError: ``folder`` is not a folder, or cannot be listed.
    """
    root = os.fspath(folder)
    try:
        root_stat = os.stat(root)
    except OSError:
        root_stat = None
    if root_stat is None or not stat.S_ISDIR(root_stat.st_mode):
        raise IchdetError(f"{root}: not a folder; pass the folder that holds the DICOM files")
    found: list[FileKey] = []
    problems: list[tuple[str, str]] = []
    visited: set[tuple[int, int]] = set()
    stack: list[tuple[str, tuple[int, int]]] = [("", (root_stat.st_dev, root_stat.st_ino))]
    while stack:
        prefix, real = stack.pop()
        if real in visited:  # marked when walked, not when found: the first path in name order wins
            problems.append((prefix.rstrip("/"), _AGAIN))
            continue
        visited.add(real)
        try:
            with os.scandir(os.path.join(root, prefix) if prefix else root) as it:
                entries = sorted(it, key=lambda e: e.name, reverse=True)  # popped in name order: deterministic
        except OSError as err:
            if not prefix:
                raise IchdetError(f"{root}: cannot list this folder ({err.strerror or err}); "
                                  "fix its permissions and rerun") from None
            problems.append((prefix.rstrip("/"), f"cannot list this folder ({err.strerror or err}); "
                             "its files were not read: fix its permissions and rerun"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            problem = _entry_problem(entry, rel, stack, found)
            if problem is not None:
                problems.append((rel, problem))
    found.sort()
    problems.sort()
    return found, problems


_AGAIN = "a link to a folder already scanned (a loop or a second link); not entered again, its files are listed once"


def _entry_problem(entry: os.DirEntry[str], rel: str, stack: list[tuple[str, tuple[int, int]]],
                   found: list[FileKey]) -> str | None:
    """Sort one folder entry: a folder onto ``stack``, a candidate file into ``found``; or say why neither."""
    try:
        if entry.is_dir():
            st = entry.stat()
            stack.append((rel + "/", (st.st_dev, st.st_ino)))
            return None
        if not _candidate(entry.name):
            return None
        st = entry.stat()
    except OSError as err:  # a dangling link, a link loop, or a file removed while scanning
        if entry.is_symlink() and err.errno in (errno.ENOENT, errno.ELOOP):
            what = "its target does not exist" if err.errno == errno.ENOENT else "it points to itself (a link loop)"
            return f"a link that cannot be followed: {what}"
        return f"cannot read the file: {err.strerror or err}"
    if not stat.S_ISREG(st.st_mode):
        return ("not a regular file (a FIFO, socket or device); skipped without opening it: "
                "copy the image into a regular file")
    found.append((rel, st.st_size, st.st_mtime_ns))
    return None


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
    """Join the wide label table (from :func:`ichdet.cache.labels.read_labels`) onto the index.

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

