"""Patient-grouped, label-stratified k-fold assignment.

Every image of a patient lands in the same fold (slices of one head are near-duplicates; splitting a
patient across folds leaks). Within that constraint the folds get about the same number of images and
about the same number of positive images for each label.

Algorithm (greedy multi-label stratification, in the spirit of Sechidis et al. 2011 "iterative
stratification" and of longest-processing-time-first scheduling):

1. Per patient, a feature vector ``F``: positive images per label (NaN labels count as 0) and the
   image count. Each feature is normalised by its per-fold target ``total / n_folds``, so a value of 1
   means "a whole fold's share".
2. Patients are ordered by their total normalised weight, heaviest first: carriers of rare labels and
   many-positive patients go first, while every fold still has room; the many small negative patients
   come last and even out the image counts. Patients of similar weight are taken in blocks of
   ``n_folds`` whose inner order is shuffled with the seed (ties too), so seeds give different
   assignments while the quality of the heaviest-first order is kept.
3. Each patient joins the fold that minimises ``sum_j (load_fj + F_j)^2`` over the features it carries
   (its labels with a positive image, and always its image count): the fold that, after adding it,
   is least loaded on exactly those features, weighting features by how much the patient brings.

It runs one short numpy step per patient: ~0.4-0.7 s for the 19 k patients (752 k images) of RSNA stage 2.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichdet.names import LABELS

__all__ = ["assign_folds"]

PATIENT_COLUMN = "patient_id"


def _check_args(meta: pd.DataFrame, n_folds: int) -> None:
    """ValueError on a bad ``n_folds`` or a ``meta`` without usable patient ids."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if PATIENT_COLUMN not in meta.columns:
        raise ValueError(f"meta needs a {PATIENT_COLUMN!r} column; it has {list(meta.columns)}")
    if meta[PATIENT_COLUMN].isna().any():
        rows = np.flatnonzero(meta[PATIENT_COLUMN].isna().to_numpy())
        raise ValueError(f"{PATIENT_COLUMN} is missing in {len(rows)} rows (first: row {rows[0]})")


def _patient_features(meta: pd.DataFrame, patient: np.ndarray, n_patients: int) -> np.ndarray:
    """(n_patients, n_labels + 1): positive images per label present in ``meta``, then image count."""
    columns = [lab for lab in LABELS if lab in meta.columns]
    labels = meta[columns].apply(pd.to_numeric, errors="raise").to_numpy(dtype=np.float64)
    labels = np.nan_to_num(labels, nan=0.0)  # unlabelled images carry no positives
    if ((labels != 0) & (labels != 1)).any():
        raise ValueError(f"label columns {columns} must hold 0, 1 or NaN")
    sums = [np.bincount(patient, weights=labels[:, j], minlength=n_patients) for j in range(len(columns))]
    sums.append(np.bincount(patient, minlength=n_patients).astype(np.float64))
    return np.stack(sums, axis=1)


def _processing_order(weight: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Patients heaviest first; random order within ties and within blocks of ``n_folds``."""
    shuffled = rng.permutation(len(weight))
    by_weight = shuffled[np.argsort(-weight[shuffled], kind="stable")]
    block = np.arange(len(weight)) // n_folds
    return by_weight[np.lexsort((rng.random(len(weight)), block))]


def _greedy_assign(features: np.ndarray, order: np.ndarray, n_folds: int) -> np.ndarray:
    """Fold of each patient: the one least loaded, after adding it, on the features it carries."""
    load = np.zeros((n_folds, features.shape[1]))
    fold = np.empty(len(features), dtype=np.int64)
    carried = features > 0
    for p in order:
        f = int(np.argmin(np.square(load[:, carried[p]] + features[p, carried[p]]).sum(axis=1)))
        load[f] += features[p]
        fold[p] = f
    return fold


def assign_folds(meta: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold number (0 .. n_folds-1) of each row of ``meta``, grouped by patient, stratified by label.

    Args:
        meta: one row per image, with a ``patient_id`` column and optionally LABELS columns (0/1, or NaN
            for unlabelled images; absent or all-NaN labels: only image counts are balanced).
        n_folds: number of folds, >= 2 and <= the number of patients.
        seed: owns all randomness; the same seed gives the same folds.

    Returns:
        int64 array aligned with ``meta``'s rows. No patient is in two folds; every fold is non-empty.

    Raises:
        ValueError: ``n_folds`` < 2 or more folds than patients, no ``patient_id`` column, missing
            patient ids, label values other than 0/1/NaN.
    """
    _check_args(meta, n_folds)
    patient, uniques = pd.factorize(meta[PATIENT_COLUMN])
    if n_folds > len(uniques):
        raise ValueError(f"n_folds={n_folds} exceeds the number of patients ({len(uniques)})")
    features = _patient_features(meta, patient, len(uniques))
    target = features.sum(axis=0) / n_folds
    normalised = np.divide(features, target, out=np.zeros_like(features), where=target > 0)
    order = _processing_order(normalised.sum(axis=1), n_folds, np.random.default_rng(seed))
    return _greedy_assign(normalised, order, n_folds)[patient]
