"""The sequence stage: out-of-fold per-slice features from trained 2D runs, series batches, and the
sequence run's training and prediction (through the 2D runs' own loop, :func:`ichdet.train.loop.train_fold`).

Run layout (as a 2D run, plus ``seq.json``)::

    SEQRUN/config.yaml    the resolved SeqConfig
    SEQRUN/seq.json       the base runs (absolute paths) and the feature layout
    SEQRUN/fold{k}/...    best.safetensors, checkpoints/last.pt, metrics.jsonl, tb/, oof.parquet

Features. A base run's fold ``k`` network embeds an image into its pooled penultimate features and
its six logits (flip-TTA averaged). For training, each labelled image is embedded by the fold model
that never trained on it (its own fold's): nothing leaks into the sequence model's inputs. Training
features are cached as float16 in ``BASE_RUN/features/fold{k}-{oof|all}-{key}.npy`` (``key``: the
cache's ids and folds, the weights' size and time, TTA), written atomically one fold at a time, so an
interrupted extraction resumes and a second sequence config reuses them.

Prediction (``ichdet predict --run SEQRUN``, and a sequence member of a bundle alike) goes through
:func:`ichdet.infer.predict.ensemble_probs` and :mod:`ichdet.infer.seq_predict`: fold ``k``'s CNNs feed fold ``k``'s
sequence model, features in memory, nothing written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from ichdet.cache.provenance import write_run_record
from ichdet.cache.store import PixelCache
from ichdet.errors import ConfigError, IchdetError
from ichdet.io import atomic_path, folder_lock, write_parquet_atomic, write_text_atomic
from ichdet.models.backbones import build_seq_model, input_stats
from ichdet.models.config import Config, SeqConfig, SeqFeatureConfig, config_to_yaml, load_seq_config
from ichdet.models.engine import (
    Normalizer,
    Runtime,
    all_ranks_or_none,
    embed_batches,
    init_runtime,
    make_loader,
    precision,
)
from ichdet.models.rundir import (
    SEQ_FILE,
    check_2d_run,
    fold_weights,
    folds_to_train,
    is_seq_run,
    load_run_model,
    run_config,
)
from ichdet.models.sequence import SeriesDataset, series_loader, series_probs, series_rows
from ichdet.names import LABELS
from ichdet.train.loop import Batch, Trainer, WeightedBCE, optimisation, train_fold

FEATURES_DIR = "features"


# ------------------------------------------------------------------------------------- base runs


@dataclass(frozen=True)
class BaseRun:
    """A trained 2D run the sequence stage reads: its folder, config and fold weights."""

    path: Path
    cfg: Config
    folds: dict[int, Path]

    @property
    def name(self) -> str:
        """The run's folder name (its ``model`` in prediction tables)."""
        return self.path.name


def load_base(run: str | Path) -> BaseRun:
    """A 2D run folder as a :class:`BaseRun`; CheckpointError if it is not one or has no trained fold."""
    path = check_2d_run(run)
    return BaseRun(path, run_config(path), dict(fold_weights(path)))


def check_folds(bases: Sequence[BaseRun], cache: PixelCache, folds: Sequence[int]) -> None:
    """Refuse base runs not trained on ``cache``'s folds: each must have weights for every fold and its
    out-of-fold table must put every labelled image of the cache in the same fold as the cache does."""
    index = cache.index.loc[cache.index["fold"] >= 0, ["image_id", "fold"]]
    for base in bases:
        missing = [k for k in folds if k not in base.folds]
        if missing:
            raise IchdetError(f"{base.path} has no trained fold {missing}; the cache {cache.root} has folds "
                              f"{list(folds)}: train them first (`ichdet train --fold all`)")
        parts = sorted(base.path.glob("fold*/oof.parquet"))
        if not parts:
            raise IchdetError(f"{base.path}: no fold*/oof.parquet, so its folds cannot be checked; finish its training")
        oof = pd.concat([pd.read_parquet(p, columns=["image_id", "fold"]) for p in parts], ignore_index=True)
        both = index.merge(oof, on="image_id", how="left", suffixes=("", "_run"))
        bad = both[both["fold_run"].isna() | (both["fold_run"] != both["fold"])]
        if len(bad):
            first = bad.iloc[0]
            raise IchdetError(f"{base.path} was trained on other folds than the cache {cache.root}: "
                              f"{len(bad)} labelled image(s) differ, e.g. {first['image_id']} is in fold "
                              f"{first['fold']} of the cache but {first['fold_run']} of the run; train the base "
                              "runs on this cache (same --folds and --seed of preprocess)")


