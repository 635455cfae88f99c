"""The run folder: which folds it holds, whether a ``train`` may write into it, and its merged OOF.

Every check here only reads, so a ``train`` that is refused (a checkpoint without ``--resume``, a resume
with a different config, a fold the cache does not have, a run folder trained with another config)
leaves every file as it was: :func:`ichdet.train.loop.train` writes ``config.yaml`` only after them.

Resume compares only the settings that change the result (:data:`RESULT_FREE_KEYS` lists the ones
that do not), so a run started on one GPU can finish on another device, with more workers, compiled,
or with test-time augmentation switched.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from torch import nn

from ichdet.cache.store import PixelCache
from ichdet.errors import CheckpointError, ConfigError, IchdetError
from ichdet.models.backbones import build_model
from ichdet.models.checkpoint import load_state, load_weights
from ichdet.models.config import Config, SeqConfig, load_config

#: Config keys that do not change what a run learns, so a resume may change them: the run's label, where
#: and how fast it runs (device, data-loader workers, memory layout, ``torch.compile``) and whether the
#: final out-of-fold pass mirrors images (``tta``, applied after training, to the best weights). Every
#: other key (``model.*``, ``data.*``, ``train.epochs/batch_size/lr/weight_decay/warmup_epochs/grad_clip/
#: amp/patience/seed/limit_train_batches`` and any key added later) must match: a new key is compared
#: until someone shows it cannot change the result.
RESULT_FREE_KEYS: frozenset[str] = frozenset({
    "name", "train.num_workers", "train.device", "train.channels_last", "train.compile", "train.tta"})

_FOLD_DIR = re.compile(r"fold(\d+)")

#: What makes a run folder a sequence run (``ichdet seq train``): its base runs and feature layout.
SEQ_FILE = "seq.json"


def is_seq_run(run: str | Path) -> bool:
    """Whether ``run`` is a sequence run (it has ``seq.json``)."""
    return (Path(run) / SEQ_FILE).is_file()


def check_2d_run(run: str | Path, what: str = "a base run") -> Path:
    """``run`` resolved, if it is a 2D run folder (``ichdet train``); CheckpointError naming it otherwise.

    ``what`` says in the refusal what the folder was given as (a sequence run's bases are 2D runs).
    """
    path = Path(run).resolve()
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{run} ({what}): not a trained run folder (no config.yaml); pass a folder "
                              "written by `ichdet train`")
    if is_seq_run(path):
        raise CheckpointError(f"{run} ({what}) is a sequence run; a sequence run's bases are 2D runs "
                              "(`ichdet train`)")
    return path


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config tree as ``{"section.key": value}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def result_changes(saved: dict[str, Any], cfg: Config | SeqConfig) -> list[str]:
    """The keys, outside :data:`RESULT_FREE_KEYS`, where config tree ``saved`` and ``cfg`` differ."""
    old, new = flatten(saved), flatten(cfg.model_dump(mode="json"))
    return sorted(k for k in old.keys() | new.keys()
                  if k not in RESULT_FREE_KEYS and old.get(k, "<absent>") != new.get(k, "<absent>"))


def fold_dirs(run: str | Path) -> dict[int, Path]:
    """The ``fold<k>`` folders of a run by fold number; other names (``fold0_old``, ``folds``) are not folds."""
    run = Path(run)
    if not run.is_dir():
        return {}
    found = {}
    for path in run.iterdir():
        match = _FOLD_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def cache_folds(cache: PixelCache) -> list[int]:
    """The labelled folds of a cache; IchdetError if it has none (built without ``--labels``)."""
    if "fold" not in cache.index.columns:
        raise IchdetError(f"{cache.root} has no fold column; rebuild it with `ichdet preprocess --labels`")
    folds = sorted(int(f) for f in set(cache.index["fold"]) if f >= 0)
    if not folds:
        raise IchdetError(f"{cache.root} has no labelled images to train on (every fold is -1); build the "
                          "cache with `ichdet preprocess --labels stage_2_train.csv`")
    return folds


def folds_to_train(cache: PixelCache, fold: str) -> list[int]:
    """``all`` -> every fold of the cache; otherwise the one fold named, checked against the cache."""
    available = cache_folds(cache)
    if fold == "all":
        return available
    if not fold.isdigit() or int(fold) not in available:
        raise ConfigError(f"--fold {fold!r}: the cache at {cache.root} has folds {available} (or use all)")
    return [int(fold)]


def _check_run_config(run: Path, cfg: Config) -> None:
    """A run folder that holds trained folds must have been trained with ``cfg`` (result keys only)."""
    path = run / "config.yaml"
    trained = [d for d in fold_dirs(run).values()
               if (d / "best.safetensors").exists() or (d / "checkpoints" / "last.pt").exists()]
    if not trained or not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not readable YAML; this run folder is damaged, choose a new --out") from None
    changed = result_changes(saved if isinstance(saved, dict) else {}, cfg)
    if changed:
        raise ConfigError(f"{run} holds folds trained with a different config ({', '.join(changed)}); "
                          "train with the run's own config.yaml or choose a new --out")


def check_fold_dir(fold_dir: Path, cfg: Config | SeqConfig, resume: bool, state: dict[str, Any] | None = None) -> None:
    """Whether a fold may be trained into ``fold_dir``: a checkpoint there needs ``--resume`` and the same
    result-changing config (:func:`result_changes`). ``state``: that checkpoint, if already loaded."""
    last = fold_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return
    if not resume:
        raise IchdetError(f"{fold_dir} already holds a checkpoint; pass --resume to continue it "
                          "or choose a new --out")
    changed = result_changes((state or load_state(last))["config"], cfg)
    if changed:
        raise ConfigError(f"{last} was trained with a different config ({', '.join(changed)}); resume "
                          "with the run's own config.yaml or start a new --out")


def _fold_images(cache: PixelCache, fold: int) -> set[str]:
    return set(cache.index.loc[cache.index["fold"].to_numpy() == fold, "image_id"])


def _check_oof(path: Path, cache: PixelCache, fold: int) -> pd.DataFrame:
    """A fold's ``oof.parquet``, which must hold exactly the cache's images of that fold."""
    oof = pd.read_parquet(path)
    if "image_id" not in oof.columns or set(oof["image_id"]) != _fold_images(cache, fold):
        raise IchdetError(f"{path} does not hold the images of fold {fold} of the cache {cache.root} (it was "
                          f"written from another cache); retrain fold {fold} or remove that file")
    return oof


def plan_run(cfg: Config, cache: PixelCache, run: str | Path, fold: str, resume: bool) -> list[int]:
    """The folds a ``train`` will train, after every check that could refuse it; reads only.

    Raises:
        IchdetError: a fold the cache lacks, a checkpoint without ``resume``, a resume or a run folder
            with a different config, or another fold's ``oof.parquet`` from another cache.
    """
    run = Path(run)
    folds = folds_to_train(cache, fold)
    _check_run_config(run, cfg)
    for k in folds:
        check_fold_dir(run / f"fold{k}", cfg, resume)
    defined = cache_folds(cache)
    for k, fold_dir in fold_dirs(run).items():
        if k in defined and k not in folds and (fold_dir / "oof.parquet").exists():
            _check_oof(fold_dir / "oof.parquet", cache, k)
    return folds


def merge_oof(run: str | Path, cache: PixelCache) -> pd.DataFrame:
    """The out-of-fold predictions of every fold of ``cache`` the run holds, checked against the cache.

    Folders of folds the cache does not define (a stale ``fold7/`` of an earlier run) are never merged.
    """
    folds = cache_folds(cache)
    parts = [_check_oof(d / "oof.parquet", cache, k) for k, d in fold_dirs(run).items()
             if k in folds and (d / "oof.parquet").exists()]
    if not parts:
        raise IchdetError(f"{run} holds no out-of-fold predictions of the folds {folds} of {cache.root}")
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------- a trained run's weights


def fold_weights(run: str | Path) -> list[tuple[int, Path]]:
    """The ``(fold, best.safetensors)`` pairs of a run's ``fold<k>`` folders; CheckpointError if there are none.

    Only ``fold`` followed by digits is a fold: a stray ``fold0_old/`` is not read.
    """
    run = Path(run)
    found = [(k, d / "best.safetensors") for k, d in fold_dirs(run).items() if (d / "best.safetensors").is_file()]
    if not found:
        raise CheckpointError(f"{run}: no fold<k>/best.safetensors; train it first with `ichdet train --out {run}`")
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
