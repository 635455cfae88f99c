"""Provenance: what a cache holds, carried into every run trained on it, every bundle and every result.

``ichdet preprocess`` records in ``cache.json`` (``provenance``) a :class:`DataRecord`: a fingerprint
of what the cache holds, its images, studies and positives per label, how many images came from
``ichdet synth`` (detected per file from the synthetic writer's DICOM header,
:data:`SYNTH_IMPLEMENTATION_VERSION`) and the date. ``ichdet train`` and ``ichdet seq train`` copy it
into the run folder (``RUN/data.json``, :func:`write_run_record`); a bundle stores each member's copy
and a summary of them all (:func:`training_summary`), which the study result carries.

Caches and runs made before provenance existed say :data:`UNKNOWN` instead: nothing fails for lack of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from ichdet.io import write_text_atomic
from ichdet.names import LABELS

__all__ = [
    "RUN_DATA_FILE",
    "SYNTHETIC_WARNING",
    "SYNTH_IMPLEMENTATION_VERSION",
    "UNKNOWN",
    "DataRecord",
    "cache_record",
    "fingerprint",
    "read_run_record",
    "run_record",
    "training_summary",
    "write_run_record",
]

#: What a record says where the data behind a cache or run was not recorded (made by an older ichdet).
UNKNOWN = "unknown"
#: The run folder's copy of its training cache's record.
RUN_DATA_FILE = "data.json"
#: The Implementation Version Name (0002,0013) ``ichdet synth`` writes into every file's meta header.
SYNTH_IMPLEMENTATION_VERSION = "ICHDET_SYNTH"
#: The warning a result carries when its model was trained on synthetic data.
SYNTHETIC_WARNING = ("this model was trained on ichdet's synthetic data: it knows nothing about real CT, "
                     "its calls on a real study mean nothing")


class DataRecord(BaseModel):
    """What one cache holds (``cache.json`` ``provenance``).

    ``fingerprint`` is the sha256 of the image ids with their labels and folds and the stored image
    size (:func:`fingerprint`): two caches of the same images and labels share it wherever they are.
    ``positives`` is None for an unlabelled cache. ``synthetic`` is True when any image came from
    ``ichdet synth``, None when some images' origin is unknown (chunks reused from an older ichdet's run).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    images: int = Field(ge=0)
    studies: int = Field(ge=0)
    labelled_images: int = Field(ge=0)
    positives: dict[str, int] | None
    synthetic: bool | None
    synthetic_images: int = Field(ge=0)
    created_utc: str
    ichdet_version: str


def fingerprint(index: pd.DataFrame, size: int) -> str:
    """sha256 of the cache's image ids, labels and folds (sorted by image id) and its image size."""
    columns = ["image_id", *[c for c in (*LABELS, "fold") if c in index.columns]]
    table = index[columns].sort_values("image_id").to_csv(index=False, float_format="%.6g")
    return hashlib.sha256(f"size={size}\n{table}".encode()).hexdigest()


def cache_record(index: pd.DataFrame, size: int, synthetic_images: int, unknown_images: int,
                 version: str) -> DataRecord:
    """The record of a cache whose index is ``index`` (pure: the date is the only outside input).

    ``synthetic_images`` came from ``ichdet synth``; the origin of ``unknown_images`` was not recorded.
    """
    labelled = index[list(LABELS)].notna().all(axis=1) if set(LABELS) <= set(index.columns) else None
    n_labelled = 0 if labelled is None else int(labelled.sum())
    positives = None if labelled is None or not n_labelled else {
        label: int((index.loc[labelled, label] == 1).sum()) for label in LABELS}
    return DataRecord(
        fingerprint=fingerprint(index, size), images=len(index),
        studies=int(index["study_uid"].nunique()) if "study_uid" in index.columns else 0,
        labelled_images=n_labelled, positives=positives,
        synthetic=True if synthetic_images else (None if unknown_images else False),
        synthetic_images=synthetic_images, created_utc=_now(), ichdet_version=version)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_record(data: DataRecord | None) -> dict[str, Any]:
    """What a run folder records of its training cache: the cache's record (or :data:`UNKNOWN`) and the date."""
    return {"data": UNKNOWN if data is None else data.model_dump(), "trained_utc": _now()}


def write_run_record(run: Path, data: DataRecord | None) -> None:
    """Write ``RUN/data.json`` (:func:`run_record`) atomically, unless it already records the same data: a
    resumed run keeps its first training date, and a rerun on the same cache changes no file."""
    record = run_record(data)
    old = read_run_record(run)
    if isinstance(old, dict) and old.get("data") == record["data"]:
        return
    write_text_atomic(Path(run) / RUN_DATA_FILE, json.dumps(record, indent=1) + "\n")


def read_run_record(run: Path) -> dict[str, Any] | str:
    """A run folder's record of its training data, or :data:`UNKNOWN` (a run trained before it was kept,
    or a record that does not read as one)."""
    try:
        record = json.loads((Path(run) / RUN_DATA_FILE).read_text())
    except (OSError, ValueError):
        return UNKNOWN
    return record if isinstance(record, dict) and "data" in record else UNKNOWN


def _data(record: Mapping[str, Any] | str) -> Mapping[str, Any] | None:
    data = record.get("data") if isinstance(record, Mapping) else None
    return data if isinstance(data, Mapping) else None


def training_summary(records: Sequence[Mapping[str, Any] | str]) -> dict[str, Any]:
    """What an ensemble's runs (``records``: each run's :func:`read_run_record`) were trained on.

    ``synthetic``: True if any run was trained on a cache holding ``ichdet synth`` images, False if
    every run's data is known and none was, else :data:`UNKNOWN`. ``caches`` lists each distinct cache
    (by fingerprint) once; ``images``, ``studies`` and ``positives`` add them up (None when a run's
    data is unknown, or ``positives`` when a cache was unlabelled). ``dates``: when the caches were
    built and the runs trained.
    """
    known = [d for d in map(_data, records) if d is not None]
    n_unknown = len(records) - len(known)
    caches = list({str(d.get("fingerprint")): d for d in known}.values())
    if any(d.get("synthetic") is True for d in caches):
        synthetic: bool | str = True
    else:
        synthetic = UNKNOWN if n_unknown or any(d.get("synthetic") is not False for d in caches) else False
    complete = not n_unknown and bool(caches)
    positives = None
    if complete and all(isinstance(d.get("positives"), Mapping) for d in caches):
        positives = {label: sum(int(d["positives"].get(label, 0)) for d in caches) for label in LABELS}
    return {
        "synthetic": synthetic, "runs": len(records), "runs_unknown": n_unknown,
        "caches": [{k: d.get(k) for k in ("fingerprint", "images", "studies", "labelled_images", "positives",
                                          "synthetic", "synthetic_images", "created_utc")} for d in caches],
        "images": sum(int(d.get("images", 0)) for d in caches) if complete else None,
        "studies": sum(int(d.get("studies", 0)) for d in caches) if complete else None,
        "positives": positives,
        "dates": {"data_created_utc": sorted({str(d.get("created_utc")) for d in caches}),
                  "trained_utc": sorted({str(r["trained_utc"]) for r in records
                                         if isinstance(r, Mapping) and "trained_utc" in r})},
    }
