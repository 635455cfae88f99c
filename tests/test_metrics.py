"""The Kaggle metric and per-label AUC against values worked out by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ichdet.labels import LABELS
from ichdet.metrics import LABEL_WEIGHTS, per_label_auc, per_label_log_loss, score_table, weighted_log_loss

LN = math.log
NEG_LN_1M_EPS = -math.log1p(-1e-7)  # BCE of a perfect prediction after clipping: 1.00000005e-7


def test_label_weights_count_any_twice() -> None:
    assert LABEL_WEIGHTS == (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)


# y_true, y_pred, expected weighted log loss (worked by hand: sum_il w_l BCE_il / (N * 7))
HAND_CASES = [
    pytest.param(np.zeros((3, 6)), np.full((3, 6), 0.5), LN(2), id="all-half-negatives"),
    pytest.param(np.ones((2, 6)), np.full((2, 6), 0.5), LN(2), id="all-half-positives"),
    pytest.param(np.eye(6)[:4], np.full((4, 6), 0.5), LN(2), id="all-half-mixed"),
    pytest.param(
        [[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1, 1]],
        [[0.2] * 6, [0.5, 0.1, 0.1, 0.1, 0.9, 0.8]],
        # row 0: 7 weights x -ln 0.8; row 1: -ln 0.5 + 3 x -ln 0.9 + -ln 0.9 + 2 x -ln 0.8
        (-7 * LN(0.8) - LN(0.5) - 4 * LN(0.9) - 2 * LN(0.8)) / 14,
        id="hand-2x6-any-weight-2",
    ),
    pytest.param(
        [[0, 0, 0, 0, 0, 1]], [[0.0] * 6], (2 * -LN(1e-7) + 5 * NEG_LN_1M_EPS) / 7, id="confident-miss-on-any"
    ),
    pytest.param(
        [[1, 0, 0, 0, 0, 0]], [[0.0] * 6], (-LN(1e-7) + 6 * NEG_LN_1M_EPS) / 7, id="confident-miss-epidural"
    ),
    pytest.param(np.eye(6), np.eye(6), NEG_LN_1M_EPS, id="perfect-clipped-to-eps"),
]


@pytest.mark.parametrize(("y_true", "y_pred", "expected"), HAND_CASES)
def test_weighted_log_loss_by_hand(y_true: Any, y_pred: Any, expected: float) -> None:
    assert weighted_log_loss(y_true, y_pred) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_perfect_prediction_is_at_the_eps_level() -> None:
    assert 1e-7 < weighted_log_loss(np.eye(6), np.eye(6)) < 1.0000001e-7


def test_eps_argument_changes_the_clip() -> None:
    y, p = [[0, 0, 0, 0, 0, 1]], [[0.0] * 6]
    expected = (2 * -LN(1e-3) + 5 * -math.log1p(-1e-3)) / 7
    assert weighted_log_loss(y, p, eps=1e-3) == pytest.approx(expected, rel=1e-12)


def test_dataframes_are_aligned_by_column_name() -> None:
    y = pd.DataFrame([[0, 0, 0, 0, 0, 1]], columns=list(LABELS))
    p = pd.DataFrame([[0.9, 0.5, 0.5, 0.5, 0.5, 0.5]], columns=list(LABELS))
    reversed_p = p[list(reversed(LABELS))]
    expected = (-LN(0.1) + 4 * LN(2) + 2 * LN(2)) / 7
    assert weighted_log_loss(y, reversed_p) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        (
            np.zeros((2, 5)),
            np.zeros((2, 5)),
            r"y_true must have shape \(N, 6\) in LABELS order; got \(2, 5\)",
        ),
        (np.zeros(6), np.zeros(6), r"y_true must have shape \(N, 6\) .*got \(6,\)"),
        (np.zeros((2, 6)), np.zeros((2, 7)), r"y_pred must have shape \(N, 6\) .*got \(2, 7\)"),
        (np.zeros((2, 6)), np.zeros((3, 6)), r"differ in shape: \(2, 6\) vs \(3, 6\)"),
        (np.zeros((0, 6)), np.zeros((0, 6)), r"empty \(0 rows\)"),
        (
            np.zeros((2, 6)),
            [[0.5] * 6, [0.5] * 5 + [np.nan]],
            r"y_pred contains NaN in 1 rows \(first: row 1\)",
        ),
        ([[np.nan] * 6], [[0.5] * 6], r"y_true contains NaN in 1 rows \(first: row 0\)"),
        (np.zeros((1, 6)), [[0.5] * 5 + [1.5]], r"y_pred has values outside \[0, 1\] \(min 0\.5, max 1\.5\)"),
        ([[0] * 5 + [-1]], np.zeros((1, 6)), r"y_true has values outside \[0, 1\]"),
    ],
)
def test_weighted_log_loss_rejects(y_true: Any, y_pred: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_log_loss(y_true, y_pred)


def test_per_label_log_loss_is_unweighted() -> None:
    y = [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]]
    p = [[0.5, 0.5, 0.5, 0.5, 0.5, 0.8], [0.5, 0.5, 0.5, 0.5, 0.5, 0.4]]
    got = per_label_log_loss(y, p)
    assert list(got.index) == list(LABELS)
    np.testing.assert_allclose(got.to_numpy(), [LN(2)] * 5 + [-(LN(0.8) + LN(0.4)) / 2], rtol=1e-12)


def _columns(t: list[float], p: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Put one (y, p) pair in every label column, except epidural (all 0) and subdural (all 1)."""
    y_true, y_pred = np.tile(np.array(t)[:, None], 6), np.tile(np.array(p)[:, None], 6)
    y_true[:, 0], y_true[:, 4] = 0, 1
    return y_true, y_pred


