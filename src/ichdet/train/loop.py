"""One training loop for CPU, one GPU and many (DDP through torchrun).

Run layout::

    RUN/config.yaml                       the resolved config
    RUN/fold{k}/checkpoints/last.pt       full training state after every epoch (resume point)
    RUN/fold{k}/best.safetensors          weights of the best validation epoch (what predict loads)
    RUN/fold{k}/metrics.jsonl, tb/        per-epoch metrics, TensorBoard events
    RUN/fold{k}/oof.parquet               out-of-fold predictions of the best weights
    RUN/oof.parquet                       all folds' out-of-fold predictions (``--fold all``)

Every epoch starts from RNG state derived from (seed, epoch), so a resumed run repeats exactly
the epochs an uninterrupted one would have run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ichdet.cache.provenance import write_run_record
from ichdet.cache.store import PixelCache
from ichdet.errors import IchdetError, RunFailed
from ichdet.evaluate.metrics import LABEL_WEIGHTS, expected_calibration_error, per_label_auc, weighted_log_loss
from ichdet.io import folder_lock, naming_full_disk, write_parquet_atomic, write_text_atomic
from ichdet.models.backbones import build_model, input_stats, resolve_backbone, unwrap
from ichdet.models.checkpoint import load_state, load_weights, save_state, save_weights
from ichdet.models.config import Config, SeqConfig, config_to_yaml
from ichdet.models.engine import (
    Normalizer,
    Runtime,
    all_ranks_or_none,
    gather,
    init_runtime,
    make_loader,
    precision,
    predict_batches,
    prediction_table,
)
from ichdet.models.inputs import SliceDataset
from ichdet.models.rundir import check_fold_dir, merge_oof, plan_run
from ichdet.names import LABELS
from ichdet.train.augment import AugmentedSlices


class WeightedBCE(nn.Module):
    """BCE over the six labels with ``any`` weighted 2: the competition metric as a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: torch.Tensor
        self.register_buffer("weights", torch.tensor(LABEL_WEIGHTS, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        return (loss * self.weights).sum(1).mean() / self.weights.sum()


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base rate, then cosine decay to zero at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor | None]
"""What the loop feeds a step: model inputs on the device, targets, and a mask of the target rows that
count (None: all of them; a sequence batch masks its padding)."""


def image_batch(t: Trainer, batch: Any) -> Batch:
    """A 2D loader batch ``(uint8 images, targets, rows)`` -> normalised images on the device."""
    images, target, _ = batch
    return (t.normalize(images.to(t.rt.device, non_blocking=True)),), target.to(t.rt.device, non_blocking=True), None


def predict_images(t: Trainer, tta: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validation inference of a 2D trainer: this rank's (rows, probs (N, 6))."""
    normalize = cast(Normalizer, t.normalize)
    rows, probs = predict_batches([t.eval_model()], normalize, t.val_loader, t.rt.device, t.autocast, tta)
    return rows, probs[0]


@dataclass
class Trainer:
    """Everything one fold's training needs, built once by :func:`build_trainer` (2D) or
    :func:`ichdet.train.seq.build_seq_trainer` (sequence); the loop only calls ``to_batch`` and ``infer``."""

    cfg: Config | SeqConfig
    rt: Runtime
    model: nn.Module
    normalize: nn.Module  # a Normalizer for images; identity for feature sequences
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Callable[[], AbstractContextManager[Any]]
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    cache: PixelCache
    to_batch: Callable[[Trainer, Any], Batch] = field(default=image_batch)
    infer: Callable[[Trainer, bool], tuple[np.ndarray, np.ndarray]] = field(default=predict_images)
    ema: ModelEmaV3 | None = None

    def eval_model(self) -> nn.Module:
        """The weights that are validated, selected and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else unwrap(self.model)


def _loader(ds: SliceDataset, cfg: Config, rt: Runtime, train: bool) -> DataLoader[Any]:
    if not train:
        return make_loader(ds, cfg.train.batch_size * 2, cfg.train.num_workers, rt.device)
    sampler: DistributedSampler[int] = DistributedSampler(
        ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=cfg.train.seed)
    drop = len(ds) // rt.world_size > cfg.train.batch_size
    return make_loader(ds, cfg.train.batch_size, cfg.train.num_workers, rt.device, sampler, drop)


def build_trainer(cfg: Config, cache: PixelCache, fold: int, rt: Runtime, targets: np.ndarray | None = None
                  ) -> Trainer:
    """Datasets, model, optimizer and schedule for one fold (validation = images of that fold).

    ``targets`` (float32, one row of six per cache row) replace the labels the network trains on
    (distillation's soft targets, :mod:`ichdet.train.distill`); validation still scores the labels.
    """
    folds = cache.index["fold"].to_numpy()
    train_rows, val_rows = np.flatnonzero((folds >= 0) & (folds != fold)), np.flatnonzero(folds == fold)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise IchdetError(f"fold {fold} leaves no training or no validation images in {cache.root}; "
                          f"the cache has folds {sorted(set(folds[folds >= 0].tolist()))}")
    torch.manual_seed(cfg.train.seed)
    in_chans = cfg.data.in_chans
    model = build_model(cfg.model, in_chans).to(rt.device)
    mean, std = input_stats(model, in_chans)
    normalize = Normalizer(mean, std, cfg.train.channels_last).to(rt.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rt.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    train_ds = AugmentedSlices(cache, train_rows, cfg.data, seed=cfg.train.seed)
    if targets is not None:
        train_ds.labels = np.asarray(targets, np.float32)
    val_ds = SliceDataset(cache, val_rows[rt.rank::rt.world_size], cfg.data)  # no padding duplicates
    train_loader = _loader(train_ds, cfg, rt, train=True)
    optimizer, scheduler, autocast, scaler = optimisation(cfg, model, rt, _steps_per_epoch(cfg, train_loader))
    return Trainer(cfg, rt, model, normalize, WeightedBCE().to(rt.device), optimizer, scheduler, scaler,
                   autocast, train_loader, _loader(val_ds, cfg, rt, train=False), cache, ema=make_ema(model, cfg))


def optimisation(cfg: Config | SeqConfig, model: nn.Module, rt: Runtime, steps: int) -> tuple[
        torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, Callable[[], AbstractContextManager[Any]],
        torch.amp.GradScaler]:
    """AdamW, the warm-up + cosine schedule over ``steps`` per epoch, autocast and grad scaler of a run."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  fused=rt.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps * cfg.train.epochs, round(steps * cfg.train.warmup_epochs)))
    autocast, scaler = precision(rt.device, cfg.train.amp)
    return optimizer, scheduler, autocast, scaler


def make_ema(model: nn.Module, cfg: Config) -> ModelEmaV3 | None:
    """The moving average of ``model``'s weights and buffers (``train.ema_decay`` > 0), else None.

    With warm-up (timm's ``1 - (1 + step)^(-2/3)``, capped at the decay) the average follows the
    network closely in the first steps, so a short run's average is not dominated by its random start.
    """
    if cfg.train.ema_decay <= 0:
        return None
    return ModelEmaV3(unwrap(model), decay=cfg.train.ema_decay, use_warmup=True)


def _steps_per_epoch(cfg: Config | SeqConfig, loader: DataLoader[Any]) -> int:
    """Batches one epoch trains on: the loader's, or ``train.limit_train_batches`` if fewer."""
    return min(len(loader), cfg.train.limit_train_batches or len(loader))


def train_step(t: Trainer, inputs: tuple[torch.Tensor, ...], target: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """One optimisation step on a batch (see :data:`Batch`); returns the detached loss."""
    with t.autocast():
        logits = t.model(*inputs)
        if mask is not None:  # padded sequence positions carry no loss
            logits, target = logits[mask], target[mask]
        loss = t.loss_fn(logits, target)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    if t.cfg.train.grad_clip > 0:
        t.scaler.unscale_(t.optimizer)
        nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.train.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    if t.ema is not None:
        t.ema.update(unwrap(t.model), step=t.scheduler.last_epoch)  # last_epoch counts optimiser steps
    return loss.detach()


def train_one_epoch(t: Trainer, epoch: int, progress: bool) -> dict[str, float]:
    """One pass over this rank's training shard; returns mean loss, images/s and the last lr."""
    t.model.train()
    sampler: Any = t.train_loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    t.train_loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
    steps = _steps_per_epoch(t.cfg, t.train_loader)
    total_loss, n_images, start = torch.zeros((), device=t.rt.device), 0, time.perf_counter()
    first_bad = torch.full((), -1, device=t.rt.device)  # first step with a non-finite loss (no sync per step)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}", leave=False, disable=not (progress and t.rt.is_main))
    for step, batch in enumerate(t.train_loader):
        if step >= steps:  # not islice: a loader run to its end finishes its own iteration (and timers)
            break
        inputs, target, mask = t.to_batch(t, batch)
        loss = train_step(t, inputs, target, mask)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step + 1, first_bad)
        # images (2D) or real slices (sequence: a sync, as packing the series already needs their lengths)
        n = len(target) if mask is None else int(mask.sum())
        total_loss += loss * n  # stays on the device: no sync per step
        n_images += n
        if not bar.disable and step % 10 == 0:  # .item() syncs the GPU: only when someone watches
            rate = n_images * t.rt.world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
        bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    return {"train_loss": float(total_loss.item()) / max(1, n_images),
            "images_per_s": n_images * t.rt.world_size / seconds,
            "lr": float(t.scheduler.get_last_lr()[0]), "first_bad_step": int(first_bad.item())}


def validate(t: Trainer, tta: bool = False) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Validation weighted log loss, calibration error and per-label AUC of :meth:`Trainer.eval_model`
    (identical on every rank), rows and probs."""
    rows, probs = gather(t.rt, *t.infer(t, tta))
    check_finite_predictions(t, rows, probs)
    truth = t.cache.index[list(LABELS)].iloc[rows].to_numpy(dtype=np.float64)
    metrics = {"val_loss": weighted_log_loss(truth, probs), "val_ece": expected_calibration_error(truth, probs)}
    auc = per_label_auc(truth, probs)["auc"]
    metrics.update({f"auc_{name}": float(auc[name]) for name in LABELS})
    return metrics, rows, probs


@dataclass(frozen=True)
class Best:
    """Early-stopping record: the best validation loss so far, its epoch (1-based, -1 before any), and
    the epochs in a row since then without a better one. Saved in ``last.pt`` as plain values."""

    val_loss: float = math.inf
    epoch: int = -1
    bad_epochs: int = 0

    def as_dict(self) -> dict[str, float | int]:
        """Plain values for a checkpoint (``weights_only`` loading takes no dataclasses)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Best:
        """The record saved by :meth:`as_dict`."""
        return cls(float(values["val_loss"]), int(values["epoch"]), int(values["bad_epochs"]))


def _state(t: Trainer, epoch: int, history: list[dict[str, Any]], best: Best) -> dict[str, Any]:
    return {"model": unwrap(t.model).state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict(), "epoch": epoch,
            "ema": t.ema.module.state_dict() if t.ema is not None else None,
            "arch": _arch(t), "config": t.cfg.model_dump(mode="json"),
            "history": history, "best": best.as_dict()}


def _arch(t: Trainer) -> str:
    return resolve_backbone(t.cfg.model.backbone) if isinstance(t.cfg, Config) else t.cfg.model.arch


def _restore(t: Trainer, state: dict[str, Any]) -> None:
    unwrap(t.model).load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None:
        t.ema.module.load_state_dict(state["ema"])


def update_best(best: Best, val_loss: float, epoch: int, select: str = "best") -> tuple[Best, bool]:
    """Selection bookkeeping: the new selected record and whether ``epoch`` replaces the kept weights.

    ``select="best"`` keeps the lowest validation loss (and counts epochs without improvement for
    early stopping); ``select="last"`` keeps every new epoch, so the final one is what remains.
    """
    if select == "last" or val_loss < best.val_loss:
        return Best(val_loss, epoch, 0), True
    return replace(best, bad_epochs=best.bad_epochs + 1), False


def should_stop(cfg: Config | SeqConfig, epoch: int, best: Best) -> bool:
    """All epochs done, or (selecting the best epoch) ``train.patience`` epochs in a row without a better
    validation loss."""
    return epoch >= cfg.train.epochs or (cfg.train.select == "best" and best.bad_epochs >= cfg.train.patience)


def _log_epoch(fold_dir: Path, writer: Any, history: list[dict[str, Any]]) -> None:
    write_text_atomic(fold_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    if writer is not None:
        with naming_full_disk(fold_dir / "tb"):  # its writer thread's failure to write surfaces here
            for key, value in history[-1].items():
                if key != "epoch" and isinstance(value, float) and math.isfinite(value):
                    writer.add_scalar(key, value, history[-1]["epoch"])
            writer.flush()


def train_fold(cfg: Config | SeqConfig, cache: PixelCache, fold_dir: Path, fold: int, rt: Runtime,
               resume: bool = False, progress: bool = True, trainer: Trainer | None = None,
               targets: np.ndarray | None = None) -> dict[str, Any]:
    """Train one fold to the end (or early stop); returns the best epoch's metrics.

    ``trainer``: a ready one (the sequence stage's); by default :func:`build_trainer` builds the 2D one
    (training on ``targets`` instead of the labels where given).
    """
    last = fold_dir / "checkpoints" / "last.pt"
    state = load_state(last, map_location=rt.device) if resume and last.exists() else None
    check_fold_dir(fold_dir, cfg, resume, state)
    t = trainer if trainer is not None else build_trainer(cfg, cache, fold, rt, targets)  # type: ignore[arg-type]
    history: list[dict[str, Any]] = []
    best = Best()
    epoch = 0
    if state is not None:
        _restore(t, state)
        epoch, history, best = state["epoch"], state["history"], Best.from_dict(state["best"])
    writer = None
    if rt.is_main:
        (fold_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter  # slow import, rank 0 only
        writer = SummaryWriter(str(fold_dir / "tb"))
    while not should_stop(cfg, epoch, best):
        torch.manual_seed(cfg.train.seed * 1000 + epoch)  # repeatable epoch: dropout, sampling
        start = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1, **train_one_epoch(t, epoch, progress), "pid": os.getpid()}
        with all_ranks_or_none(rt):  # each rank's own loss: one rank's failure stops them all
            check_finite_loss(record, fold, cfg.train.lr)  # before any file is written: the last good epoch's stay
        metrics, _, _ = validate(t)
        record.update(metrics, seconds=time.perf_counter() - start)
        epoch += 1
        best, improved = update_best(best, metrics["val_loss"], epoch, cfg.train.select)
        history.append(record)
        # also a barrier: nobody starts the next epoch before the checkpoint is on disk, and if rank 0
        # cannot write it (a full disk), every rank stops here
        with all_ranks_or_none(rt):
            if improved and rt.is_main:
                save_weights(t.eval_model(), fold_dir / "best.safetensors")
            if rt.is_main:
                save_state(_state(t, epoch, history, best), last)
                _log_epoch(fold_dir, writer, history)
                tqdm.write(f"fold {fold} epoch {epoch}/{cfg.train.epochs}: train {record['train_loss']:.4f} "
                           f"val {metrics['val_loss']:.4f} ({record['images_per_s']:.0f} img/s)")
    if writer is not None:
        with naming_full_disk(fold_dir / "tb"):
            writer.close()
    oof = _write_oof(t, fold_dir, fold)
    summary = selection_record(cfg, history, best, oof, ema=t.ema is not None)
    with all_ranks_or_none(rt):
        if rt.is_main:
            write_text_atomic(fold_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in [*history, summary]))
    return {"fold": fold, **best.as_dict(), "epochs": epoch, "selected": cfg.train.select, "ema": t.ema is not None}


def selection_record(cfg: Config | SeqConfig, history: list[dict[str, Any]], best: Best,
                     oof: dict[str, float], ema: bool) -> dict[str, Any]:
    """The last line of a fold's metrics.jsonl: which weights ``best.safetensors`` holds, and why.

    ``selected_epoch`` names the history record whose ``val_loss`` those weights scored; ``oof_loss`` and
    ``oof_ece`` are the same weights scored as written to oof.parquet (with TTA if ``train.tta``).
    """
    rule = ("lowest validation loss" if cfg.train.select == "best" else "final epoch (train.select=last)")
    record = next(h for h in history if h["epoch"] == best.epoch)
    return {"selected_epoch": best.epoch, "epochs_run": len(history), "select": cfg.train.select,
            "reason": rule, "weights": "ema" if ema else "raw",
            "ema_decay": cfg.train.ema_decay, "val_loss": record["val_loss"], "val_ece": record.get("val_ece"),
            **oof}


def _write_oof(t: Trainer, fold_dir: Path, fold: int) -> dict[str, float]:
    """Out-of-fold predictions of the kept weights (with TTA) to ``fold_dir/oof.parquet``; their scores."""
    load_weights(t.eval_model(), fold_dir / "best.safetensors")
    metrics, rows, probs = validate(t, tta=t.cfg.train.tta)
    with all_ranks_or_none(t.rt):
        if t.rt.is_main:
            write_parquet_atomic(prediction_table(t.cache, rows, probs, fold=fold), fold_dir / "oof.parquet")
    return {"oof_loss": metrics["val_loss"], "oof_ece": metrics["val_ece"]}


def check_finite_loss(record: dict[str, Any], fold: int, lr: float) -> None:
    """RunFailed naming the fold, epoch and first step if an epoch's training loss was not finite.

    Takes the ``first_bad_step`` field (1-based, -1 for none) out of ``record``: it is not a metric.
    """
    step = record.pop("first_bad_step", -1)
    if step < 0 and math.isfinite(record["train_loss"]):
        return
    where = f"step {step}" if step > 0 else "a step"
    raise RunFailed(f"fold {fold} epoch {record['epoch']}: the training loss became {record['train_loss']} at "
                    f"{where} (train.lr {lr:g}); likely causes: a learning rate too high (lower train.lr "
                    "or raise train.warmup_epochs) or bad input images; the checkpoint of the last good epoch "
                    "is kept")


def check_finite_predictions(t: Trainer, rows: np.ndarray, probs: np.ndarray) -> None:
    """RunFailed naming the fold, epoch and step if the network's validation outputs are not finite.

    The loss can stay finite while the weights diverge (the loss takes logits, and large ones are fine);
    the next prediction then shows it.
    """
    if len(rows) == 0 or np.isfinite(probs).all():
        return
    fold = int(t.cache.index["fold"].iloc[int(rows[0])])
    step = int(t.scheduler.last_epoch)  # optimisation steps so far
    epoch = math.ceil(step / max(1, _steps_per_epoch(t.cfg, t.train_loader)))
    raise RunFailed(f"fold {fold} epoch {epoch}: the network's outputs are not finite after step {step} (train.lr "
                    f"{t.cfg.train.lr:g}): its weights diverged; likely causes: a learning rate too high (lower "
                    "train.lr or raise train.warmup_epochs) or bad input images; the checkpoint of the last good "
                    "epoch is kept")


def train(cfg: Config, data: str | Path, out: str | Path, fold: str = "all", resume: bool = False,
          progress: bool = True, targets: np.ndarray | None = None,
          extra_files: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Train the given fold(s) of ``cfg`` on the cache ``data`` into run directory ``out``.

    ``targets``: per cache row, what the network trains on instead of the labels (distillation);
    ``extra_files``: more files written next to ``config.yaml`` (name -> text), with it.

    Every check that could refuse the run (device, folds, labels, model, an existing checkpoint, a resume
    or run folder with a different config) comes before anything is written, so a refused ``train``
    changes nothing; ``config.yaml`` is written once they all passed, under the folder's writer lock
    (rank 0 only under torchrun).
    """
    rt = init_runtime(cfg.train.device)
    cache, run = PixelCache(data), Path(out)
    results = []
    try:
        plan_run(cfg, cache, run, fold, resume)
        build_model(cfg.model, cfg.data.in_chans)  # an unknown backbone or unreadable weights fail here
        with ExitStack() as held:
            with all_ranks_or_none(rt):  # only rank 0 takes the lock and writes: its failure stops every rank
                if rt.is_main:
                    held.enter_context(folder_lock(run, "ichdet train"))
                folds = plan_run(cfg, cache, run, fold, resume)  # again: another writer may have finished meanwhile
                if rt.is_main:
                    write_text_atomic(run / "config.yaml", config_to_yaml(cfg))
                    write_run_record(run, cache.manifest.provenance)  # what the run is trained on
                    for name, text in (extra_files or {}).items():
                        write_text_atomic(run / name, text)
            for k in folds:
                results.append(train_fold(cfg, cache, run / f"fold{k}", k, rt, resume, progress, targets=targets))
            with all_ranks_or_none(rt):
                if rt.is_main:
                    write_parquet_atomic(merge_oof(run, cache), run / "oof.parquet")
    finally:
        if rt.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return results
