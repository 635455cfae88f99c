"""The seed's three shell entry points, end to end on a tiny synthetic set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from ichdet.synth import SynthSpec, make_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_preprocess_train_predict_scripts(tmp_path: Path) -> None:
    make_dataset(tmp_path / "rsna", SynthSpec(n_studies=4, n_test_studies=1, size=64, slices_per_study=(8, 8),
                                              seed=4))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "RSNA": str(tmp_path / "rsna"), "CACHE": str(tmp_path / "cache"), "RUNS": str(tmp_path / "runs"),
           "OUT": str(tmp_path / "sub"), "SIZE": "64", "FOLDS": "2", "WORKERS": "1", "MODELS": "demo",
           "EXTRA": "--set train.epochs=1 --set train.limit_train_batches=1 --set data.image_size=64"}
    for script in ["preprocess.sh", "train_all.sh", "predict_all.sh"]:
        done = subprocess.run(["bash", str(ROOT / "sh" / script)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{script}: {done.stderr[-2000:]}"
    submission = pd.read_csv(tmp_path / "sub" / "submission.csv")
    sample = pd.read_csv(tmp_path / "rsna" / "stage_2_sample_submission.csv")
    assert sorted(submission["ID"]) == sorted(sample["ID"])
    assert sorted(p.name for p in (tmp_path / "runs" / "demo").glob("fold*")) == ["fold0", "fold1"]
