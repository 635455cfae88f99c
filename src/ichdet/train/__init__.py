"""Training: the loop (2D and sequence runs alike), augmentation, the sequence stage's out-of-fold features.

Nothing in inference imports this package: what prediction needs lives in :mod:`ichdet.models`.

    from ichdet.train import train
    train(cfg, data="cache/", out="runs/resnet34", fold="all")
"""

from __future__ import annotations

from ichdet.train.augment import AugmentedSlices, build_augment
from ichdet.train.loop import Trainer, train, train_fold
from ichdet.train.seq import train_seq

__all__ = ["AugmentedSlices", "Trainer", "build_augment", "train", "train_fold", "train_seq"]
