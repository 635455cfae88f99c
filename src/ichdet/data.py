"""Torch datasets over the pixel cache: windows applied on the fly, slice context, augmentation.

A sample's channels are (slice offset, window) pairs: ``slice_offsets=[0]`` with the seed's three
windows is the seed's 2D input; ``[-1, 0, 1]`` with one window is the 2.5D input of the 2019
winners. Channel ``i * len(windows) + j`` is window ``j`` of the slice at ``slice_offsets[i]``.
Samples leave the dataset as uint8 CHW tensors; normalisation to the backbone's mean/std happens on
the device (4x less data through the loader and over PCIe).

Speed: channels are built straight in CHW order, one lookup-table pass per (slice, window) read from
the memory-mapped shard. When the cache's size differs from the model's, each slice's windows are
resized together (OpenCV's area resize takes at most four channels at a non-integer ratio, so more
windows are resized one by one). A 2.5D sample is augmented as one albumentations call with
every channel as its own image target: the transform's parameters are drawn once per call, so every
channel gets the same flip, affine, crop and brightness/contrast, and the centre slice's channels are
exactly the 2D sample's.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ichdet.config import AugmentConfig, DataConfig
from ichdet.labels import LABELS
from ichdet.store import PixelCache
from ichdet.windowing import Window, apply_windows, resize_square, resolve_windows, window_tables


def image_targets(n: int) -> list[str]:
    """The albumentations target names of ``n`` images transformed together: image, image1, image2, ..."""
    return ["image", *(f"image{i}" for i in range(1, n))]


def build_augment(cfg: AugmentConfig, size: int, n_images: int = 1) -> A.Compose:
    """The training augmentation: flip, shift-scale-rotate, brightness/contrast, random crop.

    With ``n_images > 1`` the pipeline also takes the targets ``image1 ... image{n-1}``
    (:func:`image_targets`), which get the very same random transform as ``image``.
    """
    targets = dict.fromkeys(image_targets(n_images)[1:], "image")
    return A.Compose([
        A.HorizontalFlip(p=cfg.hflip),
        A.Affine(translate_percent=(-0.06, 0.06), scale=(0.9, 1.1), rotate=(-cfg.rotate_limit, cfg.rotate_limit),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, p=cfg.shift_scale_rotate),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=cfg.brightness_contrast),
        A.RandomResizedCrop(size=(size, size), scale=cfg.crop_scale, ratio=(0.9, 1.1), p=cfg.random_crop),
    ], additional_targets=targets)


def neighbour_rows(cache: PixelCache) -> tuple[np.ndarray, np.ndarray]:
    """Row of the previous and next slice of every index row (the row itself at a series end)."""
    rows = np.arange(len(cache))
    prev, nxt = (cache.rows_of(cache.index[column]) for column in ("prev_id", "next_id"))
    return np.where(prev < 0, rows, prev), np.where(nxt < 0, rows, nxt)  # -1: None, no neighbour


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
        n_channels = len(self.offsets) * len(self.windows)
        # 2D: one HWC image through the pipeline; 2.5D: each channel as its own image target.
        self._targets = image_targets(n_channels) if len(self.offsets) > 1 else ["image"]
        self.augment = build_augment(cfg.augment, cfg.image_size, len(self._targets)) if augment else None
        self._luts = window_tables(self.windows)  # apply_windows' own tables, one row per channel
        self.seed = seed
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
        """Change the augmentation stream; with the seed, a sample's augmentation is reproducible."""
        self.epoch = epoch

    def _row_at(self, row: int, offset: int) -> int:
        return row if offset == 0 else int(self._rows_at[offset][row])

    def _resize(self, img: np.ndarray) -> np.ndarray:
        """A stored-size (H, W, C) image at the model's size (:func:`ichdet.windowing.resize_square`)."""
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
        if self.augment is None:
            chw = self.chw(row)
        else:
            # one stream shared by the transforms, seeded per sample (set_random_seed would give each
            # transform its own generator from the same seed: all of them would fire together)
            seed = hash((self.seed, self.epoch, row)) % 2**32
            self.augment.set_random_state(np.random.default_rng(seed), random.Random(seed))
            if len(self._targets) == 1:  # 2D: the HWC image, as albumentations is fastest with it
                img = self.augment(image=self.image(row))["image"]
                chw = np.ascontiguousarray(img.transpose(2, 0, 1))
            else:  # 2.5D: every channel a (H, W) target, all under one draw of the random transform
                out = self.augment(**dict(zip(self._targets, self.chw(row), strict=True)))
                chw = np.stack([out[name] for name in self._targets])
        return torch.from_numpy(chw), torch.from_numpy(self.labels[row]), row
