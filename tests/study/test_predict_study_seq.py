"""predict-study and report with sequence members (bundles of sequence runs) on the real RSNA sample studies."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from seq_support import SIZE, SeqRuns, StemImages
from study_support import copy_study, study_files
from test_html import check_rendered, data_uri_images, needs_chromium, rendered
from typer.testing import CliRunner

from ichdet.cache.writer import PreprocessOptions, preprocess
from ichdet.cli import app
from ichdet.evaluate.ensembling import ensemble
from ichdet.infer.bundle import load_ensemble, write_bundle
from ichdet.infer.predict import predict_runs
from ichdet.names import LABELS
from ichdet.study.html import REPORT_WINDOWS
from ichdet.study.predict import StudyPrediction, predict_study

STUDY = "ID_134d398b61"  # 28 slices, one series, tilted gantry, no duplicate positions
TOP_K = 2


@pytest.fixture(scope="module")
def study(rsna_sample: Path) -> list[Path]:
    return study_files(rsna_sample / "stage_2_train_images", STUDY)


def _probs(pred: StudyPrediction) -> tuple[list[str], np.ndarray]:
    """SOP Instance UIDs and (N, 6) probabilities of every analysed slice, study by study, series by series."""
    sops, rows = [], []
    for st in pred.result["studies"]:
        for series in st["series"]:
            assert series["duplicates"] == []  # else the cache and the study would hold different series
            for s in series["slices"]:
                sops.append(s["sop_instance_uid"])
                rows.append([s["probabilities"][k] for k in LABELS])
    return sops, np.array(rows)


def _batch(run: Path, folder: Path, cache: Path) -> pd.DataFrame:
    """``ichdet predict --run RUN`` over a cache of ``folder`` preprocessed at the runs' size, fold-averaged."""
    preprocess(folder, cache, None, PreprocessOptions(size=SIZE, workers=1, progress=False))
    return ensemble(predict_runs([run], cache, tta=True, device="cpu"))


def test_predict_study_with_a_seq_bundle_equals_predict_of_the_seq_run(
        seq_bundle: Path, seq_runs: SeqRuns, study: list[Path], rsna_sample: Path, tmp_path: Path) -> None:
    """Each selected series in slice order is one sequence, exactly as the cache's series: the same
    per-slice probabilities (the tolerance of the 2D study-vs-batch test)."""
    folder = tmp_path / "in"
    copy_study(study, folder, nested=False)
    copy_study(sorted((rsna_sample / "stage_2_test_images").iterdir()), folder, nested=False)
    batch = _batch(seq_runs.seq, folder, tmp_path / "cache")
    pred = predict_study(folder, load_ensemble(seq_bundle), tta=True, device="cpu")
    sops, ours = _probs(pred)
    assert len(pred.result["studies"]) == 3 and len(sops) == len(batch)  # every slice of three studies
    np.testing.assert_allclose(ours, batch.loc[sops, list(LABELS)].to_numpy(), atol=2e-6)
    members = pred.result["model"]["members"]
    assert [(m["name"], m["kind"], m["bases"]) for m in members] == [("seq", "seq", ["base"])]
    assert [(b["name"], b["kind"]) for b in pred.result["model"]["bases"]] == [("base", "2d")]


def test_mixed_bundle_predicts_the_weighted_mean(seq_runs: SeqRuns, study: list[Path], tmp_path: Path) -> None:
    copy_study(study[:6], tmp_path / "in")
    mixed = write_bundle([seq_runs.base, seq_runs.seq], tmp_path / "mixed.ichdet", {"base": 1.0, "seq": 3.0})
    together = predict_study(tmp_path / "in", load_ensemble(mixed), device="cpu")
    base = predict_study(tmp_path / "in", load_ensemble(runs=[seq_runs.base]), device="cpu")
    seq = predict_study(tmp_path / "in", load_ensemble(runs=[seq_runs.seq]), device="cpu")
    sops, probs = _probs(together)
    assert sops == _probs(base)[0] == _probs(seq)[0] and len(sops) == 6
    np.testing.assert_allclose(probs, (_probs(base)[1] + 3 * _probs(seq)[1]) / 4, rtol=0, atol=1e-12)
    assert np.abs(_probs(base)[1] - _probs(seq)[1]).max() > 1e-4  # the two members do differ
    model = together.result["model"]
    assert [(m["name"], m["kind"], m["weight"]) for m in model["members"]] == [("base", "2d", 1.0), ("seq", "seq", 3.0)]
    assert model["bases"] == []


def test_a_one_slice_series_through_predict_study_with_a_seq_bundle(seq_bundle: Path, seq_runs: SeqRuns,
                                                                     study: list[Path], tmp_path: Path) -> None:
    copy_study(study[10:11], tmp_path / "in", nested=False)
    batch = _batch(seq_runs.seq, tmp_path / "in", tmp_path / "cache")
    pred = predict_study(tmp_path / "in", load_ensemble(seq_bundle), device="cpu", min_slices=1)
    sops, probs = _probs(pred)
    assert len(sops) == 1 and np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs, batch.loc[sops, list(LABELS)].to_numpy(), atol=2e-6)


@pytest.fixture(scope="module")
def seq_report(seq_bundle: Path, study: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ichdet report`` of six real slices with the sequence bundle."""
    root = tmp_path_factory.mktemp("seq_report")
    copy_study(study[:6], root / "in")
    res = CliRunner().invoke(app, ["report", str(root / "in"), "--bundle", str(seq_bundle), "--out",
                                   str(root / "report.html"), "--device", "cpu", "--top-k", str(TOP_K)])
    assert res.exit_code == 0, res.output
    return root / "report.html"


def test_report_with_a_seq_bundle_shows_base_run_overlays_and_says_so(seq_report: Path) -> None:
    page = seq_report.read_text()
    images = data_uri_images(page)
    assert len(images) == TOP_K * len(REPORT_WINDOWS)
    assert all(img is not None and img.std() > 10 for img in images)
    cam = re.search(r'<p class="muted" id="cam-source">(.*?)</p>', page)
    assert cam and "base (base run of sequence member seq)" in cam.group(1)
    note = re.search(r'<p id="model-note">(.*?)</p>', page)
    assert note and "seq reads the per-slice embeddings of its base runs base" in note.group(1)
    assert "Grad-CAM overlays come from its base runs' CNNs" in note.group(1)


@needs_chromium
def test_report_with_a_seq_bundle_renders_in_chromium(seq_report: Path, tmp_path: Path) -> None:
    check_rendered(rendered(seq_report, tmp_path), TOP_K * len(REPORT_WINDOWS))


@pytest.mark.parametrize(("tta", "views"), [(True, 2), (False, 1)])
def test_mixed_bundle_predict_study_runs_each_base_cnn_once(seq_runs: SeqRuns, study: list[Path], tmp_path: Path,
                                                            tta: bool, views: int) -> None:
    """The hospital shape (2D run + sequence run over it): base runs x folds x TTA views CNN passes over
    the study, as many as the 2D bundle alone (running the base as member and as base would be twice)."""
    copy_study(study[:6], tmp_path / "in")
    mixed = write_bundle([seq_runs.base, seq_runs.seq], tmp_path / "mixed.ichdet")
    counts = {}
    for name, ens in [("mixed", load_ensemble(mixed)), ("2d", load_ensemble(runs=[seq_runs.base]))]:
        with StemImages() as stems:
            predict_study(tmp_path / "in", ens, tta=tta, device="cpu")
        counts[name] = stems.images
    assert counts == {"mixed": 6 * 1 * 2 * views, "2d": 6 * 1 * 2 * views}
