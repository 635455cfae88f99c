from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prediction_tables import ROWS, preds

from ichdet.cache.labels import LABELS, read_submission, write_submission
from ichdet.errors import IchdetError
from ichdet.evaluate.ensembling import (
    OOF_FOLD,
    ensemble,
    is_kaggle_ids,
    load_prediction_table,
    read_predictions,
    read_wide_csv,
    write_ensemble,
)


@pytest.mark.parametrize(("weights", "id1", "id2"), [
    (None, 0.6, 0.5),
    ({"a": 3.0, "b": 1.0}, 0.45, 0.25),
    ({"a": 0.0, "b": 1.0}, 0.9, 1.0),
])
def test_mean_over_folds_then_models(weights: dict[str, float] | None, id1: float, id2: float) -> None:
    out = ensemble(preds(ROWS), weights)
    assert list(out.columns) == list(LABELS)
    np.testing.assert_allclose(out.loc["ID_1"].to_numpy(), id1)
    np.testing.assert_allclose(out.loc["ID_2"].to_numpy(), id2)


@pytest.mark.parametrize(("rows", "weights", "match"), [
    (ROWS[:-1], None, "different image sets"),
    (ROWS, {"a": 1.0}, "weights name models"),
    (ROWS, {"a": 1.0, "b": 1.0, "c": 1.0}, "weights name models"),
    (ROWS, {"a": 0.0, "b": 0.0}, r"weights are all zero"),
    (ROWS, {"a": -1.0, "b": 2.0}, r"must be finite numbers >= 0; got \{'a': -1.0\}"),
    (ROWS, {"a": float("inf"), "b": 2.0}, r"must be finite numbers >= 0"),
    # fold 1 of model a lacks ID_2: a fold mean over fewer folds would hide the gap
    ([r for r in ROWS if r[:3] != ("ID_2", "a", 1)], None, r"model 'a': fold 1 and fold 0 predicted different"),
])
def test_ensemble_errors(rows: list[tuple[str, str, int, float]], weights: dict[str, float] | None,
                         match: str) -> None:
    with pytest.raises(IchdetError, match=match):
        ensemble(preds(rows), weights)


def test_read_predictions_refuses_duplicates_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    preds(ROWS).to_parquet(path)
    with pytest.raises(IchdetError, match="occurs twice"):
        read_predictions([path, path])
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(IchdetError, match="not an `ichdet predict` output"):
        read_predictions([tmp_path / "other.parquet"])


@pytest.mark.parametrize(("value", "shown"), [
    (float("nan"), "nan"), (float("inf"), "inf"), (-0.1, "-0.1"), (1.2, "1.2"), (float("-inf"), "-inf"),
])
def test_read_predictions_refuses_bad_numbers_by_name(tmp_path: Path, value: float, shown: str) -> None:
    table = preds(ROWS)
    table.loc[4, "subarachnoid"] = value
    table.to_parquet(tmp_path / "p.parquet")
    with pytest.raises(IchdetError, match=rf"p\.parquet: 1 values are not probabilities in \[0, 1\], first at row 5 "
                                          rf"\(image 'ID_2'\), label 'subarachnoid': {shown}"):
        read_predictions([tmp_path / "p.parquet"])


@pytest.mark.parametrize(("frame", "match"), [
    (preds([]), r"holds no predictions \(0 rows\)"),
    (preds(ROWS).astype({"any": str}), r"columns \['any'\] are not numeric"),
])
def test_read_predictions_refuses_empty_and_text(tmp_path: Path, frame: pd.DataFrame, match: str) -> None:
    frame.to_parquet(tmp_path / "p.parquet")
    with pytest.raises(IchdetError, match=match):
        read_predictions([tmp_path / "p.parquet"])


def test_read_predictions_refuses_a_file_that_is_not_parquet(tmp_path: Path) -> None:
    (tmp_path / "p.parquet").write_text("image_id,epidural\n")
    with pytest.raises(IchdetError, match=r"p\.parquet: not a parquet file"):
        read_predictions([tmp_path / "p.parquet"])
    with pytest.raises(IchdetError, match="is a folder"):
        read_predictions([tmp_path])
    with pytest.raises(IchdetError, match="no such file"):
        read_predictions([tmp_path / "absent.parquet"])