# -------------------------------------------------------------------------------------- features


def _feature_path(base: BaseRun, fold: int, cache: PixelCache, scope: str, tta: bool) -> Path:
    """Where the features of ``base`` fold ``fold`` over ``cache`` live (see the module docstring)."""
    stat = base.folds[fold].stat()
    h = hashlib.sha256(json.dumps([stat.st_size, stat.st_mtime_ns, tta, base.cfg.data.model_dump(mode="json")])
                       .encode())
    h.update("\n".join(cache.index["image_id"]).encode())
    h.update(cache.index["fold"].to_numpy().tobytes())
    return base.path / FEATURES_DIR / f"fold{fold}-{scope}-{h.hexdigest()[:16]}.npy"


def scope_rows(cache: PixelCache, fold: int, scope: str) -> np.ndarray:
    """Index rows a fold model embeds: ``oof`` its own fold's labelled images, ``all`` every image."""
    return np.flatnonzero(cache.index["fold"].to_numpy() == fold) if scope == "oof" else np.arange(len(cache))


def fold_features(base: BaseRun, fold: int, cache: PixelCache, scope: str, cfg: SeqFeatureConfig, rt: Runtime,
                  tta: bool = True, progress: bool = False) -> np.ndarray:
    """float16 (len(scope_rows), features + 6) of ``base``'s fold ``fold``: read from disk, or computed once."""
    path, rows = _feature_path(base, fold, cache, scope, tta), scope_rows(cache, fold, scope)
    if path.is_file():
        feats = np.load(path, mmap_mode="r")
        if feats.shape[0] == len(rows):
            return np.asarray(feats)
    model, _ = load_run_model(base.path, base.folds[fold], rt.device, base.cfg)
    from ichdet.models.inputs import SliceDataset  # the torch datasets: only where images are read

    loader = make_loader(SliceDataset(cache, rows, base.cfg.data), cfg.batch_size, cfg.num_workers, rt.device)
    normalize = Normalizer(*input_stats(model, base.cfg.data.in_chans), base.cfg.train.channels_last).to(rt.device)
    autocast, _ = precision(rt.device, base.cfg.train.amp)
    got, feats32 = embed_batches(model, normalize, loader, rt.device, autocast, tta, progress)
    if not np.array_equal(got, rows):
        raise RuntimeError(f"feature rows out of order for {base.path} fold {fold}")  # a bug, not bad input
    feats = feats32.astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, feats)
    return feats


def oof_features(bases: Sequence[BaseRun], cache: PixelCache, folds: Sequence[int], cfg: SeqFeatureConfig,
                 rt: Runtime, progress: bool = False) -> tuple[np.ndarray, list[int]]:
    """Out-of-fold features of every labelled image, all base runs side by side: float16 (len(cache), F)
    (rows of unlabelled images stay zero), and where each base run's six logits start in a row."""
    blocks, starts, offset = [], [], 0
    for base in bases:
        block: np.ndarray | None = None
        for k in folds:
            part = fold_features(base, k, cache, "oof", cfg, rt, cfg.tta, progress)
            if block is None:
                block = np.zeros((len(cache), part.shape[1]), np.float16)
            block[scope_rows(cache, k, "oof")] = part
        assert block is not None
        blocks.append(block)
        starts.append(offset + block.shape[1] - len(LABELS))
        offset += block.shape[1]
    return (blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)), starts


