"""Prediction's guards: which folders are folds, where it may write, and what a prediction table must hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichdet.errors import CheckpointError, IchdetError, RunFailed
from ichdet.infer.predict import check_out, check_predictions
from ichdet.models.rundir import fold_weights
from ichdet.names import LABELS


def _run(tmp_path: Path, folders: list[str]) -> Path:
    run = tmp_path / "run"
    for name in folders:
        (run / name).mkdir(parents=True)
        (run / name / "best.safetensors").write_bytes(b"weights")
    return run


@pytest.mark.parametrize(("folders", "folds"), [
    (["fold0", "fold1"], [0, 1]),
    (["fold0", "fold0_old", "fold1.bak", "folds", "foldx"], [0]),
    (["fold10", "fold2"], [2, 10]),  # by number, not by name
])
def test_fold_weights_reads_only_fold_digits(tmp_path: Path, folders: list[str], folds: list[int]) -> None:
    run = _run(tmp_path, folders)
    assert fold_weights(run) == [(k, run / f"fold{k}" / "best.safetensors") for k in folds]


@pytest.mark.parametrize("folders", [[], ["fold0_old"], ["old_fold0"]])
def test_fold_weights_without_folds(tmp_path: Path, folders: list[str]) -> None:
    run = _run(tmp_path, folders)
    with pytest.raises(CheckpointError, match=r"no fold<k>/best.safetensors; train it first"):
        fold_weights(run)


def _table(ids_per_fold: dict[int, list[str]], value: float = 0.5) -> pd.DataFrame:
    rows = [{"image_id": i, "model": "m", "fold": k, **dict.fromkeys(LABELS, value)}
            for k, ids in ids_per_fold.items() for i in ids]
    return pd.DataFrame(rows)


def test_check_out(tmp_path: Path) -> None:
    new = tmp_path / "new.parquet"
    assert check_out(new) == new
    own = tmp_path / "own.parquet"
    _table({0: ["ID_a"]}).to_parquet(own)
    assert check_out(own) == own  # a prediction table predict wrote may be replaced
    foreign = tmp_path / "labels.parquet"
    pd.DataFrame({"ID": ["x"], "Label": [1]}).to_parquet(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("precious")
    for path in (foreign, text):
        with pytest.raises(IchdetError, match=rf"--out {path} exists and is not a prediction table.*--force"):
            check_out(path)
        assert check_out(path, force=True) == path
    with pytest.raises(IchdetError, match=r"is a folder; give the path of a .parquet file"):
        check_out(tmp_path, force=True)
    assert text.read_text() == "precious"


def test_check_predictions_passes_a_clean_table() -> None:
    table = _table({0: ["ID_a", "ID_b"], 1: ["ID_b", "ID_a"]})
    assert check_predictions(table) is table


@pytest.mark.parametrize(("value", "match"), [
    (np.nan, r"model m fold 0 predicted 1 rows outside \[0, 1\] or not finite \(first: image ID_a\)"),
    (np.inf, r"model m fold 0 predicted 1 rows outside"),
    (1.5, r"model m fold 0 predicted 1 rows outside"),
    (-0.1, r"model m fold 0 predicted 1 rows outside"),
])
def test_check_predictions_refuses_bad_numbers(value: float, match: str) -> None:
    table = _table({0: ["ID_a", "ID_b"], 1: ["ID_a", "ID_b"]})
    table.loc[0, "subdural"] = value
    with pytest.raises(RunFailed, match=match):
        check_predictions(table)


@pytest.mark.parametrize("ids_per_fold", [
    {0: ["ID_a", "ID_b"], 1: ["ID_a"]},
    {0: ["ID_a", "ID_b"], 1: ["ID_a", "ID_c"]},
])
def test_check_predictions_refuses_folds_over_different_images(ids_per_fold: dict[int, list[str]]) -> None:
    with pytest.raises(RunFailed, match=r"model m fold 1 covers .* images and model m fold 0 .*not the same ones"):
        check_predictions(_table(ids_per_fold))


@pytest.mark.parametrize("force", [False, True])
def test_cli_predict_refuses_a_bad_out_before_any_work(tmp_path: Path, force: bool) -> None:
    from typer.testing import CliRunner

    from ichdet.cli import app

    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    targets = [(tmp_path, "is a folder")] + ([] if force else [(notes, "is not a prediction table")])
    for out, message in targets:
        args = ["predict", "--run", str(tmp_path / "no_run"), "--data", str(tmp_path / "no_cache"),
                "--out", str(out), *(["--force"] if force else [])]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert notes.read_text() == "precious"
