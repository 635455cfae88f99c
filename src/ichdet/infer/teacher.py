"""A bundle's ensemble as a teacher: the soft targets ``ichdet distill`` trains a student on.

Where the bundle's runs were trained on the distillation cache, their in-sample predictions are
over-confident (each network has seen the image and its label), so the targets should be the
ensemble's out-of-fold predictions: each image predicted by the folds that held it out. A bundle stores
no out-of-fold predictions, so they come from the run folders the bundle was built from (``--run``,
each with the ``oof.parquet`` that ``train --fold all`` or ``seq train`` writes), ensembled with the
bundle's weights (:func:`ichdet.infer.bundle.ensemble_oof`; a sequence member's OOF comes the same
way). Without ``--run``, the targets are the bundle's predictions of the cache (flip TTA, as
``predict``), and :class:`TeacherTargets` says they are in-sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichdet.cache.store import PixelCache
from ichdet.errors import IchdetError
from ichdet.infer.bundle import ensemble_oof, load_ensemble
from ichdet.infer.members import Ensemble, runs_ensemble
from ichdet.infer.predict import ensemble_probs
from ichdet.models.engine import init_runtime
from ichdet.names import LABELS

__all__ = ["IN_SAMPLE_WARNING", "TeacherTargets", "student_config", "teacher_targets"]

#: What the warning says when the targets are in-sample predictions.
IN_SAMPLE_WARNING = ("soft targets are the bundle's in-sample predictions of the cache: where its runs were "
                     "trained on it they are over-confident; pass the runs' folders with --run to use their "
                     "out-of-fold predictions")


@dataclass(frozen=True)
class TeacherTargets:
    """Per cache row the teacher's probabilities (float32 (N, 6); NaN where it gave none) and where they came from."""

    probs: np.ndarray
    source: str
    bundle_sha256: str
    out_of_fold: bool

    def record(self) -> dict[str, Any]:
        """What a distilled run records of its teacher (``distill.json``)."""
        return {"bundle_sha256": self.bundle_sha256, "targets": self.source, "out_of_fold": self.out_of_fold}


def _oof_targets(ens: Ensemble, runs: Sequence[Path], cache: PixelCache) -> np.ndarray:
    """The bundle members' out-of-fold predictions, from run folders of the same names, weighted as in the bundle."""
    by_name = {Path(r).resolve().name: Path(r) for r in runs}
    names = [m.name for m in ens.members]
    if sorted(by_name) != sorted(names):
        raise IchdetError(f"--run folders {sorted(by_name)} are not the bundle's members {sorted(names)}; pass the "
                          "run folder of every member (its out-of-fold predictions are the soft targets)")
    members = runs_ensemble([by_name[n] for n in names], {m.name: m.weight for m in ens.members}).members
    return ensemble_oof(members).reindex(cache.index["image_id"])[list(LABELS)].to_numpy(np.float32)


def student_config(bundle: Path) -> dict[str, Any]:
    """The config (as a tree) of the bundle's first 2D member, or of its first sequence member's first base."""
    ens = load_ensemble(Path(bundle))
    first = next((m for m in ens.members if m.kind == "2d"), None) or ens.members[0].image_members()[0]
    return first.run_config.model_dump(mode="json")


def teacher_targets(bundle: Path, data: Path, runs: Sequence[Path] = (), device: str = "auto",
                    tta: bool = True) -> TeacherTargets:
    """The soft targets of every image of cache ``data`` (see module doc)."""
    ens = load_ensemble(Path(bundle))
    cache = PixelCache(data)
    sha = str(ens.manifest["bundle_sha256"])
    if runs:
        return TeacherTargets(_oof_targets(ens, runs, cache), "out-of-fold predictions of the runs "
                              + ", ".join(str(r) for r in runs), sha, True)
    rt = init_runtime(device)
    probs = ensemble_probs(ens.members, cache, rt.device, tta, num_workers=0)
    combined = ens.combine([p.mean(0) for p in probs]).astype(np.float32)
    return TeacherTargets(combined, "in-sample predictions of the bundle", sha, False)

