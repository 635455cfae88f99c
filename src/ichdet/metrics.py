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

__all__ = [
    "LABEL_WEIGHTS",
    "expected_calibration_error",
    "per_label_auc",
    "per_label_log_loss",
    "score_table",
    "weighted_log_loss",
]

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


def expected_calibration_error(y_true: ArrayLike, y_pred: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error of the (N, 6) probabilities, every (image, label) pair one prediction.

    Predictions fall into ``n_bins`` equal-width bins of [0, 1] (the last bin closed); ECE is the
    bins' mean |mean prediction - observed frequency|, weighted by their share of the predictions.
    0 is perfectly calibrated; an over-confident model (0.99 where 70 % are positive) scores high.

    Example:
        >>> expected_calibration_error(np.array([[1, 0, 0, 0, 0, 1]]), np.full((1, 6), 0.5), n_bins=2)
        0.16666666666666666
    """
    t, p = _check_pair(y_true, y_pred)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    t, p = t.ravel(), p.ravel()
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    gap = np.abs(np.bincount(bins, p, n_bins) - np.bincount(bins, t, n_bins))  # per bin: |sum p - sum y|
    return float(gap.sum() / len(p))  # = sum over bins of (n_b / N) * |mean p_b - mean y_b|
