"""Torch datasets over the pixel cache: windows applied on the fly, slice context, augmentation.

A sample's channels are (slice offset, window) pairs: ``slice_offsets=[0]`` with the seed's three
windows is the seed's 2D input; ``[-1, 0, 1]`` with one window is the 2.5D input of the 2019
winners. Samples leave the dataset as uint8 CHW tensors; normalisation to the backbone's mean/std
happens on the device (4x less data through the loader and over PCIe).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ichdet.cache import PixelCache
from ichdet.config import AugmentConfig, DataConfig
from ichdet.labels import LABELS
from ichdet.windowing import Window, apply_windows, resolve_windows


def build_augment(cfg: AugmentConfig, size: int) -> A.Compose:
    """The training augmentation: flip, shift-scale-rotate, brightness/contrast, random crop."""
    return A.Compose([
        A.HorizontalFlip(p=cfg.hflip),
        A.Affine(translate_percent=(-0.06, 0.06), scale=(0.9, 1.1), rotate=(-cfg.rotate_limit, cfg.rotate_limit),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, p=cfg.shift_scale_rotate),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=cfg.brightness_contrast),
        A.RandomResizedCrop(size=(size, size), scale=cfg.crop_scale, ratio=(0.9, 1.1), p=cfg.random_crop),
    ])


def neighbour_rows(cache: PixelCache) -> tuple[np.ndarray, np.ndarray]:
    """Row of the previous and next slice of every index row (the row itself at a series end)."""
    index = cache.index
    rows = np.arange(len(index))
    position = {image_id: i for i, image_id in enumerate(index["image_id"])}
    prev = np.array([position.get(p, r) for r, p in zip(rows, index["prev_id"], strict=True)])  # None/NaN: no neighbour
    nxt = np.array([position.get(n, r) for r, n in zip(rows, index["next_id"], strict=True)])
    return prev, nxt


class SliceDataset(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Windowed (and optionally augmented) slices of a cache: ``(uint8 CHW, labels[6], row)``.

    ``rows`` selects index rows (a fold's train or validation part); unlabelled images yield zeros
    as labels, which only prediction reads past.
    """

    def __init__(self, cache: PixelCache, rows: Sequence[int] | np.ndarray, cfg: DataConfig,
                 augment: bool = False, seed: int = 0) -> None:
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.windows: tuple[Window, ...] = resolve_windows(cfg.windows)
        self.offsets = list(cfg.slice_offsets)
        self.size = cfg.image_size
        self.augment = build_augment(cfg.augment, cfg.image_size) if augment else None
        self.seed = seed
        self.epoch = 0
        labels = cache.index[list(LABELS)].to_numpy(dtype=np.float32)
        self.labels = np.nan_to_num(labels, nan=0.0)
        no_context = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.prev: np.ndarray
        self.next: np.ndarray
        self.prev, self.next = neighbour_rows(cache) if self.offsets != [0] else no_context

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream; with the seed, a sample's augmentation is reproducible."""
        self.epoch = epoch

    def _row_at(self, row: int, offset: int) -> int:
        step = self.prev if offset < 0 else self.next
        for _ in range(abs(offset)):
            row = int(step[row])
        return row

    def image(self, row: int) -> np.ndarray:
        """The windowed uint8 (H, W, C) input of one index row, before augmentation."""
        planes = [apply_windows(self.cache.read_row(self._row_at(row, o)), self.windows) for o in self.offsets]
        img = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)
        if img.shape[0] != self.size:
            interp = cv2.INTER_AREA if img.shape[0] > self.size else cv2.INTER_LINEAR
            img = cv2.resize(img, (self.size, self.size), interpolation=interp)
            img = img[..., None] if img.ndim == 2 else img
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        row = int(self.rows[i])
        img = self.image(row)
        if self.augment is not None:
            self.augment.set_random_seed(hash((self.seed, self.epoch, row)) % 2**32)
            img = self.augment(image=img)["image"]
        chw = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return chw, torch.from_numpy(self.labels[row]), row
