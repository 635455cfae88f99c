"""One prediction call's CNN passes: each (base run, fold, TTA view) runs once, whoever needs its output.

An ensemble's members see pixels through 2D runs: a 2D member through its own CNNs, a sequence member
through its base runs' CNNs (fold ``k``'s feed its fold ``k`` sequence model). A hospital bundle has
both over the same runs, so :class:`FoldPasses` plans one call's needs up front (:func:`plan_needs`):
per 2D run (named by member name, unique in an ensemble; a base shared by several members is one run)
the folds to run, whether its fold probabilities are needed (a 2D member: the mean over the views of
the sigmoid of the logits, as :func:`ichdet.models.engine.predict_batches`) and which feature views are
needed (a sequence member: pooled embedding and logits averaged over the views, as
:func:`ichdet.models.engine.embed_batches`). One forward of a fold's network (:func:`ichdet.models.engine.embed`,
whoever asks) over the image and its mirror (in one batch) gives all of them, so a run predicts the
same numbers alone and inside any mix.

Images are read and windowed once per data setting (image size, windows, slice offsets) per fold
group: every run of that setting and every fold of the group see the same uint8 batch.

Memory: fold probabilities are (N, 6) float32 per (run, fold) and kept for the call. Features are
float32 (N, features + 6), never rounded to float16, so a sequence member predicts exactly what it did
with features of its own. When the features of every fold fit :data:`FEATURE_BUDGET` bytes (always for
a study in ``predict-study`` / ``report``) all folds run in one group: the images are read once per
call. Otherwise (``predict`` over a large cache) each fold is its own group: computed, read by the
sequence members (:meth:`FoldPasses.release` after), and released before the next fold's images are
read again; the CNN passes stay one per (run, fold, view).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ichdet.cache.store import PixelCache
from ichdet.infer.members import Member
from ichdet.infer.onnx_runtime import OnnxEmbedder
from ichdet.models.backbones import input_stats
from ichdet.models.config import Config
from ichdet.models.engine import Normalizer, embed, make_loader, precision
from ichdet.names import LABELS

__all__ = ["FEATURE_BUDGET", "FoldPasses", "RunNeed", "plan_needs"]

#: Bytes of float32 features one call may hold for all folds at once before going fold by fold.
FEATURE_BUDGET = 2 << 30


@dataclass
class RunNeed:
    """What one call needs of one 2D run: its folds, fold probabilities over ``prob_views`` views (0:
    none), and features averaged over each of ``feature_views`` (1: the image, 2: it and its mirror)."""

    run: Member
    folds: set[int] = field(default_factory=set)
    prob_views: int = 0
    feature_views: set[int] = field(default_factory=set)

    @property
    def views(self) -> int:
        """Views each forward carries: the most any consumer averages over."""
        return max([self.prob_views, *self.feature_views])


def plan_needs(members: Sequence[Member], tta: bool) -> dict[str, RunNeed]:
    """Run name -> :class:`RunNeed` of every 2D run the members' pixels go through, in first-use order."""
    needs: dict[str, RunNeed] = {}
    for m in members:
        if m.kind == "2d":
            need = needs.setdefault(m.name, RunNeed(m))
            need.folds.update(m.folds)
            need.prob_views = 2 if tta else 1
            continue
        views = 2 if tta and m.seq_config.features.tta else 1
        for base in m.bases:
            need = needs.setdefault(base.name, RunNeed(base))
            need.folds.update(m.folds)  # fold k's sequence model reads fold k's CNNs only
            need.feature_views.add(views)
    return needs


def data_key(run: Member) -> str:
    """What a run's input depends on (not augmentation, which prediction does not use)."""
    return json.dumps(run.run_config.data.model_dump(mode="json", exclude={"augment"}), sort_keys=True)


def _steps(model: nn.Module, cfg: Config, device: torch.device
           ) -> tuple[nn.Module, Callable[[], AbstractContextManager[Any]]]:
    """A run's input normalisation and autocast: an ONNX graph normalises inside and runs in float32."""
    if isinstance(model, OnnxEmbedder):
        return nn.Identity(), nullcontext
    return (Normalizer(*input_stats(model, cfg.data.in_chans), cfg.train.channels_last).to(device),
            precision(device, cfg.train.amp)[0])


