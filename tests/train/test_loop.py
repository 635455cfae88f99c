"""Training, resume, DDP, prediction and submission end to end on a tiny synthetic cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from synth_support import synth_cache

from ichdet.cache.labels import validate_submission, write_submission
from ichdet.cache.writer import PreprocessOptions, preprocess
from ichdet.errors import ConfigError, IchdetError, LockError, RunFailed
from ichdet.evaluate.ensembling import ensemble, read_predictions
from ichdet.infer.predict import predict_runs
from ichdet.io import folder_lock
from ichdet.models.config import build_config, config_to_yaml
from ichdet.train.loop import train

TINY = ["model.backbone=resnet18", "data.image_size=64", "train.batch_size=16", "train.num_workers=0",
        "train.device=cpu", "train.lr=0.002", "train.warmup_epochs=0.2", "train.channels_last=false",
        "train.patience=10"]
TIMING = ("seconds", "images_per_s", "pid")  # the only fields allowed to differ between identical runs


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return synth_cache(root, studies=8, test_studies=1, size=64, slices=(10, 12), seed=1)


def _records(run: Path, fold: int = 0) -> list[dict[str, float]]:
    """The epoch records of a fold's metrics.jsonl (once the fold ends, a selection record follows them)."""
    lines = (run / f"fold{fold}" / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "epoch" in record]


def _history(run: Path, fold: int = 0) -> list[dict[str, float]]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in _records(run, fold)]


