"""Patient-grouped, label-stratified folds: grouping, balance, determinism, errors, speed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from ichdet.cache.folds import assign_folds
from ichdet.names import LABELS

SUBTYPE_GIVEN_BLEED = (0.04, 0.40, 0.30, 0.40, 0.45)


def cohort(n_patients: int, mean_images: int, seed: int, bleed: float = 0.4) -> pd.DataFrame:
    """Synthetic meta: one row per image; each bleed is a run of adjacent slices; rows shuffled."""
    rng = np.random.default_rng(seed)
    sizes = rng.poisson(mean_images - 5, n_patients) + 5
    patient = np.repeat(np.arange(n_patients), sizes)
    position = (np.arange(len(patient)) - np.repeat(np.cumsum(sizes) - sizes, sizes)) / np.repeat(
        sizes, sizes
    )
    has = (rng.random((n_patients, 5)) < SUBTYPE_GIVEN_BLEED) & (rng.random(n_patients) < bleed)[:, None]
    start, length = rng.uniform(0.1, 0.7, (n_patients, 5)), rng.uniform(0.1, 0.45, (n_patients, 5))
    inside = (position[:, None] >= start[patient]) & (position[:, None] < (start + length)[patient])
    sub = (has[patient] & inside).astype(np.uint8)
    meta = pd.DataFrame(np.concatenate([sub, sub.max(axis=1, keepdims=True)], axis=1), columns=list(LABELS))
    meta.insert(0, "patient_id", [f"ID_p{p:05d}" for p in patient])
    return meta.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def fold_counts(meta: pd.DataFrame, folds: np.ndarray, n_folds: int) -> pd.DataFrame:
    """Per fold: positive images per label present, and ``images``."""
    labels = [lab for lab in LABELS if lab in meta.columns]
    counts = meta[labels].fillna(0).groupby(folds).sum().reindex(range(n_folds), fill_value=0)
    return counts.assign(images=pd.Series(folds).value_counts().reindex(range(n_folds), fill_value=0))


def one_patient_tolerance(meta: pd.DataFrame) -> pd.Series:
    """The balance a grouped split can promise: one patient's worth, the largest per column."""
    labels = [lab for lab in LABELS if lab in meta.columns]
    per_patient = meta[labels].fillna(0).groupby(meta["patient_id"]).sum()
    per_patient["images"] = meta["patient_id"].value_counts()
    return per_patient.max().astype(float)


