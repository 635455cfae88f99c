"""The evaluation of predictions against labels (``ichdet evaluate``): tables and plots.

``evaluate`` scores predictions at slice level (the Kaggle metric, per-label log loss and AUC,
calibration, operating points at a target sensitivity) and, when the cache index tells which study
each image belongs to, at study level (a study is positive when any slice is; its score is its
highest slice score), with bootstrap 95% confidence intervals resampled by study. The plots (ROC
curves, reliability diagram) are separate functions so a failed plot never hides a score.
The HTML study report is a separate part of this module (added with ``predict-study``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ichdet.cache.labels import LABELS, read_labels
from ichdet.errors import IchdetError
from ichdet.evaluate.ensembling import load_prediction_table
from ichdet.evaluate.metrics import (
    bootstrap_ci,
    expected_calibration_error,
    operating_points,
    per_label_auc,
    reliability_table,
    score_table,
    study_level,
    weighted_log_loss,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Evaluation", "evaluate", "plot_reliability", "plot_roc", "study_ids", "write_plots"]


@dataclass(frozen=True)
class Evaluation:
    """Everything ``ichdet evaluate`` reports; ``studies`` and ``study_points`` are None at slice level only."""

    slices: pd.DataFrame  # score_table: log_loss, auc, prevalence, note per label + weighted
    ece: float
    operating: pd.DataFrame  # operating_points at slice level
    studies: pd.DataFrame | None  # score_table over studies
    study_points: pd.DataFrame | None  # operating_points over studies
    ci: pd.DataFrame  # index: metric; columns value, low, high
    sensitivity: float
    grouping: str  # how the bootstrap resampled: "study" or "image"
    y_true: np.ndarray
    y_pred: np.ndarray

    def lines(self) -> list[str]:
        """The printed report: tables with 4 decimals, each titled."""
        def fmt(table: pd.DataFrame) -> str:
            return table.to_string(float_format=lambda v: f"{v:.4f}")

        out = [f"slice level ({len(self.y_true)} images)", fmt(self.slices),
               f"expected calibration error (15 bins, all labels pooled): {self.ece:.4f}",
               f"operating points at sensitivity >= {self.sensitivity:g} (slice level)", fmt(self.operating)]
        if self.studies is not None and self.study_points is not None:
            out += ["study level (positive when any slice is; score = max over slices)", fmt(self.studies),
                    f"operating points at sensitivity >= {self.sensitivity:g} (study level)", fmt(self.study_points)]
        else:
            out.append("study level: not computed (give --data CACHE so images can be grouped into studies)")
        out += [f"bootstrap 95% confidence intervals (resampling by {self.grouping})", fmt(self.ci)]
        return out


def study_ids(cache: str | Path, image_ids: pd.Index) -> np.ndarray:
    """The study of each image, from the cache's ``index.parquet`` (column ``study_uid``)."""
    path = Path(cache) / "index.parquet"
    if not path.is_file():
        raise IchdetError(f"{cache}: no index.parquet; --data takes a cache folder from `ichdet preprocess`")
    try:
        index = pd.read_parquet(path, columns=["image_id", "study_uid"]).drop_duplicates("image_id")
    except (OSError, ValueError, KeyError) as err:
        raise IchdetError(f"{path}: cannot read image_id and study_uid ({err}); rebuild the cache") from None
    studies = index.set_index("image_id")["study_uid"].reindex(image_ids)
    if studies.isna().any():
        raise IchdetError(f"{cache}: {int(studies.isna().sum())} labelled images are not in its index (e.g. "
                          f"{list(studies.index[studies.isna()][:3])}); give the cache built from those images")
    return studies.to_numpy(dtype=str)