def test_a_runs_oof_parquet_is_one_member_named_by_its_run(tmp_path: Path) -> None:
    # oof.parquet: image_id, fold, LABELS; each image once, from the fold that held it out
    oof = preds([("ID_1", "x", 0, 0.2), ("ID_2", "x", 1, 0.7)]).drop(columns="model")
    (tmp_path / "resnet34").mkdir()
    oof.to_parquet(tmp_path / "resnet34" / "oof.parquet")
    read = read_predictions([tmp_path / "resnet34" / "oof.parquet"])
    assert read["model"].unique().tolist() == ["resnet34"]
    assert read["fold"].unique().tolist() == [OOF_FOLD]
    wide = load_prediction_table(tmp_path / "resnet34" / "oof.parquet")
    np.testing.assert_allclose(wide.loc[["ID_1", "ID_2"], "any"].to_numpy(), [0.2, 0.7])


def test_identical_members_equal_one_member() -> None:
    one = ensemble(preds([("ID_1", "a", 0, 0.3), ("ID_2", "a", 0, 0.8)]))
    many = ensemble(preds([(i, m, f, p) for i, p in (("ID_1", 0.3), ("ID_2", 0.8)) for m in "ab" for f in (0, 1)]))
    pd.testing.assert_frame_equal(one, many)


@pytest.mark.parametrize(("ids", "kaggle"), [
    (["ID_1a2b", "ID_ff"], True),
    (["ID_1a2b", "1.2.840.113619.2.55"], False),
    (["ID_12_x"], False),
    (["../etc/passwd"], False),
])
def test_is_kaggle_ids(ids: list[str], kaggle: bool) -> None:
    assert is_kaggle_ids(pd.Index(ids)) is kaggle


def _wide(ids: list[str], p: float = 0.25) -> pd.DataFrame:
    return pd.DataFrame(p, index=pd.Index(ids, name="image_id"), columns=list(LABELS))


def test_write_ensemble_kaggle_ids_give_a_submission(tmp_path: Path) -> None:
    assert write_ensemble(_wide(["ID_1", "ID_2"]), tmp_path / "s.csv") == "submission"
    assert read_submission(tmp_path / "s.csv").shape == (2, 6)


def test_write_ensemble_hospital_ids_give_a_wide_csv(tmp_path: Path) -> None:
    ids = ["1.2.840.113619.2.55.3.1", "1.2.840.113619.2.55.3.2"]
    assert write_ensemble(_wide(ids), tmp_path / "p.csv") == "wide"
    assert (tmp_path / "p.csv").read_text().splitlines()[:2] == [
        "image_id,epidural,intraparenchymal,intraventricular,subarachnoid,subdural,any",
        "1.2.840.113619.2.55.3.1,0.25,0.25,0.25,0.25,0.25,0.25"]
    back = read_wide_csv(tmp_path / "p.csv")
    assert back.index.tolist() == ids
    pd.testing.assert_frame_equal(load_prediction_table(tmp_path / "p.csv"), back)


def test_write_ensemble_checks_the_sample_before_writing(tmp_path: Path) -> None:
    sample = write_submission(_wide(["ID_1", "ID_3"], 0.5), tmp_path / "sample.csv")
    out = tmp_path / "s.csv"
    out.write_text("ID,Label\nold,0\n")
    with pytest.raises(IchdetError, match=r"6 ids missing: ID_3_epidural"):
        write_ensemble(_wide(["ID_1", "ID_2"]), out, sample)
    assert out.read_text() == "ID,Label\nold,0\n"  # the old file is untouched
    with pytest.raises(IchdetError, match="non-Kaggle image ids"):
        write_ensemble(_wide(["1.2.3"]), out, sample)
    assert out.read_text() == "ID,Label\nold,0\n"


