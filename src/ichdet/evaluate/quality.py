"""How much an operating point can be trusted: per label, its out-of-fold AUC, sensitivity, specificity
and positives, with a warning where the decision it makes means little. Pure: no I/O.

A bundle's threshold for a label comes from the out-of-fold predictions of the runs it holds
(:func:`ichdet.evaluate.metrics.operating_points`). It means nothing when the ranking behind it is no
better than chance (AUC below :data:`MIN_AUC`), when reaching the sensitivity took a threshold that
calls nearly every negative positive (specificity below :data:`MIN_SPECIFICITY`), or when it rests on
fewer than :data:`MIN_POSITIVES` positive images. ``ichdet bundle --labels`` warns of each, and the
manifest and every study result record it next to the threshold.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ichdet.evaluate.metrics import operating_points, per_label_auc
from ichdet.names import LABELS

__all__ = ["MIN_AUC", "MIN_POSITIVES", "MIN_SPECIFICITY", "point_quality", "quality_warnings"]

#: Below this out-of-fold AUC a label's scores rank positives no better than chance.
MIN_AUC = 0.5
#: Below this specificity at the threshold the label is called on (nearly) every study.
MIN_SPECIFICITY = 0.05
#: Fewer positive images than this and the threshold (and AUC) rest on a handful of cases.
MIN_POSITIVES = 10


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def quality_warnings(auc: float | None, specificity: float | None, positives: int) -> list[str]:
    """The warnings of one label's operating point (empty when it is usable); see the module docstring."""
    out = []
    if positives == 0:
        out.append("no positive image: no operating point, the default threshold is used")
    elif positives < MIN_POSITIVES:
        out.append(f"only {positives} positive images (fewer than {MIN_POSITIVES}): the threshold rests on "
                   "a handful of cases")
    if auc is not None and auc < MIN_AUC:
        out.append(f"out-of-fold AUC {auc:.3f} is below {MIN_AUC}: no better than chance")
    if specificity is not None and specificity < MIN_SPECIFICITY:
        out.append(f"specificity {specificity:.3f} at the threshold is below {MIN_SPECIFICITY}: the label is "
                   "called on nearly every negative")
    return out


def point_quality(y_true: np.ndarray, y_pred: np.ndarray, sensitivity: float) -> dict[str, dict[str, Any]]:
    """Per label: ``threshold`` (None without positives), ``auc``, ``sensitivity`` and ``specificity`` at
    the threshold, ``positives`` (and ``n_pos``/``n_neg``, as earlier manifests wrote them), ``warnings``.

    ``y_true`` and ``y_pred`` are (N, 6) out-of-fold labels and ensemble probabilities in LABELS order.
    A value that cannot be measured (AUC of a label with one class only) is None.
    """
    points = operating_points(y_true, y_pred, sensitivity)
    rows: dict[Any, dict[Any, Any]] = points.to_dict(orient="index")
    aucs: dict[Any, float] = per_label_auc(y_true, y_pred)["auc"].to_dict()
    out: dict[str, dict[str, Any]] = {}
    for label in LABELS:
        row = rows[label]
        auc = _finite(float(aucs[label]))
        spec = _finite(float(row["specificity"]))
        positives = int(row["n_pos"])
        out[label] = {"threshold": _finite(float(row["threshold"])), "auc": auc,
                      "sensitivity": _finite(float(row["sensitivity"])), "specificity": spec,
                      "positives": positives, "n_pos": positives, "n_neg": int(row["n_neg"]),
                      "warnings": quality_warnings(auc, spec, positives)}
    return out
