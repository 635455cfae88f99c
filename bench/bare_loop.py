"""The reference the training recipe is measured against: a bare timm loop, as a new user would write it.

AdamW, one-cycle learning rate, horizontal flip only, inputs scaled to [0, 1] (no mean/std), plain
BCE over the six labels, every training study (no validation fold), the final epoch's weights. It reads
the same pixel cache through :class:`ichdet.models.inputs.SliceDataset` so the inputs (windows, size) are the
same as ichdet's; nothing else of the ichdet recipe is used.
"""

from __future__ import annotations

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from ichdet.cache.store import PixelCache
from ichdet.models.config import AugmentConfig, DataConfig
from ichdet.models.inputs import SliceDataset
from ichdet.train.augment import AugmentedSlices

#: Flip only: every other transform of ichdet's augmentation switched off.
FLIP_ONLY = AugmentConfig(hflip=0.5, shift_scale_rotate=0.0, brightness_contrast=0.0, random_crop=0.0)


def train_bare(cache: PixelCache, backbone: str, image_size: int, epochs: int, batch_size: int,
               lr: float, seed: int) -> nn.Module:
    """Train ``backbone`` from scratch on every labelled image of ``cache``; returns the last epoch's model."""
    torch.manual_seed(seed)
    data = DataConfig(image_size=image_size, augment=FLIP_ONLY)
    rows = np.flatnonzero(cache.index["fold"].to_numpy() >= 0)
    ds = AugmentedSlices(cache, rows, data, seed=seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    model = timm.create_model(backbone, pretrained=False, num_classes=6, in_chans=data.in_chans)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for images, target, _ in loader:
            loss = loss_fn(model(images.float() / 255.0), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


@torch.inference_mode()
def predict_bare(model: nn.Module, cache: PixelCache, image_size: int, batch_size: int = 64) -> np.ndarray:
    """Sigmoid probabilities (N, 6) for every row of ``cache``, in row order (no TTA)."""
    model.eval()
    ds = SliceDataset(cache, np.arange(len(cache)), DataConfig(image_size=image_size))
    out = [torch.sigmoid(model(images.float() / 255.0)) for images, _, _ in DataLoader(ds, batch_size=batch_size)]
    return torch.cat(out).numpy().astype(np.float64)
