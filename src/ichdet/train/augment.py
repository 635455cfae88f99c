"""Training augmentation: the albumentations pipeline and the augmented slice dataset.

A 2.5D sample is augmented as one albumentations call with every channel as its own image target: the
transform's parameters are drawn once per call, so every channel gets the same flip, affine, crop and
brightness/contrast, and the centre slice's channels are exactly the 2D sample's. A sample's draw is
seeded by (seed, epoch, row): a run repeats.
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

from ichdet.cache.store import PixelCache
from ichdet.models.config import AugmentConfig, DataConfig
from ichdet.models.inputs import SliceDataset

__all__ = ["AugmentedSlices", "build_augment", "image_targets"]


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


class AugmentedSlices(SliceDataset):
    """:class:`~ichdet.models.inputs.SliceDataset` with the training augmentation of ``cfg.augment``."""

    def __init__(self, cache: PixelCache, rows: Sequence[int] | np.ndarray, cfg: DataConfig, seed: int = 0) -> None:
        super().__init__(cache, rows, cfg)
        n_channels = len(self.offsets) * len(self.windows)
        # 2D: one HWC image through the pipeline; 2.5D: each channel as its own image target.
        self._targets = image_targets(n_channels) if len(self.offsets) > 1 else ["image"]
        self.augment = build_augment(cfg.augment, cfg.image_size, len(self._targets))
        self.seed = seed

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        row = int(self.rows[i])
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
