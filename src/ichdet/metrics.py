"""The RSNA 2019 metric (weighted multi-label log loss, ``any`` counted twice) and per-label ROC AUC.

All functions take ``y_true`` and ``y_pred`` as (N, 6) arrays in :data:`~ichdet.labels.LABELS` order
(or DataFrames with those columns, reordered by name). They are pure: no I/O.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.metrics import roc_auc_score

from ichdet.labels import LABELS

__all__ = ["LABEL_WEIGHTS", "operating_points", "per_label_auc", "per_label_log_loss", "score_table",
           "weighted_log_loss"]

LABEL_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)
"""Kaggle's weight per label, in LABELS order: ``any`` counts twice."""

EPS = 1e-7
"""Predictions are clipped to [EPS, 1 - EPS] before the log: one confident miss costs ~16, not inf."""

ArrayLike = npt.ArrayLike | pd.DataFrame


def _as_matrix(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as a float64 (N, 6) array; a DataFrame with the LABELS columns is reordered by name."""
    if isinstance(x, pd.DataFrame) and set(LABELS) <= set(x.columns):
        x = x[list(LABELS)]
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(LABELS):
        raise ValueError(f"{name} must have shape (N, {len(LABELS)}) in LABELS order; got {arr.shape}")
    return arr


def _check_pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated (y_true, y_pred): same (N, 6) shape, N > 0, finite values in [0, 1]."""
    t, p = _as_matrix(y_true, "y_true"), _as_matrix(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {t.shape} vs {p.shape}")
    if len(t) == 0:
        raise ValueError("y_true and y_pred are empty (0 rows); the metric needs at least one image")
    for name, arr in (("y_true", t), ("y_pred", p)):
        if np.isnan(arr).any():
            rows = np.flatnonzero(np.isnan(arr).any(axis=1))
            raise ValueError(f"{name} contains NaN in {len(rows)} rows (first: row {rows[0]})")
        if ((arr < 0) | (arr > 1)).any():
            raise ValueError(f"{name} has values outside [0, 1] (min {arr.min()}, max {arr.max()})")
    return t, p


def _bce(t: np.ndarray, p: np.ndarray, eps: float) -> np.ndarray:
    """Element-wise binary cross-entropy with predictions clipped to [eps, 1 - eps]."""
    p = np.clip(p, eps, 1.0 - eps)
    return -(t * np.log(p) + (1.0 - t) * np.log1p(-p))


def weighted_log_loss(y_true: ArrayLike, y_pred: ArrayLike, eps: float = EPS) -> float:
    """Kaggle's RSNA 2019 metric: ``sum_{i,l} w_l * BCE_il / (N * sum_l w_l)`` with w = LABEL_WEIGHTS.

    Equivalently, per image the weighted mean of its six binary cross-entropies, averaged over images.

    Example:
        >>> weighted_log_loss(np.zeros((1, 6)), np.full((1, 6), 0.5))  # ln 2
        0.6931471805599453

    Raises:
        ValueError: shapes differ or are not (N, 6), no rows, NaN, or values outside [0, 1].
    """
    t, p = _check_pair(y_true, y_pred)
    w = np.asarray(LABEL_WEIGHTS)
    return float((_bce(t, p, eps) * w).sum() / (len(t) * w.sum()))


def per_label_log_loss(y_true: ArrayLike, y_pred: ArrayLike, eps: float = EPS) -> pd.Series:
    """Unweighted mean binary cross-entropy of each label (a Series indexed by LABELS)."""
    t, p = _check_pair(y_true, y_pred)
    return pd.Series(_bce(t, p, eps).mean(axis=0), index=pd.Index(LABELS), name="log_loss")


def _one_class_note(column: np.ndarray) -> str:
    """Why AUC is undefined for a label column, or "" when both classes are present."""
    classes = np.unique(column)
    if len(classes) > 1:
        return ""
    return f"only one class present (all {classes[0]:g})"


def per_label_auc(y_true: ArrayLike, y_pred: ArrayLike) -> pd.DataFrame:
    """ROC AUC of each label: DataFrame indexed by LABELS, columns ``auc`` (float) and ``note`` (str).

    ``auc`` is NaN, and ``note`` says why, where a label has only one class in ``y_true``
    (e.g. no epidural case in a fold); ``note`` is "" otherwise.
    """
    t, p = _check_pair(y_true, y_pred)
    notes = [_one_class_note(t[:, j]) for j in range(len(LABELS))]
    aucs = [np.nan if note else float(roc_auc_score(t[:, j], p[:, j])) for j, note in enumerate(notes)]
    return pd.DataFrame({"auc": aucs, "note": notes}, index=pd.Index(LABELS))


def score_table(y_true: ArrayLike, y_pred: ArrayLike, eps: float = EPS) -> pd.DataFrame:
    """The table ``ichdet evaluate`` prints: one row per label plus a row ``weighted``.

    Columns: ``log_loss`` (per label: unweighted BCE; ``weighted``: the Kaggle metric), ``auc``
    (``weighted``: NaN), ``prevalence`` (fraction of positive images; ``weighted``: NaN), ``note``.
    """
    t, p = _check_pair(y_true, y_pred)
    table = per_label_auc(t, p)
    table.insert(0, "log_loss", per_label_log_loss(t, p, eps))
    table.insert(2, "prevalence", t.mean(axis=0))
    weighted = {
        "log_loss": weighted_log_loss(t, p, eps),
        "auc": np.nan,
        "prevalence": np.nan,
        "note": "Kaggle metric: weights " + ", ".join(f"{w:g}" for w in LABEL_WEIGHTS),
    }
    return pd.concat([table, pd.DataFrame(weighted, index=pd.Index(["weighted"]))])


def operating_points(y_true: ArrayLike, y_pred: ArrayLike, sensitivity: float = 0.95) -> pd.DataFrame:
    """Per label, the highest threshold whose sensitivity reaches ``sensitivity`` (a slice is called
    positive when its probability is >= the threshold).

    Returns a DataFrame indexed by LABELS with columns ``threshold``, ``sensitivity``, ``specificity``
    (reached at that threshold), ``n_pos`` and ``n_neg``. A label without a positive case has NaN
    threshold, sensitivity and specificity.

    Example: positives scored [0.9, 0.8, 0.3, 0.2] at sensitivity 0.75 give threshold 0.3 (3 of 4 called).
    """
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    t, p = _check_pair(y_true, y_pred)
    rows = []
    for j in range(len(LABELS)):
        pos, neg = p[t[:, j] >= 0.5, j], p[t[:, j] < 0.5, j]
        if len(pos) == 0:
            rows.append((np.nan, np.nan, np.nan, 0, len(neg)))
            continue
        # the k-th highest positive score calls k positives; k is the fewest reaching the target
        k = max(1, int(np.ceil(sensitivity * len(pos) - 1e-9)))
        threshold = float(np.sort(pos)[::-1][k - 1])
        spec = float((neg < threshold).mean()) if len(neg) else np.nan
        rows.append((threshold, float((pos >= threshold).mean()), spec, len(pos), len(neg)))
    table = pd.DataFrame(rows, columns=["threshold", "sensitivity", "specificity", "n_pos", "n_neg"],
                         index=pd.Index(LABELS))
    return table.astype({"n_pos": "int64", "n_neg": "int64"})