# ---------------------------------------------------------------------------------------- series


def series_batch(t: Trainer, batch: Any) -> Batch:
    """A series batch -> ((features, mask), targets, mask) on the device (the trainer's ``to_batch``)."""
    x, y, mask, _ = (v.to(t.rt.device, non_blocking=True) for v in batch)
    return (x, mask), y, mask


def _infer(t: Trainer, tta: bool) -> tuple[np.ndarray, np.ndarray]:
    return series_probs(t.eval_model(), t.val_loader, t.rt.device)  # features are flip-averaged already


# -------------------------------------------------------------------------------------- training


def build_seq_trainer(cfg: SeqConfig, cache: PixelCache, features: np.ndarray, logit_columns: Sequence[int],
                      fold: int, rt: Runtime) -> Trainer:
    """Series datasets, sequence model, optimiser and schedule for one fold (validation = series of that fold)."""
    series = series_rows(cache.index)
    fold_of = cache.index["fold"].to_numpy()[[int(s[0]) for s in series]]
    train_s = [s for s, f in zip(series, fold_of, strict=True) if f >= 0 and f != fold]
    val_s = [s for s, f in zip(series, fold_of, strict=True) if f == fold]
    if not train_s or not val_s:
        raise IchdetError(f"fold {fold} leaves no training or no validation series in {cache.root}")
    torch.manual_seed(cfg.train.seed)
    model: nn.Module = build_seq_model(cfg.model, features.shape[1], logit_columns).to(rt.device)
    if rt.world_size > 1:  # gradients averaged over the processes: one model, as the 2D trainer's
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    labels = np.nan_to_num(cache.index[list(LABELS)].to_numpy(dtype=np.float32), nan=0.0)
    train_ds = SeriesDataset(features, labels, train_s)
    sampler: DistributedSampler[int] = DistributedSampler(train_ds, num_replicas=rt.world_size, rank=rt.rank,
                                                          shuffle=True, seed=cfg.train.seed)
    train_loader = series_loader(train_ds, cfg.train.batch_size, sampler)
    val_loader = series_loader(SeriesDataset(features, labels, val_s[rt.rank::rt.world_size]), cfg.train.batch_size * 2)
    steps = min(len(train_loader), cfg.train.limit_train_batches or len(train_loader))
    optimizer, scheduler, autocast, scaler = optimisation(cfg, model, rt, steps)
    return Trainer(cfg, rt, model, nn.Identity(), WeightedBCE().to(rt.device), optimizer, scheduler, scaler,
                   autocast, train_loader, val_loader, cache, to_batch=series_batch, infer=_infer)


def check_seq_out(run: str | Path) -> None:
    """Refuse an ``--out`` that holds something other than a sequence run (a 2D run, a file), naming it.

    A folder with ``config.yaml`` but no ``seq.json`` is a sequence run only if its config has a
    ``features`` section (a run stopped between writing the two); a 2D run's has ``data`` instead.
    """
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise IchdetError(f"--out {run} is a file, not a run folder; choose a new --out for the sequence run")
    config = run / "config.yaml"
    if not config.is_file() or is_seq_run(run):
        return
    try:
        tree = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        tree = None
    if not (isinstance(tree, dict) and "features" in tree):
        kind = "a 2D run (`ichdet train`)" if isinstance(tree, dict) and "data" in tree else "another run"
        raise IchdetError(f"--out {run} holds {kind}, not a sequence run; choose a new --out for the sequence "
                          "run (a 2D run goes to --run as its base)")


