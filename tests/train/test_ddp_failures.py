"""torchrun: a failure on one rank ends every rank with a clear error and a non-zero exit, instead of
leaving the others waiting in a collective for a rank that is gone.

Two CPU processes (gloo) per case. The subprocess timeout is a hang guard, not a time measurement.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from synth_support import synth_cache

from ichdet.io import folder_lock
from ichdet.models.config import build_config
from ichdet.train.loop import train

SRC = Path(__file__).resolve().parents[2] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ["model.backbone=resnet18", "data.image_size=64", "train.batch_size=16", "train.num_workers=0",
        "train.device=cpu", "train.amp=off", "train.channels_last=false", "train.epochs=1",
        "train.limit_train_batches=2", "train.warmup_epochs=0.2"]
SEQ = ["model.hidden=16", "features.batch_size=32", "features.num_workers=0", "train.device=cpu", "train.amp=off",
       "train.batch_size=4", "train.epochs=2", "train.patience=10"]
SEQ_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "seq_bigru.yaml"
HANG_GUARD_S = 300


def torchrun(*args: str, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node 2 -m ichdet ARGS`` (files limited to ``limit`` bytes if given)."""
    def no_room() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # type: ignore[arg-type]

    # "--": torchrun would take ichdet's --run for an abbreviation of its own --run-path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "--", "ichdet",
           *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=HANG_GUARD_S, check=False,
                          preexec_fn=None if limit is None else no_room)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    return synth_cache(root, studies=4, size=64, slices=(10, 12), seed=4)


@pytest.fixture(scope="module")
def base(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D run trained on both folds of ``cache``: the sequence stage's base."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(build_config({}, TINY), cache, run, fold="all", progress=False)
    return run


def _errors(done: subprocess.CompletedProcess[str]) -> list[str]:
    return sorted(line for line in done.stderr.splitlines() if line.startswith("error: "))


def test_a_check_only_rank_0_makes_ends_every_rank(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with folder_lock(run, "ichdet train"):  # another train writes the run: only rank 0 takes the lock
        done = torchrun("train", "--data", str(cache), "--out", str(run), "--fold", "0", *[f"--set={s}" for s in TINY])
    assert done.returncode != 0
    held = f"{run} is being written by pid {os.getpid()} (ichdet train); wait for it to finish or choose another " \
           "output folder"
    assert _errors(done) == [f"error: {held}", f"error: rank 0 failed: {held}"], done.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == [".ichdet.lock"]


def test_a_full_disk_on_rank_0_ends_every_rank(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = torchrun("train", "--data", str(cache), "--out", str(run), "--fold", "0", *[f"--set={s}" for s in TINY],
                    limit=1 << 20)  # rank 0 writes the checkpoints, which do not fit
    assert done.returncode != 0
    full = (f"could not write {run / 'fold0' / 'best.safetensors'}: file too large; raise the file size limit "
            "(ulimit -f) or write elsewhere and run the command again (files written before are as they were)")
    assert _errors(done) == [f"error: {full}", f"error: rank 0 failed: {full}"], done.stderr[-3000:]
    assert not (run / "fold0" / "best.safetensors").exists()
    assert not (run / "fold0" / "checkpoints" / "last.pt").exists()


def test_seq_train_runs_under_torchrun_and_stops_every_rank_on_one_ranks_failure(cache: Path, base: Path,
                                                                                 tmp_path: Path) -> None:
    def seq(out: Path) -> subprocess.CompletedProcess[str]:
        return torchrun("seq", "train", "--run", str(base), "--data", str(cache), "--out", str(out), "--fold", "0",
                        "--config", str(SEQ_CONFIG), *[f"--set={s}" for s in SEQ])

    done = seq(tmp_path / "seq")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "seq" / "fold0" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (tmp_path / "seq" / "oof.parquet").is_file()  # 2 epochs and the selection record
    held_run = tmp_path / "held"
    with folder_lock(held_run, "ichdet seq train"):
        done = seq(held_run)
    assert done.returncode != 0
    held = f"{held_run} is being written by pid {os.getpid()} (ichdet seq train); wait for it to finish or " \
           "choose another output folder"
    assert _errors(done) == [f"error: {held}", f"error: rank 0 failed: {held}"], done.stderr[-3000:]
