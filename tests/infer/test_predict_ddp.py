"""``torchrun -m ichdet predict``: two CPU processes (gloo) share the cache and write the one-process table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from seq_support import SeqRuns

from ichdet.cache.store import PixelCache
from ichdet.infer.bundle import write_bundle
from ichdet.infer.predict import predict_runs, shard_rows
from ichdet.models.sequence import series_rows
from ichdet.names import LABELS


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_whole_series_covering_the_cache_once(seq_runs: SeqRuns, world: int) -> None:
    index = PixelCache(seq_runs.cache).index
    shards = [shard_rows(index, rank, world) for rank in range(world)]
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(len(index)))
    for s in series_rows(index):
        assert sum(np.isin(s, shard).all() for shard in shards) == 1  # each series whole on one rank


def test_two_processes_write_the_one_process_table(seq_runs: SeqRuns, tmp_path: Path) -> None:
    bundle = write_bundle([seq_runs.base, seq_runs.seq], tmp_path / "m.ichdet")  # a 2D and a sequence member
    one = predict_runs([], seq_runs.cache, bundle=bundle, device="cpu")
    out = tmp_path / "two.parquet"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ichdet",
           "predict", "--bundle", str(bundle), "--data", str(seq_runs.cache), "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [int(re.search(rf"rank {r} of 2: (\d+) of {len(PixelCache(seq_runs.cache))} images", done.stderr)[1])
              for r in (0, 1)]  # type: ignore[index]
    assert sum(shares) == len(PixelCache(seq_runs.cache)) and min(shares) > 0  # each rank predicted its share
    two = pd.read_parquet(out)
    assert two[["image_id", "model", "fold"]].equals(one[["image_id", "model", "fold"]])
    # the same networks over the same images; only the batches' make-up differs between the runs
    np.testing.assert_allclose(two[list(LABELS)].to_numpy(), one[list(LABELS)].to_numpy(), rtol=0, atol=1e-6)