def _check_claim(run: Path, cfg: SeqConfig, bases: Sequence[BaseRun], resume: bool) -> dict[str, Any]:
    """Refuse before anything is written: an --out that is not a sequence run, an existing run without
    ``--resume``, other base runs, or on resume another model or feature config. Returns what seq.json
    records (read-only: every rank runs it)."""
    check_seq_out(run)
    started = sorted(run.glob("fold*/checkpoints/last.pt"))
    if started and not resume:
        raise IchdetError(f"{run} already holds a sequence run ({started[0].parent.parent.name}); pass --resume "
                          "to continue it or choose a new --out")
    meta = {"bases": [str(b.path) for b in bases]}
    if (run / SEQ_FILE).is_file():
        old = json.loads((run / SEQ_FILE).read_text())
        if old.get("bases") != meta["bases"]:
            raise IchdetError(f"{run} was trained on base runs {old.get('bases')}, not {meta['bases']}; "
                              "choose a new --out")
    if resume and (run / "config.yaml").is_file():  # the train section is checked per fold, by train_fold
        old_cfg = load_seq_config(run / "config.yaml")
        changed = [key for key in ("model", "features") if getattr(old_cfg, key) != getattr(cfg, key)]
        if changed:
            raise ConfigError(f"{run}/config.yaml differs in {', '.join(changed)}; resume with the run's own config")
    return meta


def _features_once(bases: Sequence[BaseRun], cache: PixelCache, folds: Sequence[int], cfg: SeqConfig, rt: Runtime,
                   progress: bool) -> tuple[np.ndarray, list[int]]:
    """:func:`oof_features`, computed by rank 0 alone under torchrun (the others then read its files; a
    failure of rank 0's extraction ends every rank instead of leaving them waiting)."""
    found: tuple[np.ndarray, list[int]] | None = None
    with all_ranks_or_none(rt):
        if rt.is_main:
            found = oof_features(bases, cache, folds, cfg.features, rt, progress)
    return found or oof_features(bases, cache, folds, cfg.features, rt, False)


def train_seq(cfg: SeqConfig, runs: Sequence[str | Path], data: str | Path, out: str | Path, fold: str = "all",
              resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Train the sequence model of ``cfg`` over the base ``runs``' features on cache ``data`` into ``out``.

    Under torchrun (``torchrun --nproc-per-node N -m ichdet seq train ...``) every process checks the
    request, rank 0 alone takes the folder's lock, writes the run's files and extracts the features, and
    the processes train one model on their shares of the series (``train.batch_size`` series each).
    """
    rt = init_runtime(cfg.train.device)
    try:
        cache, run = PixelCache(data), Path(out)
        bases = [load_base(r) for r in runs]
        if len({b.path for b in bases}) != len(bases):
            raise IchdetError(f"a base run is given twice: {[str(r) for r in runs]}")
        all_folds, folds = folds_to_train(cache, "all"), folds_to_train(cache, fold)
        check_folds(bases, cache, all_folds)
        meta = _check_claim(run, cfg, bases, resume)
        with ExitStack() as held:
            with all_ranks_or_none(rt):  # under torchrun only rank 0 locks and writes: its failure stops them all
                if rt.is_main:
                    held.enter_context(folder_lock(run, "ichdet seq train"))
                    write_text_atomic(run / "config.yaml", config_to_yaml(cfg))
                    write_text_atomic(run / SEQ_FILE, json.dumps(meta, indent=1) + "\n")
                    write_run_record(run, cache.manifest.provenance)  # what the run is trained on
            features, logit_columns = _features_once(bases, cache, all_folds, cfg, rt, progress)
            results = [train_fold(cfg, cache, run / f"fold{k}", k, rt, resume, progress,
                                  trainer=build_seq_trainer(cfg, cache, features, logit_columns, k, rt))
                       for k in folds]
            with all_ranks_or_none(rt):
                if rt.is_main:
                    parts = sorted(run.glob("fold*/oof.parquet"))
                    write_parquet_atomic(pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True),
                                         run / "oof.parquet")
    finally:
        if rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return results
