"""Per-label temperature scaling and the positives an operating point needs (pure numpy; no torch).

Temperature scaling divides a probability's logit by ``T`` (``T > 1`` makes it less sure, ``T < 1`` more):
``p' = sigmoid(logit(p) / T)``. It is fitted per label by minimising the log loss on labelled images,
so it changes how sure the ensemble is, never the order of its scores (AUC is unchanged).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

__all__ = ["EPS", "MIN_POSITIVES", "T_RANGE", "apply_temperature", "fit_temperature", "positives_needed"]

EPS = 1e-7
#: Fewest positive images a label needs for a site operating point, whatever the sensitivity asked.
MIN_POSITIVES = 10
#: The temperatures a fit may give (beyond these the site data says the model is useless or certain).
T_RANGE = (0.05, 20.0)


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(q) - np.log1p(-q)


def apply_temperature(p: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """``sigmoid(logit(p) / T)`` elementwise (``temperature`` broadcast over the last axis: one per label).

    ``T == 1`` gives ``p`` back bit for bit (no logit round trip), so a label without a fitted temperature
    predicts exactly what its operating point was set on.
    """
    t = np.asarray(temperature, np.float64)
    scaled = 1.0 / (1.0 + np.exp(-_logit(p) / t))
    return np.where(t == 1.0, np.asarray(p, np.float64), scaled)


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    q = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """The ``T`` in :data:`T_RANGE` minimising the log loss of ``apply_temperature(p, T)`` against 0/1 ``y``.

    Searched over ``log T`` (bounded Brent), which is where the loss is smooth and symmetric.
    """
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    lo, hi = (math.log(t) for t in T_RANGE)
    found = minimize_scalar(lambda s: _log_loss(y, apply_temperature(p, math.exp(s))), bounds=(lo, hi),
                            method="bounded", options={"xatol": 1e-5})
    return float(math.exp(found.x))


def positives_needed(sensitivity: float) -> int:
    """Positive images needed to place an operating point at ``sensitivity``.

    With ``n`` positives a threshold's sensitivity moves in steps of ``1 / n``; below ``1 / (1 - s)``
    positives one missed case already takes it under ``s``, so the threshold is only the lowest positive
    score, not an operating point. At least :data:`MIN_POSITIVES` whatever ``s`` is.
    """
    if sensitivity >= 1.0:
        return MIN_POSITIVES
    return max(MIN_POSITIVES, math.ceil(round(1.0 / (1.0 - sensitivity), 9)))
