"""A sequence member's predictions (from a run folder or a bundle alike): the one copy of sequence inference.

For each fold ``k`` of the member, fold ``k``'s CNN of every base run has embedded every image (pooled
penultimate features and six logits, flip-TTA averaged when both the caller and the sequence config's
``features.tta`` ask for it; :class:`ichdet.infer.passes.FoldPasses` runs each CNN once per call, shared with
a 2D member of the same run), the base runs' features sit side by side in the member's layout order,
and fold ``k``'s sequence model reads each series in slice order. Features stay float32 in memory here:
prediction writes nothing into a base run (a bundle has no folder to write into), and float16's
rounding (the training feature cache's) is far below the model's own noise.

Each series goes through the sequence model alone (a batch of one), so a slice's probability never
depends on which other series are predicted with it: a study predicted on its own (``predict-study``)
gets the numbers a cache of many studies (``predict``) gives it.
"""

from __future__ import annotations

import numpy as np
import torch

from ichdet.infer.members import Member, load_state
from ichdet.infer.onnx_runtime import OnnxSequence
from ichdet.infer.passes import FoldPasses
from ichdet.models.backbones import build_seq_model
from ichdet.models.sequence import SeriesDataset, series_loader, series_probs
from ichdet.names import LABELS

__all__ = ["seq_fold_probs", "series_predictions"]


def series_predictions(model: torch.nn.Module, features: np.ndarray, series: list[np.ndarray],
                       device: torch.device) -> np.ndarray:
    """Sigmoid probabilities (N, 6) of every row of ``features``: each series through ``model`` alone."""
    labels = np.zeros((len(features), len(LABELS)), np.float32)
    rows, probs = series_probs(model, series_loader(SeriesDataset(features, labels, series), 1), device)
    out = np.zeros((len(features), len(LABELS)), np.float32)
    out[rows] = probs
    return out


def seq_fold_probs(member: Member, fold: int, passes: FoldPasses, tta: bool, series: list[np.ndarray],
                   device: torch.device) -> np.ndarray:
    """float32 (N, 6): fold ``fold`` of sequence member ``member`` over the images of ``passes``' call.

    ``series``: index rows of every series in slice order (:func:`ichdet.models.sequence.series_rows`).
    """
    views = 2 if tta and member.seq_config.features.tta else 1
    parts = [passes.features(b, fold, views) for b in member.bases]
    widths = [p.shape[1] for p in parts]
    what = f"{member.source} member {member.name} fold {fold}"
    model: torch.nn.Module
    if member.onnx:
        model = OnnxSequence(member.onnx_bytes(fold), what, device)
    else:
        model = build_seq_model(member.seq_config.model, sum(widths), [int(s) for s in np.cumsum(widths) - len(LABELS)])
        load_state(model, member.weight_bytes(fold), what)
    return series_predictions(model.to(device).eval(), np.concatenate(parts, axis=1), series, device)