def partly_unlabelled(meta: pd.DataFrame) -> pd.DataFrame:
    """The first 30 % of patients unlabelled (test images): NaN in every label column."""
    patients = meta["patient_id"].unique()
    out = meta.astype({lab: float for lab in LABELS})
    out.loc[out["patient_id"].isin(patients[: len(patients) * 3 // 10]), list(LABELS)] = np.nan
    return out


CASES = [
    pytest.param(cohort(3000, 40, seed=1), 5, 0, 0.02, id="rsna-like-3000-patients"),
    pytest.param(cohort(3000, 40, seed=2), 10, 3, 0.03, id="ten-folds"),
    pytest.param(cohort(400, 30, seed=3, bleed=0.8), 2, 7, 0.02, id="two-folds-many-bleeds"),
    pytest.param(cohort(200, 40, seed=4), 5, 1, None, id="small-cohort"),
    pytest.param(cohort(5, 10, seed=5), 5, 0, None, id="one-patient-per-fold"),
    pytest.param(cohort(2000, 40, seed=6)[["patient_id"]], 5, 0, 0.01, id="no-label-columns"),
    pytest.param(cohort(2000, 40, seed=7).assign(**dict.fromkeys(LABELS, np.nan)), 5, 0, 0.01, id="all-nan"),
    pytest.param(partly_unlabelled(cohort(3000, 40, seed=8)), 5, 2, 0.02, id="partly-unlabelled"),
]


@pytest.mark.parametrize(("meta", "n_folds", "seed", "rel_tol"), CASES)
def test_fold_properties(meta: pd.DataFrame, n_folds: int, seed: int, rel_tol: float | None) -> None:
    folds = assign_folds(meta, n_folds=n_folds, seed=seed)
    assert folds.shape == (len(meta),)
    assert folds.dtype == np.int64
    # every row in a real fold, every fold used, no patient in two folds
    assert set(np.unique(folds)) == set(range(n_folds))
    assert meta.groupby("patient_id").apply(lambda g: folds[g.index].min() == folds[g.index].max()).all()
    # balance: every fold within one patient's worth of the mean, for each label and for image counts
    counts = fold_counts(meta, folds, n_folds)
    deviation = (counts - counts.mean()).abs().max()
    tolerance = one_patient_tolerance(meta)
    assert (deviation <= tolerance[deviation.index]).all(), pd.DataFrame({"dev": deviation, "tol": tolerance})
    # and, for large cohorts, within rel_tol of the mean (labels with >= 200 positives per fold, images)
    if rel_tol is not None:
        large = counts.columns[counts.mean() >= 200]
        relative = deviation[large] / counts.mean()[large]
        assert (relative <= rel_tol).all(), relative


def test_balance_beats_a_random_patient_split() -> None:
    """The stratification must matter: a seeded random patient split is far less even on rare labels."""
    meta = cohort(3000, 40, seed=11)
    patients = meta["patient_id"].unique()
    random_fold = pd.Series(np.random.default_rng(0).integers(0, 5, len(patients)), index=patients)
    ours = fold_counts(meta, assign_folds(meta, 5, seed=0), 5)
    rand = fold_counts(meta, random_fold[meta["patient_id"]].to_numpy(), 5)
    ours_spread, rand_spread = (c.max() - c.min() for c in (ours, rand))
    assert (ours_spread * 3 < rand_spread).all(), (ours_spread, rand_spread)


def test_same_seed_same_folds_other_seed_other_folds() -> None:
    meta = cohort(500, 30, seed=12)
    first = assign_folds(meta, 5, seed=0)
    np.testing.assert_array_equal(first, assign_folds(meta, 5, seed=0))
    for other in (1, 2, 99):
        changed = (first != assign_folds(meta, 5, seed=other)).mean()
        assert changed > 0.3, (other, changed)  # a real reshuffle, not a relabelling of a few patients


def test_rows_align_with_a_non_default_index() -> None:
    meta = cohort(300, 20, seed=13)
    meta.index = pd.Index([f"ID_{i:x}" for i in range(len(meta))], name="image_id")
    folds = assign_folds(meta, 5, seed=0)
    by_patient = pd.Series(folds, index=meta.index).groupby(meta["patient_id"]).nunique()
    assert (by_patient == 1).all()
    np.testing.assert_array_equal(folds, assign_folds(meta.reset_index(drop=True), 5, seed=0))


@pytest.mark.parametrize(
    ("meta", "n_folds", "message"),
    [
        (cohort(10, 5, seed=0), 1, r"n_folds must be an integer >= 2, got 1"),
        (cohort(10, 5, seed=0), 0, r"n_folds must be an integer >= 2, got 0"),
        (cohort(10, 5, seed=0), 2.5, r"n_folds must be an integer >= 2, got 2\.5"),
        (cohort(10, 5, seed=0), True, r"n_folds must be an integer >= 2, got True"),
        (cohort(4, 5, seed=0), 5, r"n_folds=5 exceeds the number of patients \(4\)"),
        (cohort(10, 5, seed=0).drop(columns="patient_id"), 5, r"meta needs a 'patient_id' column; it has \["),
        (
            cohort(10, 5, seed=0).assign(patient_id=lambda d: d["patient_id"].where(d.index != 3)),
            5,
            r"patient_id is missing in 1 rows \(first: row 3\)",
        ),
        (cohort(10, 5, seed=0).assign(any=2), 5, r"label columns \[.*'any'\] must hold 0, 1 or NaN"),
    ],
)
def test_assign_folds_rejects(meta: pd.DataFrame, n_folds: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_folds(meta, n_folds=n_folds, seed=0)


def test_rsna_scale_is_balanced() -> None:
    """~19 k patients, 752 k images: every label within 1 % of the mean (speed: bench/bench_labels_scale.py)."""
    meta = cohort(19_000, 40, seed=14)
    folds = assign_folds(meta, 5, seed=0)
    counts = fold_counts(meta, folds, 5)
    assert ((counts - counts.mean()).abs().max() / counts.mean() <= 0.01).all()