@pytest.mark.parametrize(
    ("t", "p", "auc"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),
        ([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1], 0.0),
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),
        ([1, 0, 0, 0], [0.3, 0.3, 0.1, 0.5], 0.5),  # tie counts half: (1 + 0.5 + 0) / 3
    ],
)
def test_per_label_auc_known_values(t: list[float], p: list[float], auc: float) -> None:
    got = per_label_auc(*_columns(t, p))
    assert list(got.index) == list(LABELS)
    assert list(got.columns) == ["auc", "note"]
    for label in ("intraparenchymal", "intraventricular", "subarachnoid", "any"):
        assert got.loc[label, "auc"] == pytest.approx(auc, abs=1e-12)
        assert got.loc[label, "note"] == ""
    assert got["auc"].isna().tolist() == [True, False, False, False, True, False]
    assert got.loc["epidural", "note"] == "only one class present (all 0)"
    assert got.loc["subdural", "note"] == "only one class present (all 1)"


def test_score_table_rows_and_values() -> None:
    y_true, y_pred = _columns([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    table = score_table(y_true, y_pred)
    assert list(table.index) == [*LABELS, "weighted"]
    assert list(table.columns) == ["log_loss", "auc", "prevalence", "note"]
    assert table.loc["weighted", "log_loss"] == pytest.approx(weighted_log_loss(y_true, y_pred), rel=1e-12)
    expected_any = -(LN(0.9) + LN(0.6) + LN(0.35) + LN(0.8)) / 4
    assert table.loc["any", "log_loss"] == pytest.approx(expected_any, rel=1e-12)
    assert table.loc["any", "auc"] == pytest.approx(0.75)
    assert table["prevalence"].iloc[:6].tolist() == [0.0, 0.5, 0.5, 0.5, 1.0, 0.5]
    assert table["auc"].isna().tolist() == [True, False, False, False, True, False, True]
    assert table["prevalence"].isna().tolist() == [False] * 6 + [True]
    assert table.loc["epidural", "note"] == "only one class present (all 0)"
    assert table.loc["weighted", "note"] == "Kaggle metric: weights 1, 1, 1, 1, 1, 2"


# (y_true, y_pred, n_bins) -> ECE, by hand: every (image, label) pair is one prediction
@pytest.mark.parametrize(("y_true", "y_pred", "n_bins", "ece"), [
    ([[1, 0, 0, 0, 0, 1]], [[0.5] * 6], 2, 1 / 6),          # one bin: mean p 0.5, frequency 2/6
    ([[1, 1, 1, 0, 0, 0]], [[1, 1, 1, 0, 0, 0]], 15, 0.0),   # perfect and certain
    ([[0, 0, 0, 0, 0, 0]], [[0.9] * 6], 15, 0.9),            # over-confident: 0.9 where none are positive
    ([[1, 1, 1, 0, 0, 0]], [[0.9, 0.9, 0.9, 0.1, 0.1, 0.1]], 10, 0.1),  # two bins, each 0.1 off
    ([[1, 0, 1, 0, 1, 0]], [[1.0, 1.0, 0.0, 0.0, 0.5, 0.5]], 1, 0.0),  # one bin hides the errors
])
def test_expected_calibration_error_by_hand(y_true: Any, y_pred: Any, n_bins: int, ece: float) -> None:
    from ichdet.metrics import expected_calibration_error

    assert expected_calibration_error(np.array(y_true), np.array(y_pred), n_bins) == pytest.approx(ece, abs=1e-12)


def test_expected_calibration_error_rejects_zero_bins() -> None:
    from ichdet.metrics import expected_calibration_error

    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        expected_calibration_error(np.zeros((1, 6)), np.zeros((1, 6)), n_bins=0)
