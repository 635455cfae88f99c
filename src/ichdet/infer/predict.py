"""Batched inference of trained runs on a cache, with test-time augmentation.

The output is one long table: ``image_id, model, fold`` and the six probabilities, one row per image
per fold of each run, which :mod:`ichdet.evaluate.ensembling` averages (folds first, then models). A
bundle's table also carries each member's ensemble weight (column ``weight``), which ``ichdet
ensemble`` uses, so its probabilities are the bundle's own, as ``predict-study`` computes them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from ichdet.cache.store import PixelCache
from ichdet.errors import IchdetError, RunFailed
from ichdet.infer.bundle import Member, load_ensemble, run_names
from ichdet.infer.passes import FoldPasses, plan_needs
from ichdet.infer.seq_predict import seq_fold_probs
from ichdet.models.engine import Runtime, all_ranks_or_none, init_runtime, prediction_table
from ichdet.models.sequence import series_rows
from ichdet.names import LABELS


def check_out(out: str | Path, force: bool = False) -> Path:
    """Where ``predict`` may write: a new file, or a prediction table of its own (any file with ``force``).

    Called before any work, so a refused ``predict`` changes nothing and costs nothing.
    """
    out = Path(out)
    if out.is_dir():
        raise IchdetError(f"--out {out} is a folder; give the path of a .parquet file to write")
    if out.exists() and not force and not _is_prediction_table(out):
        raise IchdetError(f"--out {out} exists and is not a prediction table written by `ichdet predict`; "
                          "choose another path or pass --force to replace it")
    return out


def _is_prediction_table(path: Path) -> bool:
    """Whether ``path`` is a Parquet file with the columns of :func:`predict_run`'s table."""
    try:
        names = set(pq.read_schema(path).names)
    except (pa.ArrowException, OSError):
        return False
    return names - {"weight"} == {"image_id", "model", "fold", *LABELS}


def check_predictions(preds: pd.DataFrame) -> pd.DataFrame:
    """Refuse a prediction table whose model folds cover different images or hold non-finite or
    out-of-range probabilities (RunFailed naming the model and fold); return it unchanged."""
    values = preds[list(LABELS)].to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(values) & (values >= 0) & (values <= 1)).all(axis=1)
    if bad.any():
        row = preds.loc[bad].iloc[0]
        raise RunFailed(f"model {row['model']} fold {row['fold']} predicted {int(bad.sum())} rows outside "
                        f"[0, 1] or not finite (first: image {row['image_id']}); its weights are broken, retrain it")
    groups = {key: frozenset(ids) for key, ids in preds.groupby(["model", "fold"])["image_id"]}
    first_key, first = next(iter(groups.items()))
    for key, ids in groups.items():
        if ids != first:
            raise RunFailed(f"model {key[0]} fold {key[1]} covers {len(ids)} images and model {first_key[0]} fold "
                            f"{first_key[1]} {len(first)}, not the same ones; every fold must predict every image")
    return preds


#: What a member predicts from: a cache, or a function giving the images stored at a size (a study in
#: memory, :meth:`ichdet.study.predict.StudyPrediction.cache`, stored at each network's own image size).
Images: TypeAlias = PixelCache | Callable[[int], PixelCache]


def images_at(images: Images, size: int) -> PixelCache:
    """The cache ``images`` is, or the one it gives at ``size`` pixels."""
    return images if isinstance(images, PixelCache) else images(size)


def ensemble_probs(members: Sequence[Member], images: Images, device: torch.device, tta: bool = True,
                   batch_size: int | None = None, num_workers: int | None = None,
                   progress: bool = False, rows: np.ndarray | None = None) -> list[np.ndarray]:
    """Every fold of every member over every image, in image order: per member, probs (folds, N, 6).

    The one place members (2D or sequence, from run folders or a bundle) meet images: ``predict``,
    ``predict-study`` and ``report`` all call it, once per call with all the members. Each (2D run,
    fold, TTA view) CNN pass runs once (:class:`ichdet.infer.passes.FoldPasses`): a 2D member's fold
    probabilities are the sigmoid of the logits of the same pass whose embedding and logits its
    sequence members read, and the images are read and windowed once per image setting (per fold
    group, see :mod:`ichdet.infer.passes` for memory). Fold ``k``'s base CNNs feed fold ``k``'s sequence model
    (:func:`ichdet.infer.seq_predict.seq_fold_probs`). ``rows`` (whole series; default every image):
    only those images are predicted, the others' probabilities stay zero (a torchrun rank's shard).
    """
    passes = FoldPasses(plan_needs(members, tta), partial(images_at, images), device, batch_size, num_workers,
                        progress, rows)
    series = series_rows(images_at(images, _some_size(members)).index) if any(m.kind == "seq" for m in members) else []
    if rows is not None:
        series = [s for s in series if np.isin(s[0], rows)]
    out = [np.zeros((len(m.folds), passes.n, len(LABELS)), np.float32) for m in members]
    for group in passes.fold_groups():
        passes.compute(group)
        for m, probs in zip(members, out, strict=True):
            for i, fold in enumerate(m.folds):
                if fold in group:
                    probs[i] = (seq_fold_probs(m, fold, passes, tta, series, device) if m.kind == "seq"
                                else passes.probs(m, fold))
        passes.release(group)
    return out


