"""The RSNA 2019 metric (weighted multi-label log loss, ``any`` counted twice), per-label ROC AUC,
operating points, calibration, study-level scores and bootstrap confidence intervals.

All functions take ``y_true`` and ``y_pred`` as (N, 6) arrays in :data:`~ichdet.cache.labels.LABELS` order
(or DataFrames with those columns, reordered by name). They are pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.metrics import roc_auc_score

from ichdet.names import LABELS

__all__ = [
    "LABEL_WEIGHTS",
    "bootstrap_ci",
    "expected_calibration_error",
    "operating_points",
    "per_label_auc",
    "per_label_log_loss",
    "score_table",
    "study_level",
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


def _threshold_at(pos: np.ndarray, sensitivity: float) -> float:
    """The highest threshold t with mean(pos >= t) >= sensitivity: the k-th highest positive score."""
    k = max(1, math.ceil(sensitivity * len(pos) - 1e-9))  # -1e-9: 0.95 * 20 must stay 19, not 20
    return float(np.sort(pos)[::-1][k - 1])


def operating_points(y_true: np.ndarray, y_pred: np.ndarray, sensitivity: float = 0.95) -> pd.DataFrame:
    """Per label, the highest threshold whose sensitivity (``y_pred >= threshold``) reaches ``sensitivity``.

    Returns a DataFrame indexed by LABELS with columns ``threshold``, ``sensitivity`` and ``specificity``
    (both measured at that threshold), ``n_pos`` and ``n_neg``. A label without positive images has
    NaN threshold, sensitivity and specificity (nothing to detect); one without negatives, NaN specificity.

    Example: positives scored 0.9, 0.8, 0.3, 0.2 at a target of 0.75 give threshold 0.3 (3 of 4 caught).
    """
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    t, p = _check_pair(y_true, y_pred)
    rows = []
    for j in range(len(LABELS)):
        pos, neg = p[t[:, j] == 1, j], p[t[:, j] == 0, j]
        threshold = _threshold_at(pos, sensitivity) if len(pos) else np.nan
        rows.append({
            "threshold": threshold,
            "sensitivity": float(np.mean(pos >= threshold)) if len(pos) else np.nan,
            "specificity": float(np.mean(neg < threshold)) if len(neg) and len(pos) else np.nan,
            "n_pos": len(pos),
            "n_neg": len(neg),
        })
    return pd.DataFrame(rows, index=pd.Index(LABELS))


def expected_calibration_error(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error: ``sum_b |B_b| / N * |mean(y in B_b) - mean(p in B_b)|``.

    Bins split [0, 1] into ``n_bins`` equal widths (the last one includes 1). Every element counts as
    one binary prediction, so an (N, 6) pair pools the six labels; a 1-D pair is one label.

    Example:
        >>> expected_calibration_error([0, 1], [0.2, 0.8], n_bins=2)  # both off by 0.2
        0.2
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape or not len(t):
        raise ValueError(f"y_true and y_pred must be non-empty and of one size; got {t.shape} and {p.shape}")
    if not (np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()):
        raise ValueError("y_pred must hold finite probabilities in [0, 1]")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    gap = np.abs(np.bincount(bins, weights=t, minlength=n_bins) - np.bincount(bins, weights=p, minlength=n_bins))
    return float(gap.sum() / len(t))  # sum over bins of |sum y - sum p| / N == the weighted mean gap


def reliability_table(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_bins: int = 15) -> pd.DataFrame:
    """Per non-empty bin of equal width: ``count``, ``mean_pred`` and ``frac_pos`` (the reliability plot)."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    keep = count > 0
    return pd.DataFrame({
        "count": count[keep],
        "mean_pred": np.bincount(bins, weights=p, minlength=n_bins)[keep] / count[keep],
        "frac_pos": np.bincount(bins, weights=t, minlength=n_bins)[keep] / count[keep],
    }, index=pd.Index(np.flatnonzero(keep), name="bin"))


def study_level(y_true: np.ndarray, y_pred: np.ndarray, groups: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per study (``groups``: one study id per row), the max over its slices of truth and of score.

    A study is positive for a label when any of its slices is; its score is its highest slice score.
    Studies come out in sorted order of their ids.
    """
    t, p = _check_pair(y_true, y_pred)
    g = np.asarray(groups)
    if g.shape != (len(t),):
        raise ValueError(f"groups must hold one study id per row ({len(t)}); got shape {g.shape}")
    _, code = np.unique(g, return_inverse=True)
    n = int(code.max()) + 1
    out_t, out_p = np.zeros((n, t.shape[1])), np.zeros((n, p.shape[1]))
    np.maximum.at(out_t, code, t)  # starting from 0 is safe: values are in [0, 1]
    np.maximum.at(out_p, code, p)
    return out_t, out_p


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], y_true: npt.ArrayLike, y_pred: npt.ArrayLike,
                 groups: npt.ArrayLike, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% confidence interval of ``metric(y_true, y_pred)`` by resampling whole groups (studies).

    Each of ``n`` resamples draws as many groups as there are, with replacement (seeded), and scores
    all their rows; the interval is the 2.5th and 97.5th percentile. Resamples where the metric is
    undefined (raises ValueError or returns NaN, e.g. an AUC with one class) are left out; NaN bounds
    mean no resample was defined.
    """
    t, p, g = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups)
    if len(g) != len(t) or len(p) != len(t) or not len(t):
        raise ValueError(f"y_true, y_pred and groups must have one non-zero length; got {len(t)}, {len(p)}, {len(g)}")
    _, code = np.unique(g, return_inverse=True)
    members = np.split(np.argsort(code, kind="stable"), np.cumsum(np.bincount(code))[:-1])
    rng = np.random.default_rng(seed)
    scores = np.full(n, np.nan)
    for i in range(n):
        rows = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        try:
            scores[i] = metric(t[rows], p[rows])
        except ValueError:
            continue
    if np.isnan(scores).all():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(scores, [2.5, 97.5])
    return float(low), float(high)
