"""The inference engine shared by training and prediction: runtime, precision, input normalisation,
loaders and batched inference with test-time augmentation.

The trainer (:mod:`ichdet.train.loop`) keeps the optimisation loop; everything that runs a trained network
over images (validation, ``ichdet predict``, the sequence stage, study prediction, Grad-CAM) calls
this module, never the trainer. One code path for CPU and GPU: the autocast factory is a no-op where
mixed precision is off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ichdet.cache.store import PixelCache
from ichdet.errors import ConfigError, IchdetError, RunFailed
from ichdet.names import LABELS


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: device and its place in a torchrun job (rank 0 of 1 alone)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes files."""
        return self.rank == 0


def check_device(device: str) -> torch.device:
    """``device`` as a torch device if this machine has it; ConfigError naming what it has otherwise.

    Called before any work, so that ``train.device=cuda`` on a machine without a GPU (or ``cuda:7`` on
    one with two) fails at once instead of after the data is loaded.
    """
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (gpus == 0 or (dev.index or 0) >= gpus):
        has = f"CUDA devices cuda:0 to cuda:{gpus - 1}" if gpus else "no CUDA device"
        raise ConfigError(f"device {device!r} is not available: this machine has {has}; "
                          "use train.device=auto or cpu (or --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} is not available on this machine; use auto or cpu")
    if dev.type not in {"cpu", "cuda", "mps"}:
        raise ConfigError(f"device {device!r}: ichdet runs on cpu, cuda or mps")
    return dev


def init_runtime(device: str = "auto") -> Runtime:
    """Pick the device and join the torchrun process group when launched by torchrun.

    Raises:
        ConfigError: ``device`` is not a device this machine has (see :func:`check_device`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    if dev.type == "cuda":
        dev = dev if dev.index is not None else torch.device("cuda", local)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return Runtime(dev, rank, world)


@contextmanager
def all_ranks_or_none(rt: Runtime) -> Iterator[None]:
    """Run the block on every rank; if it fails on one rank, it fails on every rank, at its end.

    Under torchrun, a failure that only one rank can have (a check or a write that only rank 0 makes,
    a non-finite loss on one rank's shard) would otherwise leave the other ranks waiting in their next
    collective for a rank that has gone. The block's end is a collective (every rank must enter the
    block at the same point, as for a barrier, and the block itself must make no collective call):
    each rank says whether its block raised; the rank that raised re-raises its error, every other
    rank raises :class:`~ichdet.errors.RunFailed` naming the first failed rank and its message.
    Alone (one process), the block runs as is.
    """
    if rt.world_size == 1:
        yield
        return
    try:
        yield
    except Exception as err:
        _share_failure(rt, err if isinstance(err, IchdetError) else f"{type(err).__name__}: {err}")
        raise
    _share_failure(rt, None)


def _share_failure(rt: Runtime, failure: object) -> None:
    """Every rank's failure message (None: none); RunFailed on a rank that did not fail if another did."""
    messages: list[Any] = [None] * rt.world_size
    dist.all_gather_object(messages, None if failure is None else str(failure))
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failure is None and failed:
        rank, message = failed[0]
        raise RunFailed(f"rank {rank} failed: {message}")


def precision(device: torch.device, amp: str) -> tuple[Callable[[], AbstractContextManager[Any]],
                                                       torch.amp.GradScaler]:
    """An autocast factory (a no-op where AMP is off) and a grad scaler (enabled only for fp16)."""
    if amp == "auto":
        amp = "off" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if amp != "off" and device.type != "cuda":
        raise ConfigError(f"train.amp={amp} needs a CUDA device, not {device}; use train.amp=off or auto")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    if dtype is None:
        return nullcontext, scaler
    return lambda: torch.autocast(device.type, dtype=dtype), scaler


