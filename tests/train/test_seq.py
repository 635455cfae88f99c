"""Tests of ichdet.train.seq: out-of-fold features, fold checks, padding, training, resume and prediction."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from seq_support import RESNET18_BASE, trained_base

from ichdet.cache.labels import LABELS, validate_submission, write_submission
from ichdet.cache.store import PixelCache
from ichdet.cache.writer import PreprocessOptions, preprocess
from ichdet.errors import ConfigError, IchdetError
from ichdet.evaluate.ensembling import ensemble, read_predictions
from ichdet.infer.predict import predict_runs
from ichdet.models.backbones import build_seq_model
from ichdet.models.config import SeqFeatureConfig, SeqModelConfig, load_seq_config
from ichdet.models.engine import Runtime, embed
from ichdet.models.sequence import collate_series, series_rows
from ichdet.train.seq import check_folds, fold_features, load_base, oof_features, scope_rows, train_seq

SEQ = ["model.hidden=16", "features.batch_size=32", "features.num_workers=0", "train.device=cpu", "train.amp=off",
       "train.batch_size=4", "train.epochs=2", "train.patience=10"]
CPU = Runtime(torch.device("cpu"))
FEATURES = SeqFeatureConfig(batch_size=32, num_workers=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-fold cache of context-matters studies and a resnet18 base run trained on both folds."""
    return trained_base(tmp_path_factory.mktemp("seq"), seed=2, slices=(8, 10), base=RESNET18_BASE)


def test_oof_features_come_from_the_fold_model_that_never_saw_them(setup: tuple[Path, Path]) -> None:
    cache_dir, base_dir = setup
    cache, base = PixelCache(cache_dir), load_base(base_dir)
    oof, starts = oof_features([base], cache, [0, 1], FEATURES, CPU)
    assert oof.dtype == np.float16 and starts == [oof.shape[1] - 6] and oof.shape == (len(cache), 512 + 6)
    every = {k: fold_features(base, k, cache, "all", FEATURES, CPU) for k in (0, 1)}
    for k in (0, 1):
        rows = scope_rows(cache, k, "oof")
        assert len(rows) > 0
        np.testing.assert_array_equal(oof[rows], every[k][rows])  # its own fold's model
        assert np.abs(oof[rows].astype(np.float32) - every[1 - k][rows].astype(np.float32)).max() > 1e-2
    files = sorted((base_dir / "features").glob("*.npy"))
    assert [f.name.split("-")[:2] for f in files] == [["fold0", "all"], ["fold0", "oof"], ["fold1", "all"],
                                                      ["fold1", "oof"]]
    mtimes = [f.stat().st_mtime_ns for f in files]
    oof_features([base], cache, [0, 1], FEATURES, CPU)  # reused from disk, not recomputed
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_features_are_the_networks_embedding_and_logits(setup: tuple[Path, Path]) -> None:
    from ichdet.models.rundir import load_run_model

    base_dir = setup[1]
    base = load_base(base_dir)
    model, _ = load_run_model(base_dir, base.folds[0], torch.device("cpu"))
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        got, logits = embed(model, x), model(x)
    assert got.shape == (3, 512 + 6)
    torch.testing.assert_close(got[:, -6:], logits)


def test_base_runs_on_other_folds_are_refused(setup: tuple[Path, Path], tmp_path: Path) -> None:
    cache_dir, base_dir = setup
    moved = tmp_path / "moved"
    shutil.copytree(base_dir, moved, ignore=shutil.ignore_patterns("features"))
    part = pd.read_parquet(moved / "fold0" / "oof.parquet")
    part["fold"] = 1  # as if fold 0's images had been fold 1 of another split
    part.to_parquet(moved / "fold0" / "oof.parquet")
    with pytest.raises(IchdetError, match=r"trained on other folds than the cache .* image\(s\) differ, e\.g\. ID_"):
        check_folds([load_base(moved)], PixelCache(cache_dir), [0, 1])
    shutil.rmtree(moved / "fold1")
    with pytest.raises(IchdetError, match=r"has no trained fold \[1\]"):
        check_folds([load_base(moved)], PixelCache(cache_dir), [0, 1])


@pytest.mark.parametrize(("kind", "message"), [
    ("empty folder", r"not a trained run folder \(no config\.yaml\)"),
    ("sequence run", r"is a sequence run; a sequence run's bases are 2D runs"),
])
def test_a_base_that_is_not_a_2d_run_is_refused_by_name(setup: tuple[Path, Path], tmp_path: Path, kind: str,
                                                        message: str) -> None:
    _, base_dir = setup
    folder = tmp_path / "base"
    if kind == "empty folder":
        folder.mkdir()
    else:  # a 2D run's files plus seq.json: what a sequence run folder holds
        shutil.copytree(base_dir, folder, ignore=shutil.ignore_patterns("features"))
        (folder / "seq.json").write_text('{"bases": []}')
    with pytest.raises(IchdetError, match=message) as err:
        load_base(folder)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("length", [1, 2, 7])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("kind", ["bigru", "transformer"])
