"""The Kaggle metric and per-label AUC against values worked out by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ichdet.evaluate.metrics import (
    LABEL_WEIGHTS,
    bootstrap_ci,
    expected_calibration_error,
    operating_points,
    per_label_auc,
    per_label_log_loss,
    reliability_table,
    score_table,
    study_level,
    weighted_log_loss,
)
from ichdet.names import LABELS

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


# one label column, hand-worked: positives 0.9, 0.8, 0.3, 0.2; negatives 0.1, 0.25, 0.5, 0.05
OP_T = [1, 1, 1, 1, 0, 0, 0, 0]
OP_P = [0.9, 0.8, 0.3, 0.2, 0.1, 0.25, 0.5, 0.05]


@pytest.mark.parametrize(("target", "threshold", "sens", "spec"), [
    (0.95, 0.2, 1.0, 0.5),   # all four positives needed: the lowest, 0.2; negatives below it: 0.1, 0.05
    (1.0, 0.2, 1.0, 0.5),
    (0.75, 0.3, 0.75, 0.75),  # 3 of 4 positives: 0.3; negatives 0.1, 0.25, 0.05 below
    (0.5, 0.8, 0.5, 1.0),
    (0.1, 0.9, 0.25, 1.0),    # at least one positive is always kept
])
def test_operating_points_hand_values(target: float, threshold: float, sens: float, spec: float) -> None:
    y_true, y_pred = _columns(OP_T, OP_P)
    table = operating_points(y_true, y_pred, sensitivity=target)
    assert list(table.columns) == ["threshold", "sensitivity", "specificity", "n_pos", "n_neg"]
    assert list(table.index) == list(LABELS)
    row = table.loc["any"]
    assert (row["threshold"], row["sensitivity"], row["specificity"]) == (threshold, sens, spec)
    assert (row["n_pos"], row["n_neg"]) == (4, 4)
    # epidural has no positive: nothing to detect; subdural has no negative: no specificity
    assert table.loc["epidural", ["threshold", "sensitivity", "specificity"]].isna().all()
    assert math.isnan(table.loc["subdural", "specificity"])
    assert table.loc["subdural", "sensitivity"] >= target


def test_operating_point_needs_19_of_20_at_095() -> None:
    # 20 positives scored 0.01..0.20: 95% is 19 of them, so the threshold is the 2nd lowest, 0.02
    p = np.arange(1, 21) / 100
    y_true, y_pred = _columns([1] * 20 + [0], [*p, 0.015])
    row = operating_points(y_true, y_pred).loc["any"]
    assert (row["threshold"], row["sensitivity"], row["specificity"]) == (0.02, 0.95, 1.0)


@pytest.mark.parametrize("target", [0.0, -0.5, 1.01])
def test_operating_points_rejects_target(target: float) -> None:
    with pytest.raises(ValueError, match="sensitivity must be in"):
        operating_points(*_columns(OP_T, OP_P), sensitivity=target)


@pytest.mark.parametrize(("t", "p", "n_bins", "ece"), [
    ([0, 1], [0.2, 0.8], 2, 0.2),
    ([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9], 2, 0.225),  # bins: |0 - 0.4| + |2 - 1.5| over 4
    ([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9], 1, 0.025),  # one bin: |2 - 1.9| / 4
    ([0, 1], [0.0, 1.0], 15, 0.0),                  # 1.0 falls in the last bin
    ([1, 1], [0.5, 0.5], 15, 0.5),
    ([[0, 1], [1, 1]], [[0.2, 0.8], [0.8, 0.8]], 2, 0.2),  # a matrix pools its labels
])
def test_expected_calibration_error_hand_values(t: Any, p: Any, n_bins: int, ece: float) -> None:
    assert expected_calibration_error(t, p, n_bins=n_bins) == pytest.approx(ece, abs=1e-12)


@pytest.mark.parametrize(("t", "p", "n_bins", "match"), [
    ([], [], 15, "non-empty"),
    ([0, 1], [0.5], 15, "one size"),
    ([0], [np.nan], 15, "finite probabilities"),
    ([0], [1.2], 15, "finite probabilities"),
    ([0], [0.5], 0, "n_bins must be >= 1"),
])
def test_expected_calibration_error_rejects(t: Any, p: Any, n_bins: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(t, p, n_bins=n_bins)


def test_reliability_table_bins() -> None:
    table = reliability_table([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9], n_bins=2)
    assert table.index.tolist() == [0, 1]
    assert table["count"].tolist() == [2, 2]
    np.testing.assert_allclose(table["mean_pred"], [0.2, 0.75])
    np.testing.assert_allclose(table["frac_pos"], [0.0, 1.0])


def test_study_level_takes_the_max_per_study() -> None:
    y_true = np.zeros((4, 6))
    y_true[1, 3] = y_true[1, 5] = 1
    y_pred = np.full((4, 6), 0.1)
    y_pred[0, 0], y_pred[2, 1] = 0.7, 0.4
    t, p = study_level(y_true, y_pred, ["s2", "s1", "s2", "s1"])
    # studies in sorted order: s1 (rows 1, 3), s2 (rows 0, 2)
    np.testing.assert_array_equal(t, [[0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(p, [[0.1] * 6, [0.7, 0.4, 0.1, 0.1, 0.1, 0.1]])
    with pytest.raises(ValueError, match="one study id per row"):
        study_level(y_true, y_pred, ["s1"])


def _mean_pred(t: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(p))


def test_bootstrap_ci_resamples_groups() -> None:
    # study a: one slice at 0; study b: three slices at 1. Resampling studies gives means 0, 0.75 or
    # 1 (never 0.25 or 0.5, which resampling slices would give); the 95% interval spans 0 to 1.
    p = np.array([0.0, 1.0, 1.0, 1.0])
    low, high = bootstrap_ci(_mean_pred, np.zeros(4), p, ["a", "b", "b", "b"], n=200, seed=3)
    assert (low, high) == (0.0, 1.0)
    scores = set()
    for seed in range(20):
        scores |= set(bootstrap_ci(_mean_pred, np.zeros(4), p, ["a", "b", "b", "b"], n=1, seed=seed))
    assert scores == {0.0, 0.75, 1.0}


def test_bootstrap_ci_is_seeded_and_one_group_is_exact() -> None:
    rng = np.random.default_rng(0)
    p, groups = rng.random(40), np.repeat(np.arange(10), 4)
    first = bootstrap_ci(_mean_pred, np.zeros(40), p, groups, n=100, seed=1)
    assert first == bootstrap_ci(_mean_pred, np.zeros(40), p, groups, n=100, seed=1)
    assert first != bootstrap_ci(_mean_pred, np.zeros(40), p, groups, n=100, seed=2)
    assert first[0] < float(np.mean(p)) < first[1]
    assert bootstrap_ci(_mean_pred, np.zeros(3), np.full(3, 0.3), ["a"] * 3, n=10) == (0.3, 0.3)


def test_bootstrap_ci_skips_undefined_resamples() -> None:
    from sklearn.metrics import roc_auc_score

    def auc(t: np.ndarray, p: np.ndarray) -> float:
        return float(roc_auc_score(t, p))  # ValueError when a resample holds one class

    t, p = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])
    assert bootstrap_ci(auc, t, p, ["a", "a", "b", "b"], n=50) == (1.0, 1.0)
    low, high = bootstrap_ci(auc, np.zeros(2), p[:2], ["a", "b"], n=5)
    assert math.isnan(low) and math.isnan(high)
# (y_true, y_pred, n_bins) -> ECE, by hand: every (image, label) pair is one prediction
@pytest.mark.parametrize(("y_true", "y_pred", "n_bins", "ece"), [
    ([[1, 0, 0, 0, 0, 1]], [[0.5] * 6], 2, 1 / 6),          # one bin: mean p 0.5, frequency 2/6
    ([[1, 1, 1, 0, 0, 0]], [[1, 1, 1, 0, 0, 0]], 15, 0.0),   # perfect and certain
    ([[0, 0, 0, 0, 0, 0]], [[0.9] * 6], 15, 0.9),            # over-confident: 0.9 where none are positive
    ([[1, 1, 1, 0, 0, 0]], [[0.9, 0.9, 0.9, 0.1, 0.1, 0.1]], 10, 0.1),  # two bins, each 0.1 off
    ([[1, 0, 1, 0, 1, 0]], [[1.0, 1.0, 0.0, 0.0, 0.5, 0.5]], 1, 0.0),  # one bin hides the errors
])
def test_expected_calibration_error_by_hand(y_true: Any, y_pred: Any, n_bins: int, ece: float) -> None:
    from ichdet.evaluate.metrics import expected_calibration_error

    assert expected_calibration_error(np.array(y_true), np.array(y_pred), n_bins) == pytest.approx(ece, abs=1e-12)


def test_expected_calibration_error_rejects_zero_bins() -> None:
    from ichdet.evaluate.metrics import expected_calibration_error

    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        expected_calibration_error(np.zeros((1, 6)), np.zeros((1, 6)), n_bins=0)
