"""Ensembling (the seed's rule: mean over the folds of each model, then over the models) and evaluation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ichdet.errors import IchdetError
from ichdet.labels import LABELS, read_labels, read_submission
from ichdet.metrics import per_label_auc, score_table

_KEYS = ("image_id", "model", "fold")


def read_predictions(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate prediction parquets from ``ichdet predict`` (columns image_id, model, fold, LABELS)."""
    parts = []
    for path in paths:
        part = pd.read_parquet(path)
        missing = [c for c in (*_KEYS, *LABELS) if c not in part.columns]
        if missing:
            raise IchdetError(f"{path}: not an `ichdet predict` output, columns {missing} are missing")
        parts.append(part)
    preds = pd.concat(parts, ignore_index=True)
    dup = preds.duplicated(list(_KEYS))
    if dup.any():
        raise IchdetError(f"the same (image, model, fold) occurs twice in {list(map(str, paths))}, e.g. "
                          f"{preds.loc[dup, list(_KEYS)].iloc[0].tolist()}; pass each prediction file once")
    return preds


def ensemble(preds: pd.DataFrame, weights: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Wide table image_id x LABELS: mean over folds per model, then (weighted) mean over models.

    Every model must cover the same images, so no image is averaged over fewer models than another.
    """
    per_model = preds.groupby(["model", "image_id"], sort=True)[list(LABELS)].mean()
    models = per_model.index.get_level_values("model").unique()
    w = {m: 1.0 for m in models} if weights is None else dict(weights)
    unknown = set(w) - set(models)
    if unknown or not set(models) <= set(w):
        raise IchdetError(f"ensemble weights name models {sorted(w)}, predictions hold {sorted(models)}")
    images = [set(per_model.loc[m].index) for m in models]
    if any(s != images[0] for s in images):
        raise IchdetError("models predicted different image sets; predict every model on the same cache")
    total = sum(w[m] for m in models)
    out = sum(per_model.loc[m] * (w[m] / total) for m in models)
    assert isinstance(out, pd.DataFrame)
    out.index.name = "image_id"
    return out.clip(0.0, 1.0)


def load_prediction_table(path: str | Path) -> pd.DataFrame:
    """A wide image_id x LABELS table from a submission CSV or an ``ichdet predict`` parquet."""
    path = Path(path)
    if path.suffix == ".parquet":
        return ensemble(read_predictions([path]))
    return read_submission(path)


def evaluate(pred: str | Path, labels_csv: str | Path, plot: str | Path | None = None) -> pd.DataFrame:
    """Score predictions against labels (weighted log loss, per-label log loss and AUC).

    Only images present in both are scored; if any labelled image lacks a prediction the scoring
    refuses, since a partial score would look better than it is.
    """
    probs = load_prediction_table(pred)
    truth = read_labels(labels_csv)
    missing = truth.index.difference(probs.index)
    if len(missing):
        raise IchdetError(f"{pred} has no prediction for {len(missing)} labelled images "
                          f"(e.g. {list(missing[:3])}); predict on the cache built from those images")
    probs = probs.loc[truth.index]
    y_true, y_pred = truth[list(LABELS)].to_numpy(np.float64), probs[list(LABELS)].to_numpy(np.float64)
    if plot is not None:
        plot_roc(y_true, y_pred, plot)
    return score_table(y_true, y_pred)


def plot_roc(y_true: np.ndarray, y_pred: np.ndarray, path: str | Path) -> Path:
    """ROC curves of the six labels in one PNG (labels with one class are left out, and say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from ichdet.io import atomic_path

    table = per_label_auc(y_true, y_pred)
    notes, aucs = table["note"].tolist(), table["auc"].to_numpy()
    fig, ax = plt.subplots(figsize=(6, 6))
    for i, name in enumerate(LABELS):
        if notes[i]:
            ax.plot([], [], " ", label=f"{name}: {notes[i]}, no curve")
            continue
        fpr, tpr, _ = roc_curve(y_true[:, i], y_pred[:, i])
        ax.plot(fpr, tpr, label=f"{name} (AUC {aucs[i]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC per label")
    ax.legend(loc="lower right", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)
