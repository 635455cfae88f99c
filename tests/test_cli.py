"""The command line: names other tools rely on, exit codes, summaries."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ichdet.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synth"
    result = runner.invoke(app, ["synth", "--out", str(out), "--studies", "3", "--test-studies", "1",
                                 "--size", "64", "--seed", "5"])
    assert result.exit_code == 0, result.output
    return out


def test_synth_writes_the_kaggle_layout(synth_dir: Path) -> None:
    assert sorted(p.name for p in synth_dir.iterdir() if not p.name.startswith(".")) == [  # not lock, marker
        "stage_2_sample_submission.csv", "stage_2_test_images", "stage_2_train.csv", "stage_2_train_images"]


@pytest.mark.parametrize(("strict", "exit_code"), [(False, 0), (True, 1)])
def test_preprocess_reports_bad_files(synth_dir: Path, tmp_path: Path, strict: bool, exit_code: int) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in (synth_dir / "stage_2_train_images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.dcm").write_bytes(b"not a dicom file")
    args = ["preprocess", "--images", str(images), "--labels", str(synth_dir / "stage_2_train.csv"),
            "--out", str(tmp_path / "cache"), "--size", "64", "--folds", "2", "--workers", "1"]
    result = runner.invoke(app, args + (["--strict"] if strict else []))
    assert result.exit_code == exit_code, result.output
    n_good = len(list((synth_dir / "stage_2_train_images").iterdir()))
    assert f"images: {n_good}  skipped (see errors.csv): 1" in result.output
    errors = pd.read_csv(tmp_path / "cache" / "errors.csv")
    assert errors["path"].tolist() == ["broken.dcm"]


def test_preprocess_bad_labels_fail_before_pixel_work(synth_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_text("ID,Label\nID_abc_epidural,7\n")
    result = runner.invoke(app, ["preprocess", "--images", str(synth_dir / "stage_2_train_images"),
                                 "--labels", str(bad), "--out", str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert "line 2" in result.output
    assert not (tmp_path / "cache").exists()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ["synth", "preprocess", "train", "predict", "ensemble", "evaluate", "demo"]:
        assert name in result.output


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = runner.invoke(app, ["trian"])
    assert result.exit_code == 2
    assert "No such command 'trian'" in result.output


def test_train_rejects_an_unknown_config_key_before_reading_data(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "no_cache"), "--out", str(tmp_path / "r"),
                                 "--set", "train.epoch=2"])
    assert result.exit_code == 2
    assert "unknown config key 'train.epoch'" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("weight", ["resnet34", "resnet34=", "=2", "resnet34=two", "resnet34=-1"])
def test_ensemble_rejects_bad_weights(tmp_path: Path, weight: str) -> None:
    result = runner.invoke(app, ["ensemble", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "s.csv"),
                                 "--weight", weight])
    assert result.exit_code == 2
    assert f"--weight '{weight}': expected model=number" in result.output
    assert not (tmp_path / "s.csv").exists()
