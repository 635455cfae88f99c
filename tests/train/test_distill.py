"""``ichdet distill``: a student run trained on a bundle's soft targets (out-of-fold from the runs, or
in-sample with a warning) mixed with the labels; a normal run folder that bundles and predicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from study_support import tiny_runs
from typer.testing import CliRunner

from ichdet.cache.labels import LABELS
from ichdet.cache.store import PixelCache
from ichdet.cli import app
from ichdet.errors import IchdetError
from ichdet.infer.bundle import write_bundle
from ichdet.infer.predict import predict_runs
from ichdet.infer.teacher import teacher_targets
from ichdet.train.distill import mix_targets

FAST = ["--set", "train.epochs=1", "--set", "train.limit_train_batches=1", "--set", "train.device=cpu",
        "--set", "model.backbone=resnet10t"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    """A bundle of tiny runs a (weight 2) and b (weight 1), the runs and their training cache."""
    a, b, _ = tiny_runs(tmp_path_factory)
    bundle = write_bundle([a, b], tmp_path_factory.mktemp("teacher") / "t.ichdet", {"a": 2.0, "b": 1.0})
    return bundle, [a, b], a.parents[1] / "cache"


@pytest.mark.parametrize(("soft", "hard", "alpha", "expected"), [
    ([0.2], [1.0], 0.5, [0.6]), ([0.2], [1.0], 1.0, [0.2]), ([0.2], [0.0], 0.0, [0.0]), ([0.3], [np.nan], 0.5, [0.0]),
])
def test_mix_targets(soft: list[float], hard: list[float], alpha: float, expected: list[float]) -> None:
    assert mix_targets(np.array(soft), np.array(hard), alpha) == pytest.approx(np.array(expected, np.float32))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_mix_targets_refuses_alpha_outside_0_1(alpha: float) -> None:
    with pytest.raises(IchdetError, match=rf"--alpha {alpha} must be in \[0, 1\]"):
        mix_targets(np.zeros(1), np.zeros(1), alpha)


def test_out_of_fold_targets_are_the_weighted_oof_of_the_runs(teacher: tuple[Path, list[Path], Path]) -> None:
    bundle, runs, cache = teacher
    found = teacher_targets(bundle, cache, runs)
    pc = PixelCache(cache)
    oof = {r.name: pd.read_parquet(r / "oof.parquet").set_index("image_id").reindex(pc.index["image_id"])
           for r in runs}
    expected = (2 * oof["a"][list(LABELS)].to_numpy() + oof["b"][list(LABELS)].to_numpy()) / 3
    assert found.out_of_fold and np.allclose(found.probs, expected, atol=1e-6)


def test_runs_that_are_not_the_bundles_members_are_refused(teacher: tuple[Path, list[Path], Path]) -> None:
    bundle, runs, cache = teacher
    with pytest.raises(IchdetError, match=r"--run folders \['a'\] are not the bundle's members \['a', 'b'\]"):
        teacher_targets(bundle, cache, runs[:1])


def test_distill_writes_a_normal_run_that_bundles_and_predicts(teacher: tuple[Path, list[Path], Path],
                                                               tmp_path: Path) -> None:
    bundle, runs, cache = teacher
    out = tmp_path / "student"
    args = ["distill", "--bundle", str(bundle), "--data", str(cache), "--out", str(out), "--alpha", "0.7", *FAST]
    result = CliRunner().invoke(app, [*args, "--run", str(runs[0]), "--run", str(runs[1])])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "distill.json").read_text())
    assert record["alpha"] == 0.7 and record["teacher"]["out_of_fold"] is True
    for k in (0, 1):
        assert (out / f"fold{k}" / "best.safetensors").is_file() and (out / f"fold{k}" / "metrics.jsonl").is_file()
    assert (out / "oof.parquet").is_file()
    student = write_bundle([out], tmp_path / "student.ichdet")
    preds = predict_runs([], cache, bundle=student, device="cpu")
    assert sorted(set(preds["model"])) == ["student"] and len(preds) == 2 * len(PixelCache(cache))
    # a resume must keep the teacher and alpha
    again = CliRunner().invoke(app, [*args[:-len(FAST)], "--alpha", "0.3", *FAST, "--resume"])
    assert again.exit_code == 2 and "was distilled with alpha 0.7" in again.output


def test_distill_without_runs_warns_that_targets_are_in_sample(teacher: tuple[Path, list[Path], Path],
                                                               tmp_path: Path) -> None:
    bundle, _, cache = teacher
    out = tmp_path / "student"
    result = CliRunner().invoke(app, ["distill", "--bundle", str(bundle), "--data", str(cache), "--out", str(out),
                                      "--fold", "0", "--device", "cpu", *FAST])
    assert result.exit_code == 0, result.output
    assert "warning: soft targets are the bundle's in-sample predictions" in result.output
    assert json.loads((out / "distill.json").read_text())["teacher"]["out_of_fold"] is False
