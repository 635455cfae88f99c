"""The study decision: one rule makes the study flag and every label's call agree (issue 17 item 4).

Pure functions over probabilities and thresholds; the result JSON (:mod:`ichdet.study.result`), the
report, the SR and the command output all take their decision from here.
"""

from __future__ import annotations

import numpy as np

from ichdet.names import LABELS

__all__ = ["FLAG_RULE", "called_slices", "study_calls"]

#: The study flag rule (docs/study-result.md), as the report states it.
FLAG_RULE = ("the study is flagged when any label is called, a label being called when its probability (the "
             "maximum over the study's slices) is >= its threshold; 'any' is then shown called too")


def called_slices(probs: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """(N, 6) bool: each label called on each slice (probability ``>=`` threshold); ``any`` is called on a
    slice where any label is (:data:`FLAG_RULE` per slice)."""
    called = np.stack([probs[:, i] >= thresholds[label] for i, label in enumerate(LABELS)], axis=1)
    called[:, LABELS.index("any")] = called.any(axis=1)
    return called


def study_calls(probability: dict[str, float], thresholds: dict[str, float]) -> dict[str, bool]:
    """Each label called at the study level (:data:`FLAG_RULE`): its probability ``>=`` its threshold,
    and ``any`` when any label is.

    >>> study_calls(dict.fromkeys(LABELS, 0.2) | {"subdural": 0.5}, dict.fromkeys(LABELS, 0.5))["any"]
    True
    """
    called = {label: probability[label] >= thresholds[label] for label in LABELS}
    called["any"] = any(called.values())
    return called
