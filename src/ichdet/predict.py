"""Batched inference of trained runs on a cache, with test-time augmentation.

The output is one long table: ``image_id, model, fold`` and the six probabilities, one row per image
per fold of each run, which :mod:`ichdet.ensemble` averages (folds first, then models).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ichdet.checkpoint import load_weights
from ichdet.config import Config, load_config
from ichdet.data import SliceDataset
from ichdet.engine import Normalizer, init_runtime, make_loader, precision, predict_batches, prediction_table
from ichdet.errors import CheckpointError
from ichdet.models import build_model, input_stats
from ichdet.store import PixelCache


def fold_weights(run: str | Path) -> list[tuple[int, Path]]:
    """The ``(fold, best.safetensors)`` pairs of a run directory; CheckpointError if there are none."""
    run = Path(run)
    found = sorted((int(p.parent.name.removeprefix("fold")), p) for p in run.glob("fold*/best.safetensors"))
    if not found:
        raise CheckpointError(f"{run}: no fold*/best.safetensors; train it first with `ichdet train --out {run}`")
    return found


def run_config(run: str | Path) -> Config:
    """A run's resolved ``config.yaml``, without ImageNet weights (the fold's own weights replace them)."""
    return load_config(Path(run) / "config.yaml", ["model.pretrained=false"])


def load_run_model(run: str | Path, weights: Path, device: torch.device,
                   cfg: Config | None = None) -> tuple[nn.Module, Config]:
    """Rebuild a run's network from its config (read from the run unless given) and load one fold's weights."""
    cfg = cfg or run_config(run)
    model = build_model(cfg.model, cfg.data.in_chans)
    load_weights(model, weights)
    model = model.to(device).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, cfg



def predict_run(run: str | Path, cache: PixelCache, tta: bool = True, batch_size: int | None = None,
                device: str = "auto", num_workers: int | None = None,
                progress: bool = False) -> pd.DataFrame:
    """Predict every image of ``cache`` with every fold of one run; a long table (see module doc).

    The folds share the run's config, so each image is read, windowed and batched once for all of them.
    A sequence run (:mod:`ichdet.seq`) predicts the same table through its base runs' folds.
    """
    from ichdet.seq import is_seq_run, predict_seq  # seq imports this module

    if is_seq_run(run):
        return predict_seq(run, cache, tta, device, progress)
    rt = init_runtime(device)
    cfg = run_config(run)
    folds = fold_weights(run)
    models = [load_run_model(run, weights, rt.device, cfg)[0] for _, weights in folds]
    ds = SliceDataset(cache, np.arange(len(cache)), cfg.data)
    loader = make_loader(ds, batch_size or cfg.train.batch_size * 2,
                         cfg.train.num_workers if num_workers is None else num_workers, rt.device)
    mean, std = input_stats(models[0], cfg.data.in_chans)
    normalize = Normalizer(mean, std, cfg.train.channels_last).to(rt.device)
    autocast, _ = precision(rt.device, cfg.train.amp)
    rows, probs = predict_batches(models, normalize, loader, rt.device, autocast, tta, progress)
    name = Path(run).resolve().name
    return pd.concat([prediction_table(cache, rows, fold_probs, model=name, fold=fold)
                      for (fold, _), fold_probs in zip(folds, probs, strict=True)], ignore_index=True)


def predict_runs(runs: Sequence[str | Path], data: str | Path, tta: bool = True, device: str = "auto",
                 progress: bool = False) -> pd.DataFrame:
    """:func:`predict_run` for several runs over one cache, concatenated."""
    cache = PixelCache(data)
    names = [Path(r).resolve().name for r in runs]
    if len(set(names)) != len(names):
        raise CheckpointError(f"runs must have distinct folder names to be told apart: {names}")
    return pd.concat([predict_run(r, cache, tta, device=device, progress=progress) for r in runs],
                     ignore_index=True)