def _any_auc(t: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of ``any`` (NaN when a resample holds one class); only that column, as it runs per resample."""
    from sklearn.metrics import roc_auc_score

    col = LABELS.index("any")
    if len(np.unique(t[:, col])) < 2:
        return float("nan")
    return float(roc_auc_score(t[:, col], p[:, col]))


def _intervals(t: np.ndarray, p: np.ndarray, groups: np.ndarray, studies: tuple[np.ndarray, np.ndarray] | None,
               n: int, seed: int) -> pd.DataFrame:
    """value, low, high of the headline metrics; slice metrics resampled by ``groups``."""
    metrics: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], np.ndarray, np.ndarray, np.ndarray]] = {
        "slice weighted log loss": (weighted_log_loss, t, p, groups),
        "slice AUC any": (_any_auc, t, p, groups),
        "slice ECE": (expected_calibration_error, t, p, groups),
    }
    if studies is not None:
        st, sp = studies
        metrics["study AUC any"] = (_any_auc, st, sp, np.arange(len(st)))
    rows = {}
    for name, (fn, mt, mp, g) in metrics.items():
        low, high = bootstrap_ci(fn, mt, mp, g, n=n, seed=seed)
        rows[name] = {"value": fn(mt, mp), "low": low, "high": high}
    return pd.DataFrame.from_dict(rows, orient="index")


def evaluate(pred: str | Path, labels_csv: str | Path, data: str | Path | None = None, sensitivity: float = 0.95,
             n_boot: int = 1000, seed: int = 0) -> Evaluation:
    """Score predictions (prediction parquet, a run's oof.parquet, submission or wide CSV) against labels.

    Only labelled images are scored; if any lacks a prediction the scoring refuses, since a partial
    score would look better than it is. ``data`` (a cache folder) groups images into studies.
    """
    if not 0.0 < sensitivity <= 1.0:
        raise IchdetError(f"--sensitivity {sensitivity}: give a fraction in (0, 1], e.g. 0.95")
    if n_boot < 1:
        raise IchdetError(f"--bootstrap {n_boot}: give a number of resamples >= 1, e.g. 1000")
    probs, truth = load_prediction_table(pred), read_labels(labels_csv)
    if truth.empty:
        raise IchdetError(f"{labels_csv}: holds no labelled images")
    missing = truth.index.difference(probs.index)
    if len(missing):
        raise IchdetError(f"{pred} has no prediction for {len(missing)} labelled images "
                          f"(e.g. {list(missing[:3])}); predict on the cache built from those images")
    t = truth[list(LABELS)].to_numpy(np.float64)
    p = probs.loc[truth.index, list(LABELS)].to_numpy(np.float64)
    groups = study_ids(data, truth.index) if data is not None else truth.index.to_numpy(dtype=str)
    studies = study_level(t, p, groups) if data is not None else None
    return Evaluation(
        slices=score_table(t, p), ece=expected_calibration_error(t, p),
        operating=operating_points(t, p, sensitivity),
        studies=score_table(*studies) if studies else None,
        study_points=operating_points(*studies, sensitivity) if studies else None,
        ci=_intervals(t, p, groups, studies, n_boot, seed), sensitivity=sensitivity,
        grouping="study" if data is not None else "image (no --data: slices of one study are not independent)",
        y_true=t, y_pred=p)


def _save(fig: Figure, path: str | Path) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    from ichdet.io import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def _axes() -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 6))


def plot_roc(y_true: np.ndarray, y_pred: np.ndarray, path: str | Path) -> Path:
    """ROC curves of the six labels in one PNG (labels with one class are left out, and say so)."""
    from sklearn.metrics import roc_curve

    table = per_label_auc(y_true, y_pred)
    notes, aucs = table["note"].tolist(), table["auc"].to_numpy()
    fig, ax = _axes()
    for i, name in enumerate(LABELS):
        if notes[i]:
            ax.plot([], [], " ", label=f"{name}: {notes[i]}, no curve")
            continue
        fpr, tpr, _ = roc_curve(y_true[:, i], y_pred[:, i])
        ax.plot(fpr, tpr, label=f"{name} (AUC {aucs[i]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC per label")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(y_true: np.ndarray, y_pred: np.ndarray, path: str | Path, n_bins: int = 15) -> Path:
    """Reliability diagram: per label, the fraction of positives against the mean prediction per bin."""
    fig, ax = _axes()
    for i, name in enumerate(LABELS):
        table = reliability_table(y_true[:, i], y_pred[:, i], n_bins)
        ece = expected_calibration_error(y_true[:, i], y_pred[:, i], n_bins)
        ax.plot(table["mean_pred"], table["frac_pos"], "o-", ms=3,
                label=f"{name} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="fraction positive",
           title=f"Reliability ({n_bins} bins)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def write_plots(result: Evaluation, roc: str | Path, reliability: str | Path) -> list[str]:
    """Write the ROC and reliability PNGs; returns one message per plot that could not be written.

    A plot that fails (unwritable folder, full disk) does not stop the other: the caller has the
    scores already and reports the failures after them.
    """
    failures = []
    for plot, path in ((plot_roc, roc), (plot_reliability, reliability)):
        try:
            plot(result.y_true, result.y_pred, path)
        except OSError as err:
            failures.append(f"{path}: {err.strerror or err}")
    return failures