def test_padding_does_not_change_a_series(length: int, residual: bool, kind: str) -> None:
    torch.manual_seed(0)
    cfg = SeqModelConfig(hidden=8, residual=residual, dropout=0.0, kind=kind, inputs="both")
    model = build_seq_model(cfg, 10, [4]).eval()
    if residual:  # a trained head, not the zero-initialised one
        torch.nn.init.normal_(model.head.weight)
    series = [torch.randn(n, 10) for n in (length, 12, 3)]
    items = [(s, torch.zeros(len(s), 6), torch.arange(len(s))) for s in series]
    with torch.inference_mode():
        alone = model(series[0][None], torch.ones(1, length, dtype=torch.bool))[0]
        x, _, mask, _ = collate_series(items)
        batched = model(x, mask)[0, :length]
    assert alone.shape == (length, 6) and torch.isfinite(alone).all()
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_series_are_in_z_order(setup: tuple[Path, Path]) -> None:
    index = PixelCache(setup[0]).index
    series = series_rows(index)
    assert sum(len(s) for s in series) == len(index)
    for rows in series:
        part = index.iloc[rows]
        assert part["series_uid"].nunique() == 1 and list(part["slice_index"]) == list(range(len(rows)))


def test_seq_config_is_strict() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'model.hiden'.*Did you mean 'hidden'"):
        load_seq_config(None, ["model.hiden=3"])
    with pytest.raises(ConfigError, match=r"conv_kernel.*must be odd"):
        load_seq_config(None, ["model.conv_kernel=4"])


def test_seq_run_predicts_like_any_run_to_a_valid_submission(setup: tuple[Path, Path], rsna_sample: Path,
                                                             tmp_path: Path) -> None:
    cache_dir, base_dir = setup
    results = train_seq(load_seq_config(Path("configs/seq_bigru.yaml"), SEQ), [base_dir], cache_dir,
                        tmp_path / "seq", progress=False)
    assert [r["fold"] for r in results] == [0, 1]
    oof, index = pd.read_parquet(tmp_path / "seq" / "oof.parquet"), PixelCache(cache_dir).index
    assert sorted(oof["image_id"]) == sorted(index.loc[index["fold"] >= 0, "image_id"])
    assert oof[list(LABELS)].stack().between(0, 1).all()
    assert json.loads((tmp_path / "seq" / "seq.json").read_text())["bases"] == [str(base_dir.resolve())]
    with pytest.raises(IchdetError, match=r"already holds a sequence run .*pass --resume"):
        train_seq(load_seq_config(None, SEQ), [base_dir], cache_dir, tmp_path / "seq", progress=False)
    before = (tmp_path / "seq" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"config\.yaml differs in model; resume with the run's own config"):
        train_seq(load_seq_config(Path("configs/seq_bigru.yaml"), [*SEQ, "model.hidden=8"]), [base_dir], cache_dir,
                  tmp_path / "seq", resume=True, progress=False)
    assert (tmp_path / "seq" / "config.yaml").read_text() == before
    # the real sample's test studies, alone and mixed with the 2D run
    preprocess(rsna_sample / "stage_2_test_images", tmp_path / "test_cache", None,
               PreprocessOptions(size=32, workers=1, progress=False))
    preds = predict_runs([tmp_path / "seq", base_dir], tmp_path / "test_cache", device="cpu")
    assert sorted(set(preds["model"])) == ["base", "seq"] and sorted(set(preds["fold"])) == [0, 1]
    preds.to_parquet(tmp_path / "preds.parquet")
    sample = rsna_sample / "stage_2_sample_submission.csv"
    for weights in (None, {"seq": 1.0, "base": 0.0}):
        sub = write_submission(ensemble(read_predictions([tmp_path / "preds.parquet"]), weights), tmp_path / "s.csv")
        validate_submission(sub, sample)
        ours = pd.read_csv(sub)
        assert sorted(ours["ID"]) == sorted(pd.read_csv(sample)["ID"]) and ours["Label"].between(0, 1).all()


def _history(run: Path, fold: int) -> list[dict[str, float]]:
    lines = (run / f"fold{fold}" / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "epoch" in record]  # not the closing selection record


def test_killed_seq_run_resumes_only_the_remaining_epochs(setup: tuple[Path, Path], tmp_path: Path) -> None:
    cache_dir, base_dir = setup
    run = tmp_path / "seq"
    cmd = [sys.executable, "-m", "ichdet", "seq", "train", "--run", str(base_dir), "--data", str(cache_dir),
           "--out", str(run), "--fold", "0", "--config", "configs/seq_bigru.yaml",
           *[f"--set={s}" for s in [*SEQ, "train.epochs=12", "train.patience=12"]]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "src"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "fold0" / "metrics.jsonl"
    deadline = time.monotonic() + 600  # a guard against a hung child, not a timing check
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline, "the sequence child wrote no epoch within 10 minutes"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _history(run, 0)
    assert 2 <= len(before) < 12, "the run must have been killed part-way"
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _history(run, 0)
    assert [h["epoch"] for h in after] == list(range(1, len(after) + 1)) and len(after) > len(before)
    # the records written before the kill are kept as they were (with their own timings): not retrained
    assert after[: len(before)] == before
    assert (run / "fold0" / "oof.parquet").exists()
