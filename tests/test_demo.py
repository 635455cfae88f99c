from __future__ import annotations

from pathlib import Path

import pandas as pd

from ichdet.demo import DEMO_MODELS, run_demo

SMALL = ("train.epochs=1", "train.limit_train_batches=2", "data.image_size=64")


def test_demo_makes_every_artifact_and_reruns(tmp_path: Path) -> None:
    lines: list[str] = []
    artifacts = run_demo(tmp_path / "demo", echo=lines.append, studies=4, overrides=SMALL)
    for key in ["data", "cache", "runs", "predictions", "submission", "roc", "reliability"]:
        assert artifacts[key].exists(), key
        assert any(str(artifacts[key]) in line for line in lines), f"{key} is not printed"
    submission = pd.read_csv(artifacts["submission"])
    sample = pd.read_csv(artifacts["data"] / "stage_2_sample_submission.csv")
    assert sorted(submission["ID"]) == sorted(sample["ID"])
    runs = sorted(p.name for p in artifacts["runs"].iterdir())
    assert runs == sorted(name for name, _ in DEMO_MODELS)
    assert all(len(list((artifacts["runs"] / r).glob("fold*/best.safetensors"))) == 2 for r in runs)
    text = "\n".join(lines)
    assert "\nweighted " in text  # the evaluation table, with its weighted log loss row
    for part in ["expected calibration error", "study level (positive when any slice is", "study AUC any"]:
        assert part in text
    before = submission.copy()
    run_demo(tmp_path / "demo", echo=lambda _: None, studies=4, overrides=SMALL)  # resumes, same result
    pd.testing.assert_frame_equal(pd.read_csv(artifacts["submission"]), before)
