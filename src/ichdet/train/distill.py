"""``ichdet distill``: one network trained on an ensemble's soft targets mixed with the labels.

The student is an ordinary 2D run trained by :func:`ichdet.train.loop.train` (config, folds,
checkpoints, metrics, resume, lock, out-of-fold predictions): only what it trains on changes. Its
training target for an image is ``alpha * teacher + (1 - alpha) * label``; the weighted binary cross
entropy is linear in the target, so this is exactly ``alpha`` times the loss against the teacher's
probabilities plus ``1 - alpha`` times the loss against the labels. Validation, early stopping and the
out-of-fold predictions score the labels, as for any run, so a student's metrics compare with its
teacher's runs'. The teacher's targets come from :mod:`ichdet.infer.teacher` (the CLI joins the two:
training never imports inference); ``RUN/distill.json`` records them (bundle sha256, source, ``alpha``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ichdet import __version__
from ichdet.cache.store import PixelCache
from ichdet.errors import IchdetError
from ichdet.models.config import Config
from ichdet.models.rundir import plan_run
from ichdet.names import LABELS
from ichdet.train.loop import train

__all__ = ["DISTILL_FILE", "check_distill", "distill", "mix_targets"]

DISTILL_FILE = "distill.json"


def check_alpha(alpha: float) -> None:
    """IchdetError unless ``alpha`` (the teacher's weight) is in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise IchdetError(f"--alpha {alpha} must be in [0, 1] (the weight of the teacher's soft targets)")


def check_distill(cfg: Config, data: str | Path, out: str | Path, alpha: float, fold: str, resume: bool) -> None:
    """Every check of a run that reads only (alpha, folds, an existing run folder or checkpoint), so a
    refused distill costs no teacher predictions."""
    check_alpha(alpha)
    plan_run(cfg, PixelCache(data), out, fold, resume)


def mix_targets(soft: np.ndarray, hard: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * soft + (1 - alpha) * hard`` (float32); rows without a label (NaN) become 0 (never trained on)."""
    check_alpha(alpha)
    mixed = alpha * np.asarray(soft, np.float64) + (1.0 - alpha) * np.asarray(hard, np.float64)
    return np.nan_to_num(mixed, nan=0.0).astype(np.float32)


def _check_targets(soft: np.ndarray, cache: PixelCache) -> None:
    """Every labelled image needs a teacher target in [0, 1]; IchdetError naming how many lack one."""
    labelled = cache.index["fold"].to_numpy() >= 0
    if soft.shape != (len(cache), len(LABELS)):
        raise IchdetError(f"teacher targets have shape {soft.shape}, the cache {len(cache)} images x {len(LABELS)}")
    bad = labelled & ~(np.isfinite(soft) & (soft >= 0) & (soft <= 1)).all(axis=1)
    if bad.any():
        first = cache.index["image_id"].iloc[int(np.flatnonzero(bad)[0])]
        raise IchdetError(f"{int(bad.sum())} labelled images of {cache.root} have no teacher target (first: "
                          f"{first}); the --run folders' out-of-fold predictions must cover the cache they were "
                          "trained on, or leave out --run to use the bundle's predictions")


def _record(alpha: float, teacher: dict[str, Any]) -> dict[str, Any]:
    return {"alpha": alpha, "teacher": teacher, "ichdet_version": __version__}


def _check_resume(run: Path, record: dict[str, Any]) -> None:
    """A resumed student must keep its teacher and ``alpha``: refuse a different one, naming both."""
    path = run / DISTILL_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old.get("alpha") != record["alpha"] or old.get("teacher", {}).get("bundle_sha256") != (
            record["teacher"]["bundle_sha256"]):
        raise IchdetError(f"{run} was distilled with alpha {old.get('alpha')} from bundle "
                          f"{old.get('teacher', {}).get('bundle_sha256')}; this call asks alpha {record['alpha']} "
                          f"from {record['teacher']['bundle_sha256']}. Use the same, or another --out")


def distill(cfg: Config, data: str | Path, out: str | Path, soft: np.ndarray, teacher: dict[str, Any],
            alpha: float = 0.5, fold: str = "all", resume: bool = False,
            progress: bool = True) -> list[dict[str, Any]]:
    """Train the student ``cfg`` on cache ``data`` into run folder ``out`` (see module doc).

    ``soft``: the teacher's probabilities per cache row (N, 6); ``teacher``: its record for ``distill.json``.
    """
    cache = PixelCache(data)
    _check_targets(np.asarray(soft), cache)
    record = _record(alpha, teacher)
    mixed = mix_targets(soft, cache.index[list(LABELS)].to_numpy(np.float64), alpha)
    if Path(out).exists():
        _check_resume(Path(out), record)
    return train(cfg, data, out, fold=fold, resume=resume, progress=progress, targets=mixed,
                 extra_files={DISTILL_FILE: json.dumps(record, indent=2) + "\n"})
