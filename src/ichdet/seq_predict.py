"""A sequence member's predictions (from a run folder or a bundle alike): the one copy of sequence inference.

For each fold ``k`` of the member, fold ``k``'s CNN of every base run embeds every image (pooled
penultimate features and six logits, flip-TTA averaged when both the caller and the sequence config's
``features.tta`` ask for it), the base runs' features sit side by side in the member's layout order, and
fold ``k``'s sequence model reads each series in slice order. Features stay float32 in memory here:
prediction writes nothing into a base run (a bundle has no folder to write into), and float16's
rounding (the training feature cache's) is far below the model's own noise.

Each series goes through the sequence model alone (a batch of one), so a slice's probability never
depends on which other series are predicted with it: a study predicted on its own (``predict-study``)
gets the numbers a cache of many studies (``predict``) gives it.
"""

from __future__ import annotations

import numpy as np
import torch

from ichdet.engine import Normalizer, embed_batches, make_loader, precision
from ichdet.labels import LABELS
from ichdet.members import Member, load_state
from ichdet.models import build_seq_model, input_stats
from ichdet.predict import Images, images_at
from ichdet.seq import SeriesDataset, series_loader, series_probs, series_rows
from ichdet.store import PixelCache

__all__ = ["base_features", "seq_member_probs", "series_predictions"]


def base_features(base: Member, fold: int, cache: PixelCache, device: torch.device, tta: bool, batch_size: int,
                  num_workers: int, progress: bool = False) -> np.ndarray:
    """float32 (len(cache), features + 6): fold ``fold`` of 2D member ``base`` embedding every image."""
    from ichdet.data import SliceDataset  # the torch datasets: only where images are read

    cfg = base.run_config
    model = base.load_fold(fold, device)
    loader = make_loader(SliceDataset(cache, np.arange(len(cache)), cfg.data), batch_size, num_workers, device)
    normalize = Normalizer(*input_stats(model, cfg.data.in_chans), cfg.train.channels_last).to(device)
    autocast, _ = precision(device, cfg.train.amp)
    rows, feats = embed_batches(model, normalize, loader, device, autocast, tta, progress)
    out = np.zeros((len(cache), feats.shape[1] if len(feats) else 0), np.float32)
    out[rows] = feats
    return out


def series_predictions(model: torch.nn.Module, features: np.ndarray, series: list[np.ndarray],
                       device: torch.device) -> np.ndarray:
    """Sigmoid probabilities (N, 6) of every row of ``features``: each series through ``model`` alone."""
    labels = np.zeros((len(features), len(LABELS)), np.float32)
    rows, probs = series_probs(model, series_loader(SeriesDataset(features, labels, series), 1), device)
    out = np.zeros((len(features), len(LABELS)), np.float32)
    out[rows] = probs
    return out


def seq_member_probs(member: Member, images: Images, device: torch.device, tta: bool = True,
                     num_workers: int | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every fold of sequence member ``member`` over every image: rows (N,), probs (folds, N, 6).

    ``images``: a cache, or a function giving the images stored at a base run's size (a study in
    memory). Series and their slice order come from the cache index (``series_uid``, ``slice_index``).
    """
    cfg = member.seq_config
    caches = [images_at(images, b.run_config.data.image_size) for b in member.bases]
    n = len(caches[0])
    series = series_rows(caches[0].index)
    workers = cfg.features.num_workers if num_workers is None else num_workers
    out = np.zeros((len(member.folds), n, len(LABELS)), np.float32)
    for i, fold in enumerate(member.folds):
        parts = [base_features(b, fold, c, device, tta and cfg.features.tta, cfg.features.batch_size, workers,
                               progress) for b, c in zip(member.bases, caches, strict=True)]
        widths = [p.shape[1] for p in parts]
        model = build_seq_model(cfg.model, sum(widths), [int(s) for s in np.cumsum(widths) - len(LABELS)])
        load_state(model, member.weight_bytes(fold), f"{member.source} member {member.name} fold {fold}")
        out[i] = series_predictions(model.to(device).eval(), np.concatenate(parts, axis=1), series, device)
    return np.arange(n), out
