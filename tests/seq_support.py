"""Shared by the sequence tests: a trained tiny 2D base run, and two sequence runs on one (the ``seq_runs`` fixture)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from ichdet.cache.writer import PreprocessOptions, preprocess
from ichdet.models.config import build_config, load_seq_config
from ichdet.synth import SynthSpec, make_dataset
from ichdet.train.loop import train
from ichdet.train.seq import train_seq

SIZE = 32
BASE = ["model.backbone=resnet10t", f"data.image_size={SIZE}", "train.batch_size=16", "train.num_workers=0",
        "train.device=cpu", "train.amp=off", "train.channels_last=false", "train.epochs=1", "train.warmup_epochs=0.0"]
#: The sequence unit tests' base: resnet18 (a 512-wide embedding), a higher lr so one epoch learns something.
RESNET18_BASE = ["model.backbone=resnet18", "data.image_size=32", "train.batch_size=16", "train.num_workers=0",
                 "train.device=cpu", "train.lr=0.003", "train.warmup_epochs=0.0", "train.channels_last=false",
                 "train.epochs=1", "train.amp=off"]
SEQ = ["model.hidden=16", "features.batch_size=32", "features.num_workers=0", "train.device=cpu", "train.amp=off",
       "train.batch_size=4", "train.epochs=1"]


@dataclass(frozen=True)
class SeqRuns:
    """``base`` (2D, resnet10t at 32 px, 2 folds), ``seq`` and ``seq2`` (sequence runs on it, different
    sizes), their training ``cache`` and its ``labels`` CSV."""

    base: Path
    seq: Path
    seq2: Path
    cache: Path
    labels: Path


def trained_base(root: Path, seed: int, slices: tuple[int, int], base: list[str] = BASE) -> tuple[Path, Path]:
    """Under ``root``: 8 context-matters studies at 32 px (``slices`` per study), a 2-fold cache of them and a
    2D run (config ``base``) trained on both folds. Returns (cache, run)."""
    make_dataset(root / "data", SynthSpec(n_studies=8, n_test_studies=0, size=SIZE, slices_per_study=slices,
                                          seed=seed, context=True))
    preprocess(root / "data" / "stage_2_train_images", root / "cache", root / "data" / "stage_2_train.csv",
               PreprocessOptions(size=SIZE, workers=1, n_folds=2, progress=False))
    train(build_config({}, base), root / "cache", root / "runs" / "base", fold="all", progress=False)
    return root / "cache", root / "runs" / "base"


def tiny_seq_runs(root: Path) -> SeqRuns:
    """The base run and the two sequence runs on it, built under ``root`` (the ``seq_runs`` fixture, once a session)."""
    cache, base = trained_base(root, seed=4, slices=(8, 9))
    runs = SeqRuns(base, root / "runs" / "seq", root / "runs" / "seq2", cache, root / "data" / "stage_2_train.csv")
    train_seq(load_seq_config(None, SEQ), [runs.base], runs.cache, runs.seq, progress=False)
    train_seq(load_seq_config(None, [*SEQ, "model.hidden=8"]), [runs.base], runs.cache, runs.seq2, progress=False)
    return runs


class StemImages:
    """Counts the images the CNNs' stems see while active (a global forward hook on every Conv2d that
    reads the network input: ``in_chans`` channels), so ``images / N`` is the number of CNN passes over
    N images (one per run, fold and TTA view; an image and its mirror in one batch are two)."""

    def __init__(self, in_chans: int = 3) -> None:
        self.in_chans = in_chans
        self.images = 0

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d) and module.in_channels == self.in_chans:
            self.images += int(inputs[0].shape[0])

    def __enter__(self) -> StemImages:
        self._handle = register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
