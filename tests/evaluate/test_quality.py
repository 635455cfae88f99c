"""Operating-point quality (issue 17 item 5): AUC, sensitivity, specificity and positives per label, and
the warnings that say when a threshold means little."""

from __future__ import annotations

import numpy as np
import pytest

from ichdet.evaluate.quality import MIN_AUC, MIN_POSITIVES, MIN_SPECIFICITY, point_quality, quality_warnings
from ichdet.names import LABELS


@pytest.mark.parametrize(("auc", "specificity", "positives", "expected"), [
    (0.9, 0.8, 50, []),
    (MIN_AUC, MIN_SPECIFICITY, MIN_POSITIVES, []),  # the floors themselves pass
    (0.4999, 0.8, 50, ["out-of-fold AUC 0.500 is below 0.5: no better than chance"]),
    (0.9, 0.0499, 50, ["specificity 0.050 at the threshold is below 0.05: the label is called on nearly every "
                       "negative"]),
    (0.9, 0.8, 9, ["only 9 positive images (fewer than 10): the threshold rests on a handful of cases"]),
    (None, None, 0, ["no positive image: no operating point, the default threshold is used"]),
    (0.3, 0.01, 4, ["only 4 positive images (fewer than 10): the threshold rests on a handful of cases",
                    "out-of-fold AUC 0.300 is below 0.5: no better than chance",
                    "specificity 0.010 at the threshold is below 0.05: the label is called on nearly every negative"]),
])
def test_quality_warnings(auc: float | None, specificity: float | None, positives: int, expected: list[str]) -> None:
    assert quality_warnings(auc, specificity, positives) == expected


def test_point_quality_numbers() -> None:
    """Per label the same scores; ``any`` has 12 positives scored 0.9 .. 0.35 and 4 negatives: the positives
    rank above three negatives, and six above, one tied with, five below the fourth (AUC 42.5/48);
    sensitivity 0.75 takes threshold 0.5 (9 of 12), where 3 of 4 negatives fall below."""
    pos = [0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35]
    neg = [0.1, 0.2, 0.3, 0.6]
    scores = np.array(pos + neg)
    y_pred = np.repeat(scores[:, None], len(LABELS), axis=1)
    y_true = np.zeros_like(y_pred)
    y_true[:len(pos), :] = 1.0
    y_true[:, 0] = 0.0  # epidural: no positive
    y_true[:3, 1] = 1.0
    y_true[3:, 1] = 0.0  # intraparenchymal: 3 positives, the highest scores
    out = point_quality(y_true, y_pred, 0.75)
    assert out["any"] == {"threshold": 0.5, "auc": pytest.approx(42.5 / 48), "sensitivity": 0.75,
                          "specificity": 0.75, "positives": 12, "n_pos": 12, "n_neg": 4, "warnings": []}
    assert out["epidural"] == {"threshold": None, "auc": None, "sensitivity": None, "specificity": None,
                               "positives": 0, "n_pos": 0, "n_neg": 16,
                               "warnings": ["no positive image: no operating point, the default threshold is used"]}
    assert out["intraparenchymal"]["auc"] == 1.0 and out["intraparenchymal"]["warnings"] == [
        "only 3 positive images (fewer than 10): the threshold rests on a handful of cases"]
