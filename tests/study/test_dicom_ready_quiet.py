"""Refusing --dicom-out for files with RSNA-style ``ID_...`` UIDs prints the refusal only: no pydicom
warning before it (issue 17 item 15)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ichdet.errors import IchdetError
from ichdet.study.dicom_out import check_dicom_ready
from ichdet.synth import SynthSpec, make_dataset


@pytest.fixture(scope="module")
def rsna_style(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic study: SOP Class UID present, Kaggle ``ID_...`` instance/study/series UIDs, as RSNA's."""
    out = tmp_path_factory.mktemp("rsna_style")
    make_dataset(out, SynthSpec(n_studies=1, n_test_studies=0, size=32, slices_per_study=(8, 8), seed=1))
    return out / "stage_2_train_images"


def test_check_dicom_ready_refuses_without_a_pydicom_warning(rsna_style: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING, logger="pydicom"):
        warnings.simplefilter("always")
        with pytest.raises(IchdetError, match=r"is not a valid DICOM UID"):
            check_dicom_ready(sorted(rsna_style.iterdir()))
    assert [str(w.message) for w in seen] == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pydicom")] == []


def test_predict_study_dicom_out_prints_only_the_refusal(rsna_style: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run([sys.executable, "-m", "ichdet", "predict-study", str(rsna_style), "--bundle",
                           str(tmp_path / "m.ichdet"), "--out", str(tmp_path / "r.json"), "--dicom-out",
                           str(tmp_path / "dout")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "is not a valid DICOM UID" in proc.stderr
