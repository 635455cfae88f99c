"""Ensembling (the seed's rule: mean over the folds of each model, then over the models) and its files.

Prediction files are read with every number checked (finite, in [0, 1]) and every member checked
(each fold of a model covers the same images), so a bad member is refused by name instead of being
dropped by a mean or clipped. The result is written as a Kaggle submission when every image id is a
Kaggle id, and as a plain wide CSV (``image_id`` + the six labels) otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ichdet.cache.labels import (
    IMAGE_ID_PATTERN,
    LABELS,
    read_submission,
    to_long,
    validate_submission,
    write_submission,
)
from ichdet.errors import IchdetError
from ichdet.io import atomic_path

__all__ = ["OOF_FOLD", "check_probabilities", "ensemble", "is_kaggle_ids", "load_prediction_table",
           "read_predictions", "read_wide_csv", "shares", "table_weights", "write_ensemble"]

_KEYS = ("image_id", "model", "fold")
OOF_FOLD = -1
"""The fold a run's own ``oof.parquet`` gets when read: one member that holds each image once."""
WIDE_HEADER = ("image_id", *LABELS)


def check_probabilities(frame: pd.DataFrame, source: str, rows: str = "row") -> None:
    """Raise IchdetError unless every LABELS column of ``frame`` holds finite numbers in [0, 1].

    The message names ``source``, the first bad row (``rows`` says what a row is) with its image id,
    the label and the value.
    """
    text = [c for c in LABELS if not pd.api.types.is_numeric_dtype(frame[c])]
    if text:
        raise IchdetError(f"{source}: columns {text} are not numeric; predictions are probabilities in [0, 1]")
    values = frame[list(LABELS)].to_numpy(dtype=np.float64)
    bad = ~((values >= 0) & (values <= 1))  # NaN and inf fail too
    if bad.any():
        row, col = np.argwhere(bad)[0]
        image = frame["image_id"].iloc[row] if "image_id" in frame.columns else frame.index[row]
        raise IchdetError(f"{source}: {int(bad.sum())} values are not probabilities in [0, 1], first at {rows} "
                          f"{row + 1} (image {image!r}), label {LABELS[col]!r}: {float(values[row, col])!r}. "
                          "Fix: predict again; a probability must be a finite number in [0, 1]")


def _read_parquet(path: Path) -> pd.DataFrame:
    """One prediction parquet: ``ichdet predict`` output, or a run's ``oof.parquet`` (as one member)."""
    if path.is_dir():
        raise IchdetError(f"{path} is a folder; give the prediction parquet (e.g. RUN/oof.parquet)")
    try:
        part = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        if not path.exists():
            raise IchdetError(f"{path}: no such file") from None
        raise IchdetError(f"{path}: not a parquet file ({err}); give an `ichdet predict` output") from None
    if "model" not in part.columns and {"image_id", "fold"} <= set(part.columns):
        # a run's out-of-fold table: each image once, predicted by the fold that held it out
        part = part.assign(model=path.resolve().parent.name, fold=OOF_FOLD)
    missing = [c for c in (*_KEYS, *LABELS) if c not in part.columns]
    if missing:
        raise IchdetError(f"{path}: not an `ichdet predict` output or oof.parquet, columns {missing} are missing")
    if part.empty:
        raise IchdetError(f"{path}: holds no predictions (0 rows); predict on a cache with images")
    check_probabilities(part, str(path))
    return part


def read_predictions(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate prediction parquets (columns image_id, model, fold, LABELS), each value checked.

    A run's ``oof.parquet`` (no ``model`` column) is read as the model named by its run folder with
    fold :data:`OOF_FOLD`.
    """
    if not paths:
        raise IchdetError("no prediction files given")
    preds = pd.concat([_read_parquet(Path(p)) for p in paths], ignore_index=True)
    dup = preds.duplicated(list(_KEYS))
    if dup.any():
        raise IchdetError(f"the same (image, model, fold) occurs twice in {list(map(str, paths))}, e.g. "
                          f"{preds.loc[dup, list(_KEYS)].iloc[0].tolist()}; pass each prediction file once")
    return preds


def _check_folds(preds: pd.DataFrame) -> None:
    """Every fold of a model must cover the same images (a fold mean over fewer folds is a silent gap)."""
    for model, part in preds.groupby("model", sort=True):
        sets = {fold: frozenset(ids) for fold, ids in part.groupby("fold")["image_id"]}
        first_fold, first = next(iter(sets.items()))
        for fold, ids in sets.items():
            if ids != first:
                only = sorted(ids ^ first)[:3]
                raise IchdetError(f"model {model!r}: fold {fold!r} and fold {first_fold!r} predicted different images "
                                  f"({len(ids ^ first)} differ, e.g. {only}); predict every fold on the same cache")


def table_weights(preds: pd.DataFrame) -> dict[str, float] | None:
    """The ensemble weight of each model carried by the predictions (column ``weight``, written by
    ``ichdet predict --bundle``), or None when they carry none.

    IchdetError when some models carry a weight and others none (tables of a bundle mixed with tables
    of runs), or a model carries several: then the weights must be given (``--weight``)."""
    if "weight" not in preds.columns:
        return None
    per_model = preds.groupby("model", sort=True)["weight"]
    missing = sorted(str(m) for m, n in per_model.count().items() if n == 0)
    if missing:
        raise IchdetError(f"models {missing} carry no ensemble weight, the others their bundle's; pass "
                          "--weight model=number for every model to ensemble tables of different sources")
    several = {str(m): sorted(set(v.dropna())) for m, v in per_model if v.isna().any() or v.nunique() > 1}
    if several:
        raise IchdetError(f"models carry more than one ensemble weight: {several}; pass --weight model=number "
                          "for every model")
    return {str(m): float(v) for m, v in per_model.first().items()}


def shares(weights: Mapping[str, float]) -> dict[str, float]:
    """Each weight's share of their sum, without overflow: scaled by the largest first (weights near the
    float maximum would sum to inf and every share be 0)."""
    top = max(weights.values())
    scaled = {m: v / top for m, v in weights.items()}
    total = math.fsum(scaled.values())
    return {m: v / total for m, v in scaled.items()}


def _weights(models: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Validated model weights: one per model, finite and >= 0, not all zero."""
    w = dict.fromkeys(models, 1.0) if weights is None else dict(weights)
    if set(w) != set(models):
        raise IchdetError(f"ensemble weights name models {sorted(w)}, predictions hold {sorted(models)}")
    bad = {m: v for m, v in w.items() if not (np.isfinite(v) and v >= 0)}
    if bad:
        raise IchdetError(f"ensemble weights must be finite numbers >= 0; got {bad}")
    if sum(w.values()) <= 0:
        raise IchdetError(f"ensemble weights are all zero ({w}); give at least one model a weight > 0")
    return w