def test_loss_falls(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = build_config({}, [*TINY, "train.epochs=4"])
    result = train(cfg, tiny_cache, tmp_path / "run", fold="0", progress=False)
    history = _history(tmp_path / "run")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert result[0]["val_loss"] < history[0]["val_loss"]
    oof = pd.read_parquet(tmp_path / "run" / "fold0" / "oof.parquet")
    index = pd.read_parquet(tiny_cache / "index.parquet")
    assert sorted(oof["image_id"]) == sorted(index.loc[index["fold"] == 0, "image_id"])
    assert oof[["epidural", "any"]].stack().between(0, 1).all()
    assert (tmp_path / "run" / "config.yaml").exists()
    assert list((tmp_path / "run" / "fold0" / "tb").iterdir())


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time: what "changes nothing" compares."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refused_train_changes_nothing_and_resume_ignores_the_runtime(tiny_cache: Path, tmp_path: Path) -> None:
    short = [*TINY, "train.epochs=1", "train.limit_train_batches=1"]
    run = tmp_path / "run"
    train(build_config({}, short), tiny_cache, run, fold="0", progress=False)
    before = _snapshot(run)
    refusals = [  # (config overrides, fold, resume) -> error
        (short, "0", False, r"fold0 already holds a checkpoint; pass --resume"),
        ([*short, "train.lr=0.1"], "0", True, r"trained with a different config \(train.lr\)"),
        ([*short, "train.lr=0.1", "data.image_size=32", "name=x"], "0", True,
         r"different config \(data.image_size, train.lr\)"),
        ([*short, "train.lr=0.1"], "1", False, r"holds folds trained with a different config \(train.lr\)"),
        (short, "7", False, r"--fold '7': the cache at .* has folds \[0, 1\]"),
        (short, "x", True, r"--fold 'x'"),
    ]
    for overrides, fold, resume, match in refusals:
        with pytest.raises(IchdetError, match=match):
            train(build_config({}, overrides), tiny_cache, run, fold=fold, resume=resume, progress=False)
        assert _snapshot(run) == before, (overrides, fold)
    fresh = tmp_path / "fresh"
    with pytest.raises(IchdetError, match=r"--fold '3'"):
        train(build_config({}, short), tiny_cache, fresh, fold="3", progress=False)
    assert not fresh.exists()
    # device, workers, compile, tta and the name do not change what a run learns: a resume may change them
    runtime = [*short, "train.num_workers=1", "train.device=auto", "train.tta=false", "name=elsewhere"]
    result = train(build_config({}, runtime), tiny_cache, run, fold="0", resume=True, progress=False)
    assert result[0]["epochs"] == 1 and len(_history(run)) == 1  # nothing left to train: not restarted
    assert "num_workers: 1" in (run / "config.yaml").read_text()


def test_stale_and_stray_fold_folders(tiny_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    index = pd.read_parquet(tiny_cache / "index.parquet")
    stale = index.loc[index["fold"] == 1, ["image_id", "fold"]].iloc[:3]
    for name in ("fold1", "fold5", "fold0_old"):
        (run / name).mkdir(parents=True)
        stale.to_parquet(run / name / "oof.parquet")
    before = _snapshot(run)
    cfg = build_config({}, [*TINY, "train.epochs=1", "train.limit_train_batches=1"])
    with pytest.raises(IchdetError, match=r"fold1/oof.parquet does not hold the images of fold 1 of the cache"):
        train(cfg, tiny_cache, run, fold="0", progress=False)
    assert _snapshot(run) == before
    (run / "fold1" / "oof.parquet").unlink()
    train(cfg, tiny_cache, run, fold="0", progress=False)
    oof = pd.read_parquet(run / "oof.parquet")  # fold5 (not a fold of this cache) and fold0_old never merged
    assert sorted(oof["image_id"]) == sorted(index.loc[index["fold"] == 0, "image_id"])


def test_one_writer_per_run_folder(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = build_config({}, [*TINY, "train.epochs=1", "train.limit_train_batches=1"])
    with (folder_lock(tmp_path / "run", "another ichdet train"),
          pytest.raises(LockError, match=r"run is being written by pid \d+ \(another ichdet train\)")):
        train(cfg, tiny_cache, tmp_path / "run", fold="0", progress=False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".ichdet.lock"]


def test_unavailable_device_fails_before_any_work(tiny_cache: Path, tmp_path: Path) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cfg = build_config({}, [*TINY, f"train.device=cuda:{gpus}"])
    with pytest.raises(ConfigError, match=rf"device 'cuda:{gpus}' is not available"):
        train(cfg, tiny_cache, tmp_path / "run", fold="0", progress=False)
    assert not (tmp_path / "run").exists()


def test_cache_without_labels_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    images = tiny_cache.parent / "data" / "stage_2_test_images"
    preprocess(images, tmp_path / "unlabelled", None, PreprocessOptions(size=64, workers=1, progress=False))
    with pytest.raises(IchdetError, match=r"has no labelled images to train on.*--labels"):
        train(build_config({}, TINY), tmp_path / "unlabelled", tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_diverging_weights_stop_the_run(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = build_config({}, [*TINY, "train.epochs=1", "train.limit_train_batches=2", "train.lr=1000"])
    with pytest.raises(RunFailed, match=r"fold 0 epoch 1: .* not finite after step 2 .*learning rate too high"):
        train(cfg, tiny_cache, tmp_path / "run", fold="0", progress=False)
    assert not (tmp_path / "run" / "fold0" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "fold0" / "best.safetensors").exists()


def test_non_finite_loss_keeps_the_last_good_epoch(tiny_cache: Path, tmp_path: Path) -> None:
    """A run killed after epoch 1 of 2 whose weights then hold a NaN (a poisoned batch's update): epoch 2's
    first step has a NaN loss, the run stops naming it, and epoch 1's files stay as they were."""
    run, short = tmp_path / "run", [*TINY, "train.limit_train_batches=1"]
    train(build_config({}, [*short, "train.epochs=1"]), tiny_cache, run, fold="0", progress=False)
    cfg = build_config({}, [*short, "train.epochs=2"])
    last = run / "fold0" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["config"] = cfg.model_dump(mode="json")  # as if the run had been killed after epoch 1 of 2
    next(iter(state["model"].values())).fill_(float("nan"))
    torch.save(state, last)
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    kept = ("checkpoints/last.pt", "best.safetensors", "metrics.jsonl", "oof.parquet")  # epoch 1's
    before = _snapshot(run / "fold0")
    assert set(kept) <= before.keys()
    with pytest.raises(RunFailed, match=r"fold 0 epoch 2: the training loss became nan at step 1 \(train.lr 0.002\)"):
        train(cfg, tiny_cache, run, fold="0", resume=True, progress=False)
    after = _snapshot(run / "fold0")
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ichdet", *args]


def test_killed_run_resumes_to_the_same_history(tiny_cache: Path, tmp_path: Path) -> None:
    sets = [f"--set={s}" for s in [*TINY, "train.epochs=4"]]
    common = ["train", "--data", str(tiny_cache), "--fold", "0", *sets]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(_cli(*common, "--out", str(tmp_path / "straight")), check=True, env=env,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--out", str(killed)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed / "fold0" / "metrics.jsonl"
    deadline = time.monotonic() + 600  # a guard against a hung child, not a timing check
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline, "the training child wrote no epoch within 10 minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(_history(killed))
    assert 1 <= done_before < 4, "the run must have been killed part-way"
    assert not (killed / "fold0" / "oof.parquet").exists()  # written when the fold ends
    killed_pids = {h["pid"] for h in _records(killed)}
    assert killed_pids == {proc.pid}
    resume = subprocess.Popen(_cli(*common, "--out", str(killed), "--resume"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert resume.wait() == 0
    pids = [h["pid"] for h in _records(killed)]  # which process trained each epoch: a restart from
    assert pids == [proc.pid] * done_before + [resume.pid] * (4 - done_before)  # epoch 0 would be all new
    straight, resumed = _history(tmp_path / "straight"), _history(killed)
    assert [h["epoch"] for h in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, nan_ok=True), key


def test_ddp_two_processes_on_cpu(tiny_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ichdet",
           "train", "--data", str(tiny_cache), "--out", str(run), "--fold", "1",
           *[f"--set={s}" for s in [*TINY, "train.epochs=1"]]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.relative_to(run).as_posix() for p in run.rglob("*.pt")] == ["fold1/checkpoints/last.pt"]
    assert len(_history(run, fold=1)) == 1
    oof = pd.read_parquet(run / "fold1" / "oof.parquet")
    index = pd.read_parquet(tiny_cache / "index.parquet")
    val = index.loc[index["fold"] == 1, "image_id"]
    assert len(oof) == len(val) and oof["image_id"].is_unique  # gathered without padding duplicates
    assert set(oof["image_id"]) == set(val)


def test_submission_from_real_sample_test_images(tiny_cache: Path, rsna_sample: Path, tmp_path: Path) -> None:
    cfg = build_config({}, [*TINY, "train.epochs=1", "train.limit_train_batches=2"])
    train(cfg, tiny_cache, tmp_path / "runs" / "a", fold="all", progress=False)
    preprocess(rsna_sample / "stage_2_test_images", tmp_path / "test_cache", None,
               PreprocessOptions(size=64, workers=2, progress=False))
    preds = predict_runs([tmp_path / "runs" / "a"], tmp_path / "test_cache", tta=True, device="cpu")
    assert sorted(set(preds["fold"])) == [0, 1]
    preds.to_parquet(tmp_path / "preds.parquet")
    sub = write_submission(ensemble(read_predictions([tmp_path / "preds.parquet"])), tmp_path / "sub.csv")
    sample = rsna_sample / "stage_2_sample_submission.csv"
    validate_submission(sub, sample)
    ours, theirs = pd.read_csv(sub), pd.read_csv(sample)
    assert sorted(ours["ID"]) == sorted(theirs["ID"])
    assert ours["Label"].between(0, 1).all() and not np.isnan(ours["Label"]).any()

