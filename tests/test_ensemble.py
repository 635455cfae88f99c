from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichdet.ensemble import ensemble, evaluate, plot_roc, read_predictions
from ichdet.errors import IchdetError
from ichdet.labels import LABELS, write_labels


def _preds(rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    """(image, model, fold, p) -> the predict table with p for every label."""
    df = pd.DataFrame(rows, columns=["image_id", "model", "fold", "p"])
    for name in LABELS:
        df[name] = df["p"]
    return df.drop(columns="p")


# model a: folds 0.2 and 0.4 -> 0.3; model b: one fold 0.9. Folds first, then models: 0.6
# (a flat mean over the three rows would give 0.5).
ROWS = [("ID_1", "a", 0, 0.2), ("ID_1", "a", 1, 0.4), ("ID_1", "b", 0, 0.9),
        ("ID_2", "a", 0, 0.0), ("ID_2", "a", 1, 0.0), ("ID_2", "b", 0, 1.0)]


@pytest.mark.parametrize(("weights", "id1", "id2"), [
    (None, 0.6, 0.5),
    ({"a": 3.0, "b": 1.0}, 0.45, 0.25),
    ({"a": 0.0, "b": 1.0}, 0.9, 1.0),
])
def test_mean_over_folds_then_models(weights: dict[str, float] | None, id1: float, id2: float) -> None:
    out = ensemble(_preds(ROWS), weights)
    assert list(out.columns) == list(LABELS)
    np.testing.assert_allclose(out.loc["ID_1"].to_numpy(), id1)
    np.testing.assert_allclose(out.loc["ID_2"].to_numpy(), id2)


@pytest.mark.parametrize(("rows", "weights", "match"), [
    (ROWS[:-1], None, "different image sets"),
    (ROWS, {"a": 1.0}, "weights name models"),
    (ROWS, {"a": 1.0, "b": 1.0, "c": 1.0}, "weights name models"),
])
def test_ensemble_errors(rows: list[tuple[str, str, int, float]], weights: dict[str, float] | None,
                         match: str) -> None:
    with pytest.raises(IchdetError, match=match):
        ensemble(_preds(rows), weights)


def test_read_predictions_refuses_duplicates_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    _preds(ROWS).to_parquet(path)
    with pytest.raises(IchdetError, match="occurs twice"):
        read_predictions([path, path])
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(IchdetError, match="not an `ichdet predict` output"):
        read_predictions([tmp_path / "other.parquet"])


def test_evaluate_scores_and_plots(tmp_path: Path) -> None:
    truth = pd.DataFrame(0, index=pd.Index(["ID_1", "ID_2"], name="image_id"), columns=list(LABELS))
    truth.loc["ID_2"] = 1
    write_labels(truth, tmp_path / "labels.csv")
    _preds(ROWS).to_parquet(tmp_path / "p.parquet")
    table = evaluate(tmp_path / "p.parquet", tmp_path / "labels.csv", tmp_path / "roc.png")
    # ID_1 (truth 0) gets 0.6, ID_2 (truth 1) gets 0.5, every label: BCE = (-ln 0.4 - ln 0.5) / 2
    expected = (-np.log(0.4) - np.log(0.5)) / 2
    np.testing.assert_allclose(table.loc["weighted", "log_loss"], expected, rtol=1e-9)
    assert (table.loc[list(LABELS), "auc"] == 0.0).all()  # the positive image scored lower
    assert (tmp_path / "roc.png").stat().st_size > 1000


def test_evaluate_refuses_missing_predictions(tmp_path: Path) -> None:
    truth = pd.DataFrame(0, index=pd.Index(["ID_1", "ID_3"], name="image_id"), columns=list(LABELS))
    write_labels(truth, tmp_path / "labels.csv")
    _preds(ROWS).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(IchdetError, match="no prediction for 1 labelled images"):
        evaluate(tmp_path / "p.parquet", tmp_path / "labels.csv")


def test_roc_plot_leaves_out_one_class_labels(tmp_path: Path) -> None:
    y_true = np.array([[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=float)  # epidural: one class only
    y_pred = np.array([[0.9, 0.2, 0.2, 0.2, 0.2, 0.2], [0.1, 0.8, 0.8, 0.8, 0.8, 0.8]])
    out = plot_roc(y_true, y_pred, tmp_path / "roc.png")
    assert out == tmp_path / "roc.png" and out.stat().st_size > 1000


def test_ensemble_of_identical_members_equals_one_member() -> None:
    rng = np.random.default_rng(0)
    one = pd.DataFrame(rng.uniform(0, 1, (5, 6)), columns=list(LABELS)).assign(
        image_id=[f"ID_{i}" for i in range(5)], model="m", fold=0)
    members = pd.concat([one.assign(fold=k) for k in range(3)] + [one.assign(model="n")], ignore_index=True)
    alone = ensemble(one)
    together = ensemble(members)
    np.testing.assert_allclose(together.to_numpy(), alone.to_numpy(), rtol=0, atol=1e-15)
    assert list(together.index) == [f"ID_{i}" for i in range(5)]
    np.testing.assert_allclose(alone.to_numpy(), one[list(LABELS)].to_numpy(), rtol=0, atol=0)