class FoldPasses:
    """A per-call store of fold outputs (probabilities and features), keyed by (run name, fold).

    ``images``: a function giving the images stored at a size (a cache is the same at every size).
    Networks are loaded once per call, on first use. Call :meth:`compute` for a fold group, read with
    :meth:`probs` and :meth:`features`, :meth:`release` the group's features and networks, drop the
    object at the end. ``rows``: the index rows to run (a torchrun rank's shard; default all); outputs
    keep every row's place, the others stay zero.
    """

    def __init__(self, needs: dict[str, RunNeed], images: Callable[[int], PixelCache], device: torch.device,
                 batch_size: int | None, num_workers: int | None, progress: bool,
                 rows: np.ndarray | None = None) -> None:
        self.needs, self.images, self.device = needs, images, device
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.n = len(images(next(iter(needs.values())).run.run_config.data.image_size)) if needs else 0
        self.rows = np.arange(self.n) if rows is None else np.asarray(rows)
        self._models: dict[tuple[str, int], nn.Module] = {}
        self._probs: dict[tuple[str, int], np.ndarray] = {}
        self._features: dict[tuple[str, int, int], np.ndarray] = {}

    def model(self, name: str, fold: int) -> nn.Module:
        """Fold ``fold``'s network of run ``name``, loaded on first use and kept for the call."""
        if (name, fold) not in self._models:
            self._models[name, fold] = self.needs[name].run.load_net(fold, self.device)
        return self._models[name, fold]

    def width(self, name: str, fold: int) -> int:
        """Features per image of run ``name``: its pooled embedding (timm's ``num_features``) and 6 logits."""
        return int(self.model(name, fold).num_features) + len(LABELS)  # type: ignore[arg-type]

    def fold_groups(self) -> list[list[int]]:
        """All folds in one group when their features fit :data:`FEATURE_BUDGET`, else one group per fold."""
        folds = sorted({k for need in self.needs.values() for k in need.folds})
        size = sum(len(need.folds) * len(need.feature_views) * self.width(name, min(need.folds)) * 4 * self.n
                   for name, need in self.needs.items() if need.feature_views)
        return [folds] if size <= FEATURE_BUDGET else [[k] for k in folds]

    def compute(self, folds: Sequence[int]) -> None:
        """Run every needed (run, fold in ``folds``, view) once: one image read per data setting."""
        by_key: dict[str, list[str]] = {}
        for name, need in self.needs.items():
            if need.folds & set(folds):
                by_key.setdefault(data_key(need.run), []).append(name)
        for names in by_key.values():
            self._pass(names, list(folds))

    @torch.inference_mode()
    def _pass(self, names: list[str], folds: list[int]) -> None:
        from ichdet.models.inputs import SliceDataset  # the torch datasets: only where images are read

        runs = [self.needs[n].run.run_config for n in names]
        cache = self.images(runs[0].data.image_size)
        batch = self.batch_size or min(c.train.batch_size * 2 for c in runs)
        workers = min(c.train.num_workers for c in runs) if self.num_workers is None else self.num_workers
        loader = make_loader(SliceDataset(cache, self.rows, runs[0].data), batch, workers, self.device)
        jobs = [(name, k, self.model(name, k)) for name in names for k in folds if k in self.needs[name].folds]
        first = {name: model for name, _, model in reversed(jobs)}  # the folds of a run share its backbone's stats
        steps = {name: _steps(first[name], cfg, self.device) for name, cfg in zip(names, runs, strict=True)}
        for images, _, rows in tqdm(loader, desc="predict", leave=False, disable=not self.progress):
            images = images.to(self.device, non_blocking=True)
            both: torch.Tensor | None = None
            for name, k, model in jobs:
                need = self.needs[name]
                normalize, autocast = steps[name]
                if need.views == 2 and both is None:  # the mirror in the same batch, flipped while still uint8
                    both = torch.cat([images, torch.flip(images, dims=[3])])
                x = normalize(both if need.views == 2 else images)
                with autocast():
                    # one forward for every consumer: a run alone predicts as in a mix
                    out = (model(x) if isinstance(model, OnnxEmbedder) else embed(model, x)).float()
                self._store(need, k, out.view(need.views, len(rows), -1), rows.numpy())

    def _store(self, need: RunNeed, fold: int, views: torch.Tensor, rows: np.ndarray) -> None:
        """Put one batch's outputs (views, B, width) where the consumers read them."""
        name = need.run.name
        if need.prob_views:
            p = torch.sigmoid(views[:need.prob_views, :, -len(LABELS):]).mean(0)
            self._probs.setdefault((name, fold), np.zeros((self.n, len(LABELS)), np.float32))[rows] = p.cpu().numpy()
        for v in need.feature_views:
            f = views[:v].mean(0)
            self._features.setdefault((name, fold, v), np.zeros((self.n, f.shape[1]), np.float32))[rows] = (
                f.cpu().numpy())

    def probs(self, run: Member, fold: int) -> np.ndarray:
        """float32 (N, 6): fold ``fold`` of 2D member ``run`` (flip-TTA averaged when asked)."""
        return self._probs.get((run.name, fold), np.zeros((self.n, len(LABELS)), np.float32))

    def features(self, run: Member, fold: int, views: int) -> np.ndarray:
        """float32 (N, features + 6): fold ``fold`` of base run ``run`` embedding every image over ``views``."""
        found = self._features.get((run.name, fold, views))
        if found is None:
            return np.zeros((self.n, self.width(run.name, fold)), np.float32)
        return found

    def release(self, folds: Sequence[int]) -> None:
        """Drop the features and networks of ``folds`` (the probabilities, small, stay for the call)."""
        for key in [key for key in self._features if key[1] in folds]:
            del self._features[key]
        for name_fold in [key for key in self._models if key[1] in folds]:
            del self._models[name_fold]
