"""Sequence runs under torchrun: two CPU processes (gloo) train the same model as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from seq_support import RESNET18_BASE, trained_base

from ichdet.cache.store import PixelCache
from ichdet.models.config import load_seq_config
from ichdet.models.sequence import series_rows
from ichdet.names import LABELS
from ichdet.train.seq import train_seq

# no dropout (its masks depend on the batch's shape), every epoch kept: the two runs must be the same model
SEQ = ["model.hidden=16", "model.dropout=0.0", "features.batch_size=32", "features.num_workers=0",
       "train.device=cpu", "train.amp=off", "train.epochs=3", "train.select=last"]


@pytest.fixture(scope="module")
def equal_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-fold cache of series of one length (8 slices) and a base run trained on both folds."""
    return trained_base(tmp_path_factory.mktemp("seq_ddp"), seed=5, slices=(8, 8), base=RESNET18_BASE)


def _probs(run: Path) -> np.ndarray:
    return pd.read_parquet(run / "fold0" / "oof.parquet").sort_values("image_id")[list(LABELS)].to_numpy()


def test_two_processes_train_the_model_one_process_trains(equal_series: tuple[Path, Path], tmp_path: Path) -> None:
    cache_dir, base_dir = equal_series
    index = PixelCache(cache_dir).index
    train_series = [s for s in series_rows(index) if index["fold"].iloc[s[0]] == 1]  # fold 0's training set
    # an even count of equal series: two shares of 2 series per step are exactly one batch of 4 (the mean
    # loss over 2 x 16 slices, averaged over the processes, is the mean over 32), no sampler padding
    assert len(train_series) % 2 == 0 and {len(s) for s in series_rows(index)} == {8}
    one = tmp_path / "one"
    train_seq(load_seq_config(Path("configs/seq_bigru.yaml"), [*SEQ, "train.batch_size=4"]), [base_dir],
              cache_dir, one, fold="0", progress=False)
    two = tmp_path / "two"
    # --base, not --run: torchrun's parser would take --run for an abbreviation of its --run-path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ichdet",
           "seq", "train", "--base", str(base_dir), "--data", str(cache_dir), "--out", str(two), "--fold", "0",
           "--config", "configs/seq_bigru.yaml", *[f"--set={s}" for s in [*SEQ, "train.batch_size=2"]]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.relative_to(two).as_posix() for p in two.rglob("*.pt")] == ["fold0/checkpoints/last.pt"]
    oof = pd.read_parquet(two / "fold0" / "oof.parquet")
    val = index.loc[index["fold"] == 0, "image_id"]
    assert len(oof) == len(val) and set(oof["image_id"]) == set(val)  # both processes' shares, gathered once
    # the same model: without gradient averaging each process would train its own, and the share
    # validated by process 1 would not be the weights process 0 saved
    np.testing.assert_allclose(_probs(two), _probs(one), atol=1e-5)