def ensemble(preds: pd.DataFrame, weights: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Wide table image_id x LABELS: mean over folds per model, then (weighted) mean over models.

    The weights are ``weights`` if given, else those the predictions carry (:func:`table_weights`: a
    bundle's), else equal. Every model must cover the same images, and every fold of a model the same
    images as its other folds, so no image is averaged over fewer members than another.
    """
    check_probabilities(preds, "predictions")
    _check_folds(preds)
    # in float64 (tables hold float32), as predict-study combines members: the two give the same numbers
    values = preds[["model", "image_id"]].join(preds[list(LABELS)].astype(np.float64))
    per_model = values.groupby(["model", "image_id"], sort=True)[list(LABELS)].mean()
    models = list(per_model.index.get_level_values("model").unique())
    w = _weights(models, weights if weights is not None else table_weights(preds))
    images = [set(per_model.loc[m].index) for m in models]
    if any(s != images[0] for s in images):
        raise IchdetError("models predicted different image sets; predict every model on the same cache")
    share = shares(w)
    out = sum(per_model.loc[m] * share[m] for m in models)
    assert isinstance(out, pd.DataFrame)
    out.index.name = "image_id"
    return out


def is_kaggle_ids(ids: pd.Index | pd.Series) -> bool:
    """True when every id reads ``ID_<alphanumeric>`` (a Kaggle image id, the only kind a submission takes)."""
    return bool(pd.Series(ids, dtype=str).str.fullmatch(IMAGE_ID_PATTERN).all())


def read_wide_csv(path: str | Path) -> pd.DataFrame:
    """A wide prediction CSV (``image_id`` + LABELS, as :func:`write_ensemble` writes for non-Kaggle ids)."""
    try:
        frame = pd.read_csv(path, dtype={"image_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise IchdetError(f"{path}: not a readable CSV ({err})") from None
    if tuple(frame.columns) != WIDE_HEADER:
        raise IchdetError(f"{path}: header is {list(frame.columns)}, expected {list(WIDE_HEADER)} "
                          "(or a Kaggle submission with header ID,Label)")
    if frame.empty:
        raise IchdetError(f"{path}: holds no predictions (0 rows)")
    check_probabilities(frame, str(path))
    repeated = frame.loc[frame["image_id"].duplicated(), "image_id"]
    if len(repeated):
        raise IchdetError(f"{path}: image ids repeat, e.g. {repeated.iloc[0]!r}; keep one row per image")
    return frame.set_index("image_id")


def load_prediction_table(path: str | Path) -> pd.DataFrame:
    """A wide image_id x LABELS table from a prediction parquet, an oof.parquet, a submission or a wide CSV."""
    path = Path(path)
    if path.suffix == ".parquet":
        return ensemble(read_predictions([path]))
    if not path.is_file():
        raise IchdetError(f"{path}: no such file (expected predictions: .parquet, submission or wide CSV)")
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = f.readline().strip()
    if first.startswith("image_id"):
        return read_wide_csv(path)
    return read_submission(path)


def write_ensemble(wide: pd.DataFrame, path: str | Path, sample_submission: str | Path | None = None) -> str:
    """Write the ensemble: a Kaggle submission when every id is a Kaggle id, else a wide CSV.

    With ``sample_submission`` the submission is checked against it *before* anything is written, so
    a failed check leaves ``path`` as it was; non-Kaggle ids cannot match a sample and are refused.
    Returns what was written: ``"submission"`` or ``"wide"``.
    """
    if is_kaggle_ids(wide.index):
        if sample_submission is not None:
            validate_submission(to_long(wide), sample_submission)
        write_submission(wide, path)
        return "submission"
    if sample_submission is not None:
        raise IchdetError(f"the predictions hold non-Kaggle image ids (e.g. {wide.index[0]!r}), which cannot "
                          f"match {sample_submission}; drop --sample-submission to write a wide prediction CSV")
    check_probabilities(wide, "ensemble")
    with atomic_path(path) as tmp:
        wide[list(LABELS)].to_csv(tmp, index_label="image_id", float_format="%.6g")
    return "wide"
