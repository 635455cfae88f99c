"""Evaluation: scores, calibration, operating points, study level, intervals, plots (report.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prediction_tables import ROWS, preds

from ichdet.cache.labels import LABELS, write_labels, write_submission
from ichdet.errors import IchdetError
from ichdet.evaluate.evaluation import evaluate, plot_reliability, plot_roc, study_ids, write_plots


def _labels(tmp_path: Path, positives: dict[str, int]) -> Path:
    truth = pd.DataFrame(0, index=pd.Index(list(positives), name="image_id"), columns=list(LABELS))
    for image, value in positives.items():
        truth.loc[image] = value
    return write_labels(truth, tmp_path / "labels.csv")


def _cache_index(tmp_path: Path, studies: dict[str, str]) -> Path:
    (tmp_path / "cache").mkdir()
    pd.DataFrame({"image_id": list(studies), "study_uid": list(studies.values())}).to_parquet(
        tmp_path / "cache" / "index.parquet")
    return tmp_path / "cache"


def test_evaluate_scores_a_prediction_parquet(tmp_path: Path) -> None:
    labels = _labels(tmp_path, {"ID_1": 0, "ID_2": 1})
    preds(ROWS).to_parquet(tmp_path / "p.parquet")
    result = evaluate(tmp_path / "p.parquet", labels, n_boot=20)
    # ID_1 (truth 0) gets 0.6, ID_2 (truth 1) gets 0.5, every label: BCE = (-ln 0.4 - ln 0.5) / 2
    expected = (-np.log(0.4) - np.log(0.5)) / 2
    np.testing.assert_allclose(result.slices.loc["weighted", "log_loss"], expected, rtol=1e-9)
    assert (result.slices.loc[list(LABELS), "auc"] == 0.0).all()  # the positive image scored lower
    # ECE, 15 bins: 0.6 and 0.5 fall in bins 9 and 7, each off by 0.6 and 0.5: (0.6 + 0.5) / 2
    assert result.ece == pytest.approx(0.55)
    # sensitivity 0.95 needs the one positive (0.5): the negative (0.6) is above it, specificity 0
    assert result.operating.loc["any"].tolist() == [0.5, 1.0, 0.0, 1, 1]
    assert result.studies is None and result.study_points is None
    text = "\n".join(result.lines())
    assert "study level: not computed (give --data CACHE" in text
    assert result.grouping.startswith("image")


def test_evaluate_groups_slices_into_studies(tmp_path: Path) -> None:
    # study s1: ID_1 (0.1, negative), ID_2 (0.3, positive); study s2: ID_3 (0.2), ID_4 (0.05), both negative
    labels = _labels(tmp_path, {"ID_1": 0, "ID_2": 1, "ID_3": 0, "ID_4": 0})
    write_submission(pd.DataFrame({lab: [0.1, 0.3, 0.2, 0.05] for lab in LABELS},
                                  index=pd.Index(["ID_1", "ID_2", "ID_3", "ID_4"])), tmp_path / "s.csv")
    cache = _cache_index(tmp_path, {"ID_1": "s1", "ID_2": "s1", "ID_3": "s2", "ID_4": "s2", "ID_9": "s3"})
    result = evaluate(tmp_path / "s.csv", labels, cache, n_boot=50)
    assert result.studies is not None and result.study_points is not None
    # studies: s1 positive, max 0.3; s2 negative, max 0.2 -> AUC 1 at study level
    assert result.studies.loc["any", "auc"] == 1.0
    assert result.studies.loc["any", "prevalence"] == 0.5
    assert result.study_points.loc["any"].tolist() == [0.3, 1.0, 1.0, 1, 1]
    # slice level: 0.3 positive above 0.1, 0.2, 0.05: AUC 1 too, and threshold 0.3 leaves 3 negatives below
    assert result.operating.loc["any"].tolist() == [0.3, 1.0, 1.0, 1, 3]
    assert list(result.ci.index) == ["slice weighted log loss", "slice AUC any", "slice ECE", "study AUC any"]
    assert result.grouping == "study"
    low, high = result.ci.loc["slice weighted log loss", ["low", "high"]]
    assert low <= result.ci.loc["slice weighted log loss", "value"] <= high


def test_evaluate_is_seeded(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = [f"ID_{i}" for i in range(30)]
    labels = _labels(tmp_path, {i: int(rng.random() < 0.4) for i in ids})
    write_submission(pd.DataFrame(rng.random((30, 6)), index=pd.Index(ids), columns=list(LABELS)), tmp_path / "s.csv")
    first = evaluate(tmp_path / "s.csv", labels, n_boot=30, seed=4).ci
    pd.testing.assert_frame_equal(first, evaluate(tmp_path / "s.csv", labels, n_boot=30, seed=4).ci)
    assert not first.equals(evaluate(tmp_path / "s.csv", labels, n_boot=30, seed=5).ci)


def test_evaluate_takes_a_runs_oof_parquet(tmp_path: Path) -> None:
    labels = _labels(tmp_path, {"ID_1": 0, "ID_2": 1})
    run = tmp_path / "run"
    run.mkdir()
    preds([("ID_1", "x", 0, 0.25), ("ID_2", "x", 1, 0.75)]).drop(columns="model").to_parquet(run / "oof.parquet")
    result = evaluate(run / "oof.parquet", labels, n_boot=5)
    assert result.slices.loc["weighted", "log_loss"] == pytest.approx(-np.log(0.75))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sensitivity": 0.0}, r"--sensitivity 0\.0: give a fraction in \(0, 1\]"),
    ({"sensitivity": 1.5}, r"--sensitivity 1\.5"),
    ({"n_boot": 0}, r"--bootstrap 0"),
])
def test_evaluate_refuses_bad_options(tmp_path: Path, kwargs: dict[str, float], match: str) -> None:
    labels = _labels(tmp_path, {"ID_1": 0, "ID_2": 1})
    preds(ROWS).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(IchdetError, match=match):
        evaluate(tmp_path / "p.parquet", labels, **kwargs)  # type: ignore[arg-type]


def test_evaluate_refuses_missing_predictions(tmp_path: Path) -> None:
    labels = _labels(tmp_path, {"ID_1": 0, "ID_3": 0})
    preds(ROWS).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(IchdetError, match="no prediction for 1 labelled images"):
        evaluate(tmp_path / "p.parquet", labels)


def test_study_ids_refuses_images_outside_the_cache(tmp_path: Path) -> None:
    cache = _cache_index(tmp_path, {"ID_1": "s1"})
    assert study_ids(cache, pd.Index(["ID_1"])).tolist() == ["s1"]
    with pytest.raises(IchdetError, match=r"1 labelled images are not in its index \(e.g. \['ID_2'\]\)"):
        study_ids(cache, pd.Index(["ID_1", "ID_2"]))
    with pytest.raises(IchdetError, match=r"no index\.parquet"):
        study_ids(tmp_path, pd.Index(["ID_1"]))


Y_TRUE = np.array([[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=float)  # epidural: one class only
Y_PRED = np.array([[0.9, 0.2, 0.2, 0.2, 0.2, 0.2], [0.1, 0.8, 0.8, 0.8, 0.8, 0.8]])


@pytest.mark.parametrize("plot", [plot_roc, plot_reliability])
def test_plots_write_a_png(tmp_path: Path, plot: object) -> None:
    out = plot(Y_TRUE, Y_PRED, tmp_path / "x.png")  # type: ignore[operator]
    assert out == tmp_path / "x.png"
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 1000


def test_write_plots_reports_an_unwritable_folder(tmp_path: Path) -> None:
    labels = _labels(tmp_path, {"ID_1": 0, "ID_2": 1})
    preds(ROWS).to_parquet(tmp_path / "p.parquet")
    result = evaluate(tmp_path / "p.parquet", labels, n_boot=5)
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where a folder should be: unwritable for root too
    failures = write_plots(result, blocker / "roc.png", tmp_path / "rel.png")
    assert len(failures) == 1 and failures[0].startswith(f"{blocker / 'roc.png'}: ")
    assert (tmp_path / "rel.png").stat().st_size > 1000