def _some_size(members: Sequence[Member]) -> int:
    """The image size of the first 2D run the members read (every size holds the same rows)."""
    return members[0].image_members()[0].run_config.data.image_size


def member_tables(members: Sequence[Member], cache: PixelCache, tta: bool = True, batch_size: int | None = None,
                  device: str = "auto", num_workers: int | None = None, progress: bool = False) -> pd.DataFrame:
    """Predict every image of ``cache`` with every fold of every member in one call; a long table."""
    rt = init_runtime(device)
    if rt.world_size > 1:
        found = _sharded_probs(members, cache, rt, tta, batch_size, num_workers, progress)
    else:
        found = ensemble_probs(members, cache, rt.device, tta, batch_size, num_workers, progress)
    rows = np.arange(len(cache))
    return pd.concat([prediction_table(cache, rows, fold_probs, model=member.name, fold=fold)
                      for member, probs in zip(members, found, strict=True)
                      for fold, fold_probs in zip(member.folds, probs, strict=True)], ignore_index=True)


def shard_rows(index: pd.DataFrame, rank: int, world_size: int) -> np.ndarray:
    """The index rows rank ``rank`` of ``world_size`` predicts: every ``world_size``-th series, whole (a
    sequence member reads a series at once), in index order."""
    mine = [s for i, s in enumerate(series_rows(index)) if i % world_size == rank]
    return np.sort(np.concatenate(mine)) if mine else np.zeros(0, np.int64)


def _sharded_probs(members: Sequence[Member], cache: PixelCache, rt: Runtime, tta: bool, batch_size: int | None,
                   num_workers: int | None, progress: bool) -> list[np.ndarray]:
    """:func:`ensemble_probs` under torchrun: each rank predicts its shard (:func:`shard_rows`), every rank
    gets all of them (each image's numbers are the ones its rank computed, as one process computes them)."""
    rows = shard_rows(cache.index, rt.rank, rt.world_size)
    tqdm.write(f"rank {rt.rank} of {rt.world_size}: {len(rows)} of {len(cache)} images", file=sys.stderr)
    try:
        with all_ranks_or_none(rt):  # a rank that fails stops the others instead of leaving them in the gather
            found = ensemble_probs(members, cache, rt.device, tta, batch_size, num_workers, progress and rt.is_main,
                                   rows)
        parts: list[Any] = [None] * rt.world_size
        dist.all_gather_object(parts, (rows, [p[:, rows] for p in found]))
    finally:
        dist.destroy_process_group()
    for other_rows, probs in parts:
        for mine, theirs in zip(found, probs, strict=True):
            mine[:, other_rows] = theirs
    return found


def predict_run(run: str | Path, cache: PixelCache, tta: bool = True, batch_size: int | None = None,
                device: str = "auto", num_workers: int | None = None,
                progress: bool = False) -> pd.DataFrame:
    """Predict every image of ``cache`` with every fold of one run; a long table (see module doc).

    A sequence run (:mod:`ichdet.train.seq`) predicts the same table through its base runs' folds.
    """
    return member_tables(load_ensemble(runs=[Path(run)]).members, cache, tta, batch_size, device, num_workers,
                         progress)


def predict_runs(runs: Sequence[str | Path], data: str | Path, tta: bool = True, device: str = "auto",
                 progress: bool = False, bundle: str | Path | None = None) -> pd.DataFrame:
    """Every member of a bundle, or every run folder (2D or sequence), over one cache; one long table.

    A bundle's table has a ``weight`` column: each member's ensemble weight, as the bundle holds it.
    Giving both a bundle and runs is refused (IchdetError) before any work. Under torchrun
    (``torchrun --nproc-per-node N -m ichdet predict ...``) the ranks share the cache's series and every
    rank returns the whole table (the command writes it from rank 0).
    """
    if bundle is not None and runs:
        raise IchdetError("give either --bundle or --run, not both: a bundle already holds its runs")
    run_names(runs)  # refuses two runs of one name before any work
    cache = PixelCache(data)
    members = load_ensemble(None if bundle is None else Path(bundle), [Path(r) for r in runs]).members
    table = check_predictions(member_tables(members, cache, tta, device=device, progress=progress))
    if bundle is not None:
        table["weight"] = table["model"].map({m.name: m.weight for m in members}).astype(np.float64)
    return table
