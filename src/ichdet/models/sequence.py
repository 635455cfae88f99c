"""Series for the sequence model: the slices of each series in z order, padded batches of per-slice features,
and the forward pass that turns them into probabilities (training's validation and inference share it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ichdet.names import LABELS

__all__ = ["SeriesDataset", "collate_series", "series_loader", "series_probs", "series_rows"]


def series_rows(index: pd.DataFrame) -> list[np.ndarray]:
    """Index rows of every series, each in z order (the index's ``slice_index``), series by first row."""
    order = index.sort_values(["series_uid", "slice_index"], kind="stable")
    groups = order.groupby("series_uid", sort=False).indices
    rows = order.index.to_numpy()
    return sorted((rows[g] for g in groups.values()), key=lambda r: int(r[0]))


class SeriesDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """One sample per series: features (L, F) float32, labels (L, 6), index rows (L,)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, series: Sequence[np.ndarray]) -> None:
        self.features, self.labels, self.series = features, labels, list(series)

    def __len__(self) -> int:
        return len(self.series)

    def set_epoch(self, epoch: int) -> None:
        """Nothing per sample is random (the sampler shuffles series); the trainer's loop calls it."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.series[i]
        return (torch.from_numpy(self.features[rows].astype(np.float32)), torch.from_numpy(self.labels[rows]),
                torch.from_numpy(rows))


def collate_series(items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Series of any length padded to the longest: x (B, L, F), y (B, L, 6), mask (B, L), rows (B, L; -1 pad)."""
    pad = nn.utils.rnn.pad_sequence
    x, y, rows = (pad([item[i] for item in items], batch_first=True, padding_value=-1 if i == 2 else 0)
                  for i in range(3))
    return x, y, rows >= 0, rows


def series_loader(ds: SeriesDataset, batch_size: int, sampler: DistributedSampler[int] | None = None,
                  ) -> DataLoader[Any]:
    """Batches of padded series (in memory: no workers)."""
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collate_series)


@torch.inference_mode()
def series_probs(model: nn.Module, loader: DataLoader[Any], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities of every real slice of ``loader``'s series: rows (N,), probs (N, 6)."""
    model.eval()
    rows, probs = [], []
    for x, _, mask, row in loader:
        mask = mask.to(device)
        probs.append(torch.sigmoid(model(x.to(device), mask).float())[mask].cpu())
        rows.append(row.to(device)[mask].cpu())
    if not probs:
        return np.zeros(0, np.int64), np.zeros((0, len(LABELS)), np.float32)
    return torch.cat(rows).numpy(), torch.cat(probs).numpy()
