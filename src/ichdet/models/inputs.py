"""The torch dataset over the pixel cache that training and inference share: windows applied on the fly,
slice context (training's augmentation wraps it: :mod:`ichdet.train.augment`).

A sample's channels are (slice offset, window) pairs: ``slice_offsets=[0]`` with the seed's three
windows is the seed's 2D input; ``[-1, 0, 1]`` with one window is the 2.5D input of the 2019
winners. Channel ``i * len(windows) + j`` is window ``j`` of the slice at ``slice_offsets[i]``.
Samples leave the dataset as uint8 CHW tensors; normalisation to the backbone's mean/std happens on
the device (4x less data through the loader and over PCIe).

Speed: channels are built straight in CHW order, one lookup-table pass per (slice, window) read from
the memory-mapped shard. When the cache's size differs from the model's, each slice's windows are
resized together (OpenCV's area resize takes at most four channels at a non-integer ratio, so more
windows are resized one by one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ichdet.cache.store import PixelCache
from ichdet.dicom.windowing import Window, apply_windows, resize_square, resolve_windows, window_tables
from ichdet.models.config import DataConfig
from ichdet.names import LABELS


def neighbour_rows(cache: PixelCache) -> tuple[np.ndarray, np.ndarray]:
    """Row of the previous and next slice of every index row (the row itself at a series end)."""
    rows = np.arange(len(cache))
    prev, nxt = (cache.rows_of(cache.index[column]) for column in ("prev_id", "next_id"))
    return np.where(prev < 0, rows, prev), np.where(nxt < 0, rows, nxt)  # -1: None, no neighbour


class SliceDataset(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Windowed slices of a cache: ``(uint8 CHW, labels[6], row)``.

    ``rows`` selects index rows (a fold's train or validation part); unlabelled images yield zeros
    as labels, which only prediction reads past.
    """

    def __init__(self, cache: PixelCache, rows: Sequence[int] | np.ndarray, cfg: DataConfig) -> None:
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.windows: tuple[Window, ...] = resolve_windows(cfg.windows)
        self.offsets = list(cfg.slice_offsets)
        self.size = cfg.image_size
        self._luts = window_tables(self.windows)  # apply_windows' own tables, one row per channel
        self.epoch = 0
        labels = cache.index[list(LABELS)].to_numpy(dtype=np.float32)
        self.labels = np.nan_to_num(labels, nan=0.0)
        # index row -> row of the slice at each offset, once for the whole cache (the row itself past a series end)
        self._rows_at: dict[int, np.ndarray] = {}
        if self.offsets != [0]:
            prev, nxt = neighbour_rows(cache)
            for offset in set(self.offsets) - {0}:
                at, step = np.arange(len(cache)), prev if offset < 0 else nxt
                for _ in range(abs(offset)):
                    at = step[at]
                self._rows_at[offset] = at

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch (the training loop calls it every epoch; augmentation draws from it)."""
        self.epoch = epoch

    def _row_at(self, row: int, offset: int) -> int:
        return row if offset == 0 else int(self._rows_at[offset][row])

    def _resize(self, img: np.ndarray) -> np.ndarray:
        """A stored-size (H, W, C) image at the model's size (:func:`ichdet.dicom.windowing.resize_square`)."""
        return resize_square(img, self.size)

    def _slice_hwc(self, hu: np.ndarray) -> np.ndarray:
        """Every window of one stored slice, at the model's size: uint8 (H, W, len(windows))."""
        img = apply_windows(hu, self.windows)
        return img if img.shape[0] == self.size else self._resize(img)

    def _slice_chw(self, hu: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Every window of one stored slice, at the model's size: uint8 (len(windows), H, W), into ``out``."""
        if out is None:
            out = np.empty((len(self.windows), self.size, self.size), np.uint8)
        if hu.shape[0] != self.size:  # the windows resized together (see _resize)
            out[...] = self._slice_hwc(hu).transpose(2, 0, 1)
            return out
        bits = hu.view(np.uint16)
        for lut, channel in zip(self._luts, out, strict=True):  # one lookup pass per window, into its channel
            np.take(lut, bits, out=channel, mode="clip")  # clip: straight into out (raise buffers)
        return out

    def chw(self, row: int) -> np.ndarray:
        """The windowed uint8 (C, H, W) input of one index row, before augmentation.

        Channel ``i * len(windows) + j`` is window ``j`` of the slice at ``slice_offsets[i]``.
        """
        n = len(self.windows)
        out = np.empty((len(self.offsets) * n, self.size, self.size), np.uint8)
        for i, offset in enumerate(self.offsets):
            self._slice_chw(self.cache.view_row(self._row_at(row, offset)), out[i * n:(i + 1) * n])
        return out

    def image(self, row: int) -> np.ndarray:
        """The windowed uint8 (H, W, C) input of one index row, before augmentation (channels as :meth:`chw`)."""
        if len(self.offsets) == 1:
            return self._slice_hwc(self.cache.view_row(row))
        return np.ascontiguousarray(self.chw(row).transpose(1, 2, 0))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        row = int(self.rows[i])
        return torch.from_numpy(self.chw(row)), torch.from_numpy(self.labels[row]), row
