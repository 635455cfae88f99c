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

from ichdet.cache import PreprocessOptions, preprocess
from ichdet.config import build_config
from ichdet.ensemble import ensemble, read_predictions
from ichdet.errors import IchdetError
from ichdet.labels import validate_submission, write_submission
from ichdet.predict import predict_runs
from ichdet.synth import SynthSpec, make_dataset
from ichdet.train import train

TINY = ["model.backbone=resnet18", "data.image_size=64", "train.batch_size=16", "train.num_workers=0",
        "train.device=cpu", "train.lr=0.002", "train.warmup_epochs=0.2", "train.channels_last=false",
        "train.patience=10"]
TIMING = ("seconds", "images_per_s")  # the only fields allowed to differ between identical runs


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    make_dataset(root / "data", SynthSpec(n_studies=8, n_test_studies=1, size=64, slices_per_study=(10, 12),
                                          seed=1))
    preprocess(root / "data" / "stage_2_train_images", root / "cache", root / "data" / "stage_2_train.csv",
               PreprocessOptions(size=64, workers=1, n_folds=2, progress=False))
    return root / "cache"


def _history(run: Path, fold: int = 0) -> list[dict[str, float]]:
    lines = (run / f"fold{fold}" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # the epochs, then (once the fold ends) its selection record
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if "epoch" in r]


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


def test_existing_run_needs_resume(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = build_config({}, [*TINY, "train.epochs=1", "train.limit_train_batches=1"])
    train(cfg, tiny_cache, tmp_path / "run", fold="0", progress=False)
    with pytest.raises(IchdetError, match="--resume"):
        train(cfg, tiny_cache, tmp_path / "run", fold="0", progress=False)
    with pytest.raises(IchdetError, match=r"different config \(train.lr\)"):
        train(build_config({}, [*TINY, "train.epochs=1", "train.limit_train_batches=1", "train.lr=0.1"]),
              tiny_cache, tmp_path / "run", fold="0", resume=True, progress=False)


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
    subprocess.run(_cli(*common, "--out", str(killed), "--resume"), check=True, env=env, capture_output=True)
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