class Normalizer(nn.Module):
    """uint8 NCHW on the device -> float, scaled to the backbone's mean/std (optionally channels_last)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> None:
        super().__init__()
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, -1, 1, 1))
        self.register_buffer("shift", (mean / std).view(1, -1, 1, 1))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)  # transpose while still uint8 (4x less data)
        return x.float().mul_(self.scale).sub_(self.shift)


def make_loader(ds: Dataset[Any], batch_size: int, num_workers: int, device: torch.device,
                sampler: DistributedSampler[int] | None = None, drop_last: bool = False) -> DataLoader[Any]:
    """A DataLoader with the settings that keep a GPU fed: pinned memory, prefetching, 1 OpenCV thread per worker.

    The workers of an augmenting dataset restart each epoch so that the dataset's epoch number, which
    seeds augmentation, reaches them; those of a plain one (validation, prediction) stay up between
    passes.
    """
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["prefetch_factor"] = 4
        extra["persistent_workers"] = getattr(ds, "augment", None) is None
        # One process per core already, so no OpenCV threads on top. Set here, in the parent, and inherited:
        # cv2.setNumThreads in a forked worker deadlocks once the parent has used OpenCV's thread pool.
        cv2.setNumThreads(1)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=device.type == "cuda", **extra)


@torch.inference_mode()
def predict_batches(models: Sequence[nn.Module], normalize: Normalizer, loader: DataLoader[Any],
                    device: torch.device, autocast: Callable[[], AbstractContextManager[Any]], tta: bool,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid probabilities of each model for every sample of ``loader``: rows (N,), probs (models, N, 6).

    Each batch is loaded once for all the models (a run's folds); with ``tta``, each model sees the batch
    and its mirror image in one pass and the two are averaged.
    """
    for model in models:
        model.eval()
    rows, probs = [], []
    for images, _, row in tqdm(loader, desc="predict", leave=False, disable=not progress):
        images = images.to(device, non_blocking=True)
        if tta:  # the mirror image in the same batch, flipped while still uint8 (4x less data than float)
            images = torch.cat([images, torch.flip(images, dims=[3])])
        x = normalize(images)
        with autocast():
            p = torch.stack([torch.sigmoid(model(x).float()) for model in models])
        probs.append(p.view(len(models), 2, -1, p.shape[-1]).mean(1) if tta else p)  # on the device: no sync
        rows.append(row)
    if not probs:
        return np.zeros(0, np.int64), np.zeros((len(models), 0, len(LABELS)), np.float32)
    return torch.cat(rows).numpy(), torch.cat(probs, dim=1).cpu().numpy()


def gather(rt: Runtime, rows: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (rows, probs), concatenated and ordered by row, on every rank."""
    if rt.world_size > 1:
        parts: list[Any] = [None] * rt.world_size
        dist.all_gather_object(parts, (rows, probs))
        rows = np.concatenate([p[0] for p in parts])
        probs = np.concatenate([p[1] for p in parts])
    order = np.argsort(rows, kind="stable")
    return rows[order], probs[order]


def prediction_table(cache: PixelCache, rows: np.ndarray, probs: np.ndarray, **keys: str | int) -> pd.DataFrame:
    """Probabilities (N, 6) of index ``rows`` as a table: image_id, one column per ``keys`` item, LABELS."""
    table = pd.DataFrame(probs, columns=list(LABELS))
    table.insert(0, "image_id", cache.index["image_id"].to_numpy()[rows])
    for position, (name, value) in enumerate(keys.items(), start=1):
        table.insert(position, name, value)
    return table


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm network's pooled penultimate embedding and its logits, concatenated: (N, features + 6)."""
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
    return torch.cat([pooled, model.get_classifier()(pooled)], dim=1)  # type: ignore[operator]


@torch.inference_mode()
def embed_batches(model: nn.Module, normalize: Normalizer, loader: DataLoader[Any], device: torch.device,
                  autocast: Callable[[], AbstractContextManager[Any]], tta: bool,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`embed` of every sample of ``loader``: rows (N,), float32 (N, features + 6).

    With ``tta`` the image and its mirror go through in one pass and their embeddings and logits are
    averaged (the sequence stage's features, flip-TTA as the 2D predictions).
    """
    model.eval()
    rows, feats = [], []
    for images, _, row in tqdm(loader, desc="features", leave=False, disable=not progress):
        images = images.to(device, non_blocking=True)
        if tta:
            images = torch.cat([images, torch.flip(images, dims=[3])])
        with autocast():
            f = embed(model, normalize(images)).float()
        feats.append(f.view(2, -1, f.shape[-1]).mean(0) if tta else f)
        rows.append(row)
    if not feats:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return torch.cat(rows).numpy(), torch.cat(feats).cpu().numpy()
