"""The study result JSON (schema in docs/study-result.md): pure assembly from a scan and probabilities.

No I/O except :func:`write_result`. Patient-identifying header values (name, ID, birth date, accession
number, institution), free-text header values (series descriptions) and paths under the scanned folder
(folder names can name patients) enter the result only with ``include_phi``; without it a path is an
opaque id (:func:`opaque_path`) and a description null.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ichdet import __version__
from ichdet.cache.provenance import SYNTHETIC_WARNING, UNKNOWN, training_summary
from ichdet.evaluate.quality import quality_warnings
from ichdet.infer.bundle import Ensemble
from ichdet.io import atomic_path
from ichdet.names import LABELS
from ichdet.study.decision import FLAG_RULE, called_slices, study_calls
from ichdet.study.scan import SeriesScan, StudyEntry, StudyScan, StudySlice

__all__ = ["SCHEMA", "SCHEMA_VERSION", "build_result", "opaque_path", "slice_ranges", "write_result"]

SCHEMA = "ichdet-study-result"
SCHEMA_VERSION = 1


def slice_ranges(called: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive True in a 1-D boolean array as inclusive (first, last) index pairs.

    >>> slice_ranges(np.array([False, True, True, False, True]))
    [(1, 2), (4, 4)]
    """
    padded = np.concatenate([[False], np.asarray(called, dtype=bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _rel(path: Path | str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def opaque_path(rel: str) -> str:
    """An id standing for a path relative to the scanned folder, for outputs without ``--include-phi``
    (folder names such as ``DOE_JOHN_MRN123/`` identify patients): ``"file-"`` and 12 hex digits of its
    sha256, the same path always giving the same id.

    >>> opaque_path("DOE_JOHN/1.dcm") == opaque_path("DOE_JOHN/1.dcm") != opaque_path("DOE_JOHN/2.dcm")
    True
    """
    return "file-" + hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _path_out(path: Path | str, root: Path, include_phi: bool) -> str:
    rel = _rel(path, root) if isinstance(path, Path) else path
    return rel if include_phi else opaque_path(rel)


def _series_json(series: SeriesScan, slices: Sequence[StudySlice], probs: np.ndarray, root: Path,
                 include_phi: bool) -> dict[str, Any]:
    return {
        "series_instance_uid": series.series_uid, "series_number": series.series_number,
        "description": series.description if include_phi else None, "n_files": series.n_files,
        "n_slices": len(slices),
        "slices": [{"index": s.index, "sop_instance_uid": s.sop_uid, "instance_number": s.instance_number,
                    "position_mm": round(s.position_mm, 4),
                    "probabilities": dict(zip(LABELS, map(float, p), strict=True))}
                   for s, p in zip(slices, probs, strict=True)],
        "duplicates": [{"sop_instance_uid": d.sop_uid, "kept_sop_instance_uid": d.kept_sop_uid,
                        "position_mm": round(d.position_mm, 4), "path": _path_out(d.path, root, include_phi)}
                       for d in series.duplicates],
    }


def _range(series: dict[str, Any], a: int, b: int) -> dict[str, Any]:
    first, last = series["slices"][a], series["slices"][b]
    return {"series_instance_uid": series["series_instance_uid"], "first_index": a, "last_index": b,
            "first_sop_instance_uid": first["sop_instance_uid"], "last_sop_instance_uid": last["sop_instance_uid"],
            "first_instance_number": first["instance_number"], "last_instance_number": last["instance_number"],
            "first_position_mm": first["position_mm"], "last_position_mm": last["position_mm"]}


def _summary(series_json: list[dict[str, Any]], probs: np.ndarray, thresholds: dict[str, float]) -> dict[str, Any]:
    """Study-level probability (max over slices), the calls (:data:`FLAG_RULE`), where each label is called."""
    if len(probs) == 0:
        return {"analysed": False}
    entries = [(s, sl) for s in series_json for sl in s["slices"]]
    top = probs.argmax(axis=0)
    ranges: dict[str, list[dict[str, Any]]] = {label: [] for label in LABELS}
    start = 0
    for s in series_json:
        n = len(s["slices"])
        part = called_slices(probs[start:start + n], thresholds)
        for label_i, label in enumerate(LABELS):
            ranges[label] += [_range(s, a, b) for a, b in slice_ranges(part[:, label_i])]
        start += n
    probability = {label: float(probs[:, i].max()) for i, label in enumerate(LABELS)}
    called = study_calls(probability, thresholds)
    return {
        "analysed": True, "hemorrhage": called["any"], "flag_rule": FLAG_RULE,
        "flagged_by": [label for label in LABELS if probability[label] >= thresholds[label]],
        "probability": probability, "called": called, "thresholds": dict(thresholds), "slice_ranges": ranges,
        "max_slice": {label: {"series_instance_uid": entries[top[i]][0]["series_instance_uid"],
                              "index": entries[top[i]][1]["index"],
                              "sop_instance_uid": entries[top[i]][1]["sop_instance_uid"],
                              "instance_number": entries[top[i]][1]["instance_number"],
                              "position_mm": entries[top[i]][1]["position_mm"]} for i, label in enumerate(LABELS)},
    }


def _study_json(study: StudyEntry, slices: Sequence[StudySlice], probs: np.ndarray, ensemble: Ensemble,
                root: Path, include_phi: bool) -> dict[str, Any]:
    rows = [i for i, s in enumerate(slices) if s.study_uid == study.study_uid]
    study_probs = probs[rows] if rows else np.zeros((0, len(LABELS)))
    series_json = []
    for series in study.selected:
        idx = [i for i in rows if slices[i].series_uid == series.series_uid]
        series_json.append(_series_json(series, [slices[i] for i in idx], probs[idx], root, include_phi))
    out: dict[str, Any] = {"study_instance_uid": study.study_uid}
    if include_phi:
        out["patient"] = dict(study.patient)
    out["summary"] = _summary(series_json, study_probs, ensemble.thresholds)
    out["series"] = series_json
    out["skipped_series"] = [{"series_instance_uid": s.series_uid, "series_number": s.series_number,
                              "description": s.description if include_phi else None, "modality": s.modality,
                              "n_files": s.n_files, "reason": s.reason} for s in study.series if not s.selected]
    return out


#: Said of a label whose threshold was not measured (run folders, or a bundle written without --labels).
NO_OPERATING_POINT = "no out-of-fold operating point: the threshold is the default, not measured"


def _operating_point(point: Mapping[str, Any] | None, threshold: float) -> dict[str, Any]:
    """One label's operating point as the result states it (see docs/study-result.md, ``model``).

    Bundles written before the quality fields existed have ``n_pos`` and no AUC: their warnings are
    derived from what they hold."""
    if point is None:
        return {"threshold": threshold, "auc": None, "sensitivity": None, "specificity": None, "positives": None,
                "warnings": [NO_OPERATING_POINT]}
    positives = point.get("positives", point.get("n_pos"))
    auc, specificity = point.get("auc"), point.get("specificity")
    warnings = point.get("warnings")
    if warnings is None:
        warnings = quality_warnings(auc, specificity, int(positives)) if positives is not None else []
    return {"threshold": threshold, "auc": auc, "sensitivity": point.get("sensitivity"), "specificity": specificity,
            "positives": positives, "warnings": list(warnings)}


def _model_json(ensemble: Ensemble) -> dict[str, Any]:
    """The result's ``model``: the ensemble's manifest, its thresholds, each label's operating point with
    its quality, and what the members were trained on (``training``)."""
    model = dict(ensemble.manifest)
    model["thresholds"] = dict(ensemble.thresholds)
    points = model.get("operating_points") or {}
    model["operating_points"] = {label: _operating_point(points.get(label), ensemble.thresholds[label])
                                 for label in LABELS}
    if not isinstance(model.get("training"), dict):
        model["training"] = training_summary([UNKNOWN for _ in ensemble.members])
    return model


def build_result(scan: StudyScan, slices: Sequence[StudySlice], probs: np.ndarray, ensemble: Ensemble,
                 timings: dict[str, float], settings: dict[str, Any], include_phi: bool = False) -> dict[str, Any]:
    """The result dict of one :func:`ichdet.study.predict.predict_study` call (see docs/study-result.md).

    ``probs`` (N, 6) are the ensemble's probabilities of ``slices`` (same order). Timings are in seconds;
    ``write`` is filled in by :func:`write_result`.
    """
    model = _model_json(ensemble)
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "ichdet_version": __version__,
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "labels": list(LABELS), "settings": dict(settings), "model": model,
        "warnings": [SYNTHETIC_WARNING] if model["training"]["synthetic"] is True else [],
        "source": {"n_files": scan.n_files, "n_studies": len(scan.studies), "n_skipped_files": len(scan.skipped_files)},
        "studies": [_study_json(st, slices, probs, ensemble, scan.root, include_phi) for st in scan.studies],
        "skipped_files": [{"path": _path_out(f.path, scan.root, include_phi), "reason": f.reason}
                          for f in scan.skipped_files],
        "timings_s": {**{k: round(v, 4) for k, v in timings.items()}, "write": None},
    }


def write_result(result: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """Write the result JSON atomically; ``timings_s.write`` becomes the time to serialise and write it.

    The file is written once to measure, then again with the figure in it (a few milliseconds more),
    before the final flush and rename; ``result`` gets the figure too.
    """
    with atomic_path(out) as tmp:
        start = time.perf_counter()
        tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        result["timings_s"]["write"] = round(time.perf_counter() - start, 4)
        tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return Path(out)