@pytest.mark.parametrize(("text", "match"), [
    ("image_id,epidural\n1.2,0.5\n", r"header is \['image_id', 'epidural'\]"),
    ("image_id,epidural,intraparenchymal,intraventricular,subarachnoid,subdural,any\n", "0 rows"),
    ("image_id,epidural,intraparenchymal,intraventricular,subarachnoid,subdural,any\n1.2,0,0,0,0,0,nan\n",
     r"first at row 1 \(image '1\.2'\), label 'any': nan"),
    ("image_id,epidural,intraparenchymal,intraventricular,subarachnoid,subdural,any\n1.2,0,0,0,0,x,0\n",
     r"columns \['subdural'\] are not numeric"),
    ("image_id,epidural,intraparenchymal,intraventricular,subarachnoid,subdural,any\n1.2,0,0,0,0,0,0\n"
     "1.2,0,0,0,0,0,0\n", "image ids repeat, e.g. '1.2'"),
])
def test_read_wide_csv_refuses(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(IchdetError, match=match):
        read_wide_csv(tmp_path / "p.csv")


# --------------------------------------------------------------------------------------------- bundle weights


def _weighted(rows: list[tuple[str, str, int, float]], weights: dict[str, float | None]) -> pd.DataFrame:
    """The table ``ichdet predict --bundle`` writes: each row with its model's ensemble weight."""
    table = preds(rows)
    table["weight"] = table["model"].map(weights).astype(float)
    return table


# The ensembling rule's numbers, fixed exactly (binary fractions, so every step is exact in float64):
# model a folds 0.25, 0.75 -> 0.5; model b folds 0.125, 0.375 -> 0.25; c one fold 1.0.
EXACT = [("ID_1", "a", 0, 0.25), ("ID_1", "a", 1, 0.75), ("ID_1", "b", 0, 0.125), ("ID_1", "b", 1, 0.375),
         ("ID_1", "c", 0, 1.0)]


@pytest.mark.parametrize(("weights", "override", "expected"), [
    ({"a": 1.0, "b": 1.0, "c": 2.0}, None, (0.5 + 0.25 + 2 * 1.0) / 4),  # 0.6875: the table's weights
    ({"a": 6.0, "b": 1.0, "c": 1.0}, None, (6 * 0.5 + 0.25 + 1.0) / 8),  # 0.53125
    ({"a": 1.7e308, "b": 1.7e308, "c": 1.7e308}, None, (0.5 + 0.25 + 1.0) / 3),  # their sum overflows
    ({"a": 6.0, "b": 1.0, "c": 1.0}, {"a": 1.0, "b": 0.0, "c": 1.0}, 0.75),  # --weight overrides the table's
    (None, None, (0.5 + 0.25 + 1.0) / 3),  # run tables carry no weights: equal
])
def test_ensemble_rule_numbers_for_a_weighted_bundle(weights: dict[str, float] | None,
                                                     override: dict[str, float] | None, expected: float) -> None:
    table = preds(EXACT) if weights is None else _weighted(EXACT, dict(weights))
    out = ensemble(table, override)
    assert out.loc["ID_1"].tolist() == pytest.approx([expected] * len(LABELS), rel=1e-15, abs=0)


@pytest.mark.parametrize(("weights", "match"), [
    ({"a": 2.0, "b": None}, r"models \['b'\] carry no ensemble weight, the others their bundle's; pass --weight"),
    ({"a": 2.0, "b": -1.0}, r"ensemble weights must be finite numbers >= 0; got \{'b': -1.0\}"),
    ({"a": float("inf"), "b": 1.0}, r"ensemble weights must be finite numbers >= 0; got \{'a': inf\}"),
    ({"a": 0.0, "b": 0.0}, r"weights are all zero"),
])
def test_bad_or_mixed_table_weights_are_refused(weights: dict[str, float | None], match: str) -> None:
    with pytest.raises(IchdetError, match=match):
        ensemble(_weighted(ROWS, weights))


def test_a_model_with_two_weights_is_refused() -> None:
    table = _weighted(ROWS, {"a": 2.0, "b": 1.0})
    table.loc[0, "weight"] = 3.0
    with pytest.raises(IchdetError, match=r"models carry more than one ensemble weight: \{'a': \[2.0, 3.0\]\}"):
        ensemble(table)


def test_bundle_and_run_tables_mixed_need_weights(tmp_path: Path) -> None:
    bundle_part = _weighted([r for r in ROWS if r[1] == "a"], {"a": 3.0})
    bundle_part.to_parquet(tmp_path / "bundle.parquet")
    preds([r for r in ROWS if r[1] == "b"]).to_parquet(tmp_path / "run.parquet")
    both = read_predictions([tmp_path / "bundle.parquet", tmp_path / "run.parquet"])
    with pytest.raises(IchdetError, match=r"models \['b'\] carry no ensemble weight"):
        ensemble(both)
    np.testing.assert_allclose(ensemble(both, {"a": 3.0, "b": 1.0}).loc["ID_1"].to_numpy(), 0.45)
