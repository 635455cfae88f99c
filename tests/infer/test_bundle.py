"""Model bundles: pack, verify (tampering, path traversal, pickles refused), load, round-trip predictions
(2D and sequence members, format versions 1 and 2); operating points (metrics.operating_points)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from seq_support import SeqRuns, StemImages
from study_support import copy_study, study_files, tiny_runs
from typer.testing import CliRunner

from ichdet.cache.labels import LABELS, read_labels, read_submission
from ichdet.cache.store import PixelCache
from ichdet.cli import app
from ichdet.errors import CheckpointError, IchdetError
from ichdet.evaluate.ensembling import ensemble, read_predictions
from ichdet.evaluate.metrics import operating_points
from ichdet.infer.bundle import load_ensemble, sha256_bytes, write_bundle
from ichdet.infer.predict import ensemble_probs, predict_runs
from ichdet.models.config import load_seq_config
from ichdet.study.predict import predict_study


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return tiny_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(runs: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    a, b, labels = runs
    return write_bundle([a, b], tmp_path_factory.mktemp("bundle") / "model.ichdet", {"a": 2.0, "b": 1.0},
                        sensitivity=0.9, labels=labels)


def _rewrite(src: Path, dest: Path, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None,
             manifest_hash: bool = False, drop: tuple[str, ...] = ()) -> Path:
    """A copy of bundle ``src`` with entries replaced, added or dropped (and, with ``manifest_hash``, the
    manifest's sha256 of each replaced entry updated to match)."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin:
        entries = {name: zin.read(name) for name in zin.namelist() if name not in drop}
    entries.update(replace)
    if manifest_hash:
        manifest = json.loads(entries["manifest.json"])
        for member in manifest["members"]:
            for name in member["sha256"]:
                if name in replace:
                    member["sha256"][name] = sha256_bytes(replace[name])
                    member.get("bytes", {})[name] = len(replace[name])
        entries["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dest, "w") as zout:
        for name, data in {**entries, **add}.items():
            zout.writestr(name, data)
    return dest


def test_bundle_layout_and_manifest(bundle: Path, runs: tuple[Path, Path, Path]) -> None:
    with zipfile.ZipFile(bundle) as zf:
        names = sorted(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
    assert names == ["manifest.json", "members/a/config.yaml", "members/a/fold0.safetensors",
                     "members/a/fold1.safetensors", "members/b/config.yaml", "members/b/fold0.safetensors",
                     "members/b/fold1.safetensors"]
    assert [(m["name"], m["weight"], m["folds"], m["image_size"]) for m in manifest["members"]] == [
        ("a", 2.0, [0, 1], 64), ("b", 1.0, [0, 1], 48)]
    assert manifest["members"][0]["sha256"]["members/a/fold1.safetensors"] == sha256_bytes(
        (runs[0] / "fold1" / "best.safetensors").read_bytes())
    assert manifest["format"] == "ichdet-bundle" and manifest["ichdet_version"] == "0.1.0"
    # 2D members only: the version-1 layout and manifest (no "bases"), as older ichdet wrote and reads it
    assert manifest["format_version"] == 1 and "bases" not in manifest
    ens = load_ensemble(bundle)
    assert ens.manifest["bundle_sha256"] == sha256_bytes(bundle.read_bytes())
    assert ens.members[1].config.data.slice_offsets == [-1, 0, 1]


def test_thresholds_are_the_oof_operating_points(bundle: Path, runs: tuple[Path, Path, Path]) -> None:
    a, b, labels = runs
    oof = (pd.read_parquet(a / "oof.parquet").set_index("image_id")[list(LABELS)] * 2
           + pd.read_parquet(b / "oof.parquet").set_index("image_id")[list(LABELS)]) / 3
    truth = read_labels(labels).loc[oof.index]
    expected = operating_points(truth[list(LABELS)].to_numpy(), oof.to_numpy(), 0.9)
    ens = load_ensemble(bundle)
    np.testing.assert_allclose([ens.thresholds[k] for k in LABELS], expected["threshold"].to_numpy(), rtol=1e-6)
    points = ens.manifest["operating_points"]
    assert [points[k]["n_pos"] for k in LABELS] == expected["n_pos"].tolist()
    assert all(points[k]["sensitivity"] >= 0.9 for k in LABELS)


def test_bundle_round_trips_to_the_runs_predictions(bundle: Path, runs: tuple[Path, Path, Path],
                                                    rsna_sample: Path, tmp_path: Path) -> None:
    a, b, _ = runs
    files = study_files(rsna_sample / "stage_2_test_images", "ID_1366d7c64f")[:6]
    copy_study(files, tmp_path / "in")
    from_runs = predict_study(tmp_path / "in", load_ensemble(runs=[a, b], weights={"a": 2.0, "b": 1.0}), device="cpu")
    from_bundle = predict_study(tmp_path / "in", load_ensemble(bundle), device="cpu")
    assert from_runs.result["studies"][0]["series"] == from_bundle.result["studies"][0]["series"]
    cache = a.parents[1] / "cache"
    from_bundle_table = predict_runs([], cache, device="cpu", bundle=bundle)
    assert from_bundle_table.groupby("model")["weight"].unique().map(list).to_dict() == {"a": [2.0], "b": [1.0]}
    pd.testing.assert_frame_equal(predict_runs([a, b], cache, device="cpu"), from_bundle_table.drop(columns="weight"))


def test_predict_bundle_then_ensemble_gives_the_bundles_probabilities(bundle: Path, runs: tuple[Path, Path, Path],
                                                                     tmp_path: Path) -> None:
    """`predict --bundle` + `ensemble` = the bundle's own ensemble (Ensemble.combine, as predict-study and
    report compute it), with the bundle's unequal weights (a: 2, b: 1), not an equal mean."""
    cache = runs[0].parents[1] / "cache"
    table, sub = tmp_path / "p.parquet", tmp_path / "s.csv"
    res = CliRunner().invoke(app, ["predict", "--data", str(cache), "--bundle", str(bundle), "--out", str(table),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    ens = load_ensemble(bundle)
    probs = ensemble_probs(ens.members, PixelCache(cache), torch.device("cpu"))
    expected = ens.combine([p.astype(np.float64).mean(axis=0) for p in probs])  # predict-study's, in cache order
    ids = PixelCache(cache).index["image_id"]
    wide = ensemble(read_predictions([table]))
    np.testing.assert_allclose(wide.loc[ids, list(LABELS)].to_numpy(), expected, rtol=0, atol=1e-12)
    equal = ensemble(read_predictions([table]).drop(columns="weight"))  # what ensemble did before
    assert np.abs(equal.loc[ids, list(LABELS)].to_numpy() - expected).max() > 1e-4
    res = CliRunner().invoke(app, ["ensemble", str(table), "--out", str(sub)])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(read_submission(sub).loc[ids, list(LABELS)].to_numpy(), expected, atol=1e-6)
    res = CliRunner().invoke(app, ["ensemble", str(table), "--out", str(sub), "--weight", "a=1", "--weight", "b=1"])
    assert res.exit_code == 0, res.output  # --weight overrides the bundle's
    np.testing.assert_allclose(read_submission(sub).loc[ids, list(LABELS)].to_numpy(),
                               equal.loc[ids, list(LABELS)].to_numpy(), atol=1e-6)


def test_predict_with_both_bundle_and_run_is_refused(bundle: Path, runs: tuple[Path, Path, Path],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "p.parquet"
    res = CliRunner().invoke(app, ["predict", "--data", str(runs[0].parents[1] / "cache"), "--bundle", str(bundle),
                                   "--run", str(runs[0]), "--out", str(out)])
    assert res.exit_code == 2
    assert res.output == "error: give either --bundle or --run, not both: a bundle already holds its runs\n"
    assert not out.exists()


def test_tampered_member_is_refused_by_name(bundle: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(bundle) as zf:
        weights = bytearray(zf.read("members/b/fold1.safetensors"))
    weights[-1] ^= 0x01
    bad = _rewrite(bundle, tmp_path / "bad.ichdet", {"members/b/fold1.safetensors": bytes(weights)})
    with pytest.raises(CheckpointError, match=r"bad.ichdet: member members/b/fold1.safetensors was modified"):
        load_ensemble(bad)
    res = CliRunner().invoke(app, ["predict-study", str(tmp_path), "--bundle", str(bad)])
    assert res.exit_code == 2 and "members/b/fold1.safetensors was modified" in res.output


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil", "members/a/../../evil", "members/a/fold0.pt",
                                  "members\\a\\x", "members/../manifest.json"])
def test_member_names_outside_the_layout_are_refused(bundle: Path, tmp_path: Path, name: str) -> None:
    bad = _rewrite(bundle, tmp_path / "bad.ichdet", add={name: b"x"})
    with pytest.raises(CheckpointError, match=r"refused member name"):
        load_ensemble(bad)


def test_a_member_stored_twice_is_refused(bundle: Path, tmp_path: Path) -> None:
    bad = _rewrite(bundle, tmp_path / "bad.ichdet")
    with zipfile.ZipFile(bad, "a") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        zf.writestr("members/a/fold0.safetensors", b"x")
    with pytest.raises(CheckpointError, match=r"member names \['members/a/fold0.safetensors'\] occur more than once"):
        load_ensemble(bad)


def test_unlisted_member_is_refused(bundle: Path, tmp_path: Path) -> None:
    bad = _rewrite(bundle, tmp_path / "bad.ichdet", add={"members/c/fold0.safetensors": b"x"})
    with pytest.raises(CheckpointError, match=r"files \['members/c/fold0.safetensors'\] are not in the manifest"):
        load_ensemble(bad)


class _Planted:
    """Unpickling this creates a file: the test proves that loading never unpickles."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_a_pickle_with_a_matching_hash_is_never_unpickled(bundle: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"weight": _Planted(str(marker))})
    bad = _rewrite(bundle, tmp_path / "bad.ichdet", {"members/a/fold0.safetensors": payload}, manifest_hash=True)
    ens = load_ensemble(bad)  # every hash matches the manifest
    with pytest.raises(CheckpointError, match=r"member a fold 0: not a readable safetensors file"):
        ens.members[0].load_models(torch.device("cpu"))
    assert not marker.exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"weights": {"a": 1.0}}, r"--weight names \['a'\], but the members are \['a', 'b'\]"),
    ({"weights": {"a": 1.0, "b": 0.0}}, r"weights must be finite, > 0 and <= 1e\+06"),
    ({"sensitivity": 0.0}, r"sensitivity 0.0 must be in \(0, 1\]"),
])
def test_bad_bundle_arguments(runs: tuple[Path, Path, Path], tmp_path: Path, kwargs: dict[str, object],
                              match: str) -> None:
    with pytest.raises(IchdetError, match=match):
        write_bundle([runs[0], runs[1]], tmp_path / "m.ichdet", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "m.ichdet").exists()


def test_bundle_command(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.ichdet"
    res = CliRunner().invoke(app, ["bundle", "--run", str(runs[0]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"sha256 {sha256_bytes(out.read_bytes())}" in res.output
    assert load_ensemble(out).thresholds == dict.fromkeys(LABELS, 0.5)  # no --labels: the default
    with pytest.raises(IchdetError, match=r"either --bundle or at least one --run"):
        load_ensemble(out, runs=[runs[0]])


@pytest.mark.parametrize(("existing", "force", "replaced"), [
    ("foreign", False, False),  # a file ichdet did not write: refused, left as it was
    ("foreign", True, True),
    ("bundle", False, True),  # an earlier bundle: replaced
])
def test_bundle_out_that_exists(runs: tuple[Path, Path, Path], tmp_path: Path, existing: str, force: bool,
                                replaced: bool) -> None:
    out = tmp_path / "m.ichdet"
    if existing == "foreign":
        out.write_text("my notes")
    else:
        write_bundle([runs[1]], out)
    before = out.read_bytes()
    res = CliRunner().invoke(app, ["bundle", "--run", str(runs[0]), "--out", str(out), *(["--force"] if force else [])])
    if replaced:
        assert res.exit_code == 0, res.output
        assert [m.name for m in load_ensemble(out).members] == [runs[0].resolve().name]
    else:
        assert res.exit_code == 2 and "is not an ichdet output of this kind; pass --force" in res.output
        assert out.read_bytes() == before


@pytest.mark.parametrize(("pos", "neg", "sensitivity", "expected"), [
    ([0.9, 0.8, 0.3, 0.2], [0.1, 0.25, 0.5], 0.75, (0.3, 0.75, 2 / 3, 4, 3)),
    ([0.9, 0.8, 0.3, 0.2], [0.1, 0.25, 0.5], 1.0, (0.2, 1.0, 1 / 3, 4, 3)),
    ([0.9, 0.8, 0.3, 0.2], [0.1, 0.25, 0.5], 0.5, (0.8, 0.5, 1.0, 4, 3)),
    ([0.6], [0.6, 0.7], 0.95, (0.6, 1.0, 0.0, 1, 2)),
])
def test_operating_points(pos: list[float], neg: list[float], sensitivity: float,
                          expected: tuple[float, float, float, int, int]) -> None:
    scores = np.array(pos + neg)
    y_pred = np.repeat(scores[:, None], len(LABELS), axis=1)
    y_true = np.zeros_like(y_pred)
    y_true[:len(pos)] = 1.0
    y_true[:, 0] = 0.0  # epidural: no positive case
    table = operating_points(y_true, y_pred, sensitivity)
    assert list(table.columns) == ["threshold", "sensitivity", "specificity", "n_pos", "n_neg"]
    assert list(table.index) == list(LABELS)
    assert tuple(table.loc["any"]) == pytest.approx(expected)
    assert np.isnan(table.loc["epidural", "threshold"]) and table.loc["epidural", "n_pos"] == 0


# --------------------------------------------------------------------------------------------- sequence members


def _zip(bundle: Path) -> tuple[list[str], dict[str, object], str]:
    with zipfile.ZipFile(bundle) as zf:
        text = zf.read("manifest.json").decode()
        return sorted(zf.namelist()), json.loads(text), text


def test_seq_bundle_layout_names_base_runs_by_member_name(seq_bundle: Path, seq_runs: SeqRuns) -> None:
    names, manifest, text = _zip(seq_bundle)
    assert names == ["manifest.json", "members/base/config.yaml", "members/base/fold0.safetensors",
                     "members/base/fold1.safetensors", "members/seq/config.yaml", "members/seq/fold0.safetensors",
                     "members/seq/fold1.safetensors", "members/seq/seq.json"]
    with zipfile.ZipFile(seq_bundle) as zf:
        assert json.loads(zf.read("members/seq/seq.json")) == {"bases": ["base"]}
    arch = load_seq_config(seq_runs.seq / "config.yaml").model.arch
    assert manifest["format_version"] == 2
    assert [(m["name"], m["kind"], m["folds"], m["bases"], m["sequence_model"]) for m in manifest["members"]] == [
        ("seq", "seq", [0, 1], ["base"], arch)]
    assert [(b["name"], b["kind"], b["folds"], b["backbone"]) for b in manifest["bases"]] == [
        ("base", "2d", [0, 1], "resnet10t")]
    assert manifest["bases"][0]["sha256"]["members/base/fold1.safetensors"] == sha256_bytes(
        (seq_runs.base / "fold1" / "best.safetensors").read_bytes())
    assert manifest["members"][0]["sha256"]["members/seq/fold0.safetensors"] == sha256_bytes(
        (seq_runs.seq / "fold0" / "best.safetensors").read_bytes())
    assert str(seq_runs.base.parent) not in text  # never an absolute path: base runs by member name
    ens = load_ensemble(seq_bundle)
    (member,) = ens.members
    assert member.kind == "seq" and [b.name for b in member.bases] == ["base"] and member.bases[0].kind == "2d"
    assert member.seq_config == load_seq_config(seq_runs.seq / "config.yaml")
    assert [b["name"] for b in ens.manifest["bases"]] == ["base"]


def test_seq_bundle_round_trips_to_the_seq_runs_predictions(seq_bundle: Path, seq_runs: SeqRuns) -> None:
    from_run = predict_runs([seq_runs.seq], seq_runs.cache, device="cpu")
    from_bundle = predict_runs([], seq_runs.cache, device="cpu", bundle=seq_bundle)
    assert from_bundle["weight"].tolist() == [1.0] * len(from_bundle)  # the bundle's weight of its one member
    pd.testing.assert_frame_equal(from_run, from_bundle.drop(columns="weight"))  # the same code path: exactly equal
    assert sorted(set(from_run["fold"])) == [0, 1] and set(from_run["model"]) == {"seq"}
    folds = [from_run[from_run["fold"] == k][list(LABELS)].to_numpy() for k in (0, 1)]
    assert np.abs(folds[0] - folds[1]).max() > 1e-4  # each fold its own CNN and sequence model


def test_mixed_bundle_stores_each_run_once(seq_runs: SeqRuns, tmp_path: Path) -> None:
    runs = [seq_runs.seq, seq_runs.base, seq_runs.seq2]
    weights = {"seq": 3.0, "base": 1.0, "seq2": 2.0}
    out = write_bundle(runs, tmp_path / "mixed.ichdet", weights, sensitivity=0.9, labels=seq_runs.labels)
    names, manifest, _ = _zip(out)
    assert [n for n in names if n.startswith("members/base/")] == [
        "members/base/config.yaml", "members/base/fold0.safetensors", "members/base/fold1.safetensors"]
    assert [(m["name"], m["kind"], m.get("bases")) for m in manifest["members"]] == [
        ("seq", "seq", ["base"]), ("base", "2d", None), ("seq2", "seq", ["base"])]
    assert manifest["bases"] == []  # the base is a member: stored once, under its member name
    ens = load_ensemble(out)
    assert ens.members[0].bases[0] is ens.members[1] and ens.members[2].bases[0] is ens.members[1]
    from_bundle = predict_runs([], seq_runs.cache, device="cpu", bundle=out)
    assert from_bundle.groupby("model")["weight"].first().to_dict() == weights
    pd.testing.assert_frame_equal(predict_runs(runs, seq_runs.cache, device="cpu"), from_bundle.drop(columns="weight"))
    # operating points from the ensembled out-of-fold predictions, the sequence runs' oof.parquet included
    oof = sum(w * pd.read_parquet(r / "oof.parquet").set_index("image_id")[list(LABELS)]
              for r, w in zip(runs, weights.values(), strict=True)) / 6
    truth = read_labels(seq_runs.labels).loc[oof.index]
    expected = operating_points(truth[list(LABELS)].to_numpy(), oof.to_numpy(), 0.9)
    np.testing.assert_allclose([ens.thresholds[k] for k in LABELS], expected["threshold"].fillna(0.5).to_numpy(),
                               rtol=1e-6)


def test_two_seq_members_share_one_stored_base(seq_runs: SeqRuns, tmp_path: Path) -> None:
    out = write_bundle([seq_runs.seq, seq_runs.seq2], tmp_path / "two.ichdet")
    names, manifest, _ = _zip(out)
    assert [n for n in names if n.startswith("members/base/")] == [
        "members/base/config.yaml", "members/base/fold0.safetensors", "members/base/fold1.safetensors"]
    assert [b["name"] for b in manifest["bases"]] == ["base"]
    ens = load_ensemble(out)
    assert ens.members[0].bases[0] is ens.members[1].bases[0]


@pytest.mark.parametrize("entry", ["members/seq/fold1.safetensors", "members/base/fold0.safetensors",
                                   "members/seq/seq.json", "members/seq/config.yaml", "members/base/config.yaml"])
def test_tampered_seq_bundle_file_is_refused_by_name(seq_bundle: Path, seq_runs: SeqRuns, tmp_path: Path,
                                                     entry: str) -> None:
    with zipfile.ZipFile(seq_bundle) as zf:
        data = bytearray(zf.read(entry))
    data[len(data) // 2] ^= 0x01
    bad = _rewrite(seq_bundle, tmp_path / "bad.ichdet", {entry: bytes(data)})
    with pytest.raises(CheckpointError, match=rf"bad.ichdet: member {re.escape(entry)} was modified"):
        load_ensemble(bad)
    out = tmp_path / "p.parquet"
    res = CliRunner().invoke(app, ["predict", "--data", str(seq_runs.cache), "--out", str(out), "--bundle", str(bad)])
    assert res.exit_code == 2 and f"{entry} was modified" in res.output and not out.exists()


def test_missing_or_unlisted_seq_bundle_files_are_refused(seq_bundle: Path, tmp_path: Path) -> None:
    missing = _rewrite(seq_bundle, tmp_path / "missing.ichdet", drop=("members/base/fold1.safetensors",))
    with pytest.raises(CheckpointError, match=r"member members/base/fold1.safetensors is listed in the manifest "
                                              r"but missing"):
        load_ensemble(missing)
    extra = _rewrite(seq_bundle, tmp_path / "extra.ichdet", add={"members/seq/fold7.safetensors": b"x"})
    with pytest.raises(CheckpointError, match=r"files \['members/seq/fold7.safetensors'\] are not in the manifest"):
        load_ensemble(extra)


@pytest.mark.parametrize(("change", "match"), [
    ({"format_version": 4}, r"bundle format version 4; this ichdet .* reads versions \[1, 2, 3\]"),
    ({"bases": []}, r"member 'seq' needs base runs \['base'\], which the bundle does not hold"),
])
def test_inconsistent_seq_manifest_is_refused(seq_bundle: Path, tmp_path: Path, change: dict[str, object],
                                              match: str) -> None:
    with zipfile.ZipFile(seq_bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    bad = _rewrite(seq_bundle, tmp_path / "bad.ichdet", {"manifest.json": json.dumps(manifest | change).encode()})
    with pytest.raises(CheckpointError, match=match):
        load_ensemble(bad)


def test_a_base_and_a_member_of_one_name_but_different_runs_are_refused(seq_runs: SeqRuns, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "base"
    shutil.copytree(seq_runs.base, other, ignore=shutil.ignore_patterns("features"))
    with pytest.raises(IchdetError, match=r"different runs share a folder name.*'base'.*rename one of the folders"):
        load_ensemble(runs=[seq_runs.seq, other])
    with pytest.raises(IchdetError, match=r"different runs share a folder name"):
        write_bundle([seq_runs.seq, other], tmp_path / "m.ichdet")
    assert not (tmp_path / "m.ichdet").exists()


def test_fold_k_cnns_feed_fold_k_sequence_model(seq_runs: SeqRuns, tmp_path: Path) -> None:
    """Swapping folds 0 and 1 of both the base run and the sequence run swaps the folds' predictions,
    which holds only when fold k's CNN feeds fold k's sequence model."""
    base, seq = tmp_path / "base", tmp_path / "seq"
    shutil.copytree(seq_runs.base, base, ignore=shutil.ignore_patterns("features"))
    shutil.copytree(seq_runs.seq, seq)
    for run in (base, seq):
        first, second = (run / f"fold{k}" / "best.safetensors" for k in (0, 1))
        data = first.read_bytes()
        first.write_bytes(second.read_bytes())
        second.write_bytes(data)
    (seq / "seq.json").write_text(json.dumps({"bases": [str(base.resolve())]}))
    original = predict_runs([seq_runs.seq], seq_runs.cache, device="cpu")
    swapped = predict_runs([seq], seq_runs.cache, device="cpu")

    def fold(table: pd.DataFrame, k: int) -> np.ndarray:
        return table[table["fold"] == k].sort_values("image_id")[list(LABELS)].to_numpy()

    for k in (0, 1):
        np.testing.assert_array_equal(fold(swapped, k), fold(original, 1 - k))
    assert np.abs(fold(original, 0) - fold(original, 1)).max() > 1e-4


@pytest.mark.parametrize(("tta", "views"), [(True, 2), (False, 1)])
@pytest.mark.parametrize("budget", [None, 0])  # None: all folds in one pass; 0: fold by fold, features released
def test_mixed_bundle_runs_each_cnn_once_and_predicts_each_member_as_its_run(
        seq_runs: SeqRuns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tta: bool, views: int,
        budget: int | None) -> None:
    """A 2D run that is a member and the base of two sequence members: one pass per (fold, view) for all
    three (not three), and each member's predictions those of its run predicted alone."""
    from ichdet.infer import passes

    if budget is not None:
        monkeypatch.setattr(passes, "FEATURE_BUDGET", budget)
    runs = [seq_runs.base, seq_runs.seq, seq_runs.seq2]
    mixed = write_bundle(runs, tmp_path / "mixed.ichdet")
    with StemImages() as stems:
        together = predict_runs([], seq_runs.cache, tta=tta, device="cpu", bundle=mixed)
    n = together["image_id"].nunique()
    assert stems.images == n * 2 * views  # one base run x 2 folds x views
    alone = pd.concat([predict_runs([r], seq_runs.cache, tta=tta, device="cpu") for r in runs], ignore_index=True)
    pd.testing.assert_frame_equal(together[["image_id", "model", "fold"]], alone[["image_id", "model", "fold"]])
    np.testing.assert_allclose(together[list(LABELS)], alone[list(LABELS)], rtol=0, atol=1e-6)
    assert set(together["model"]) == {"base", "seq", "seq2"} and set(together["fold"]) == {0, 1}


class CountingCache(PixelCache):
    """A cache that counts the images read out of it (every read goes through ``view_row``)."""

    reads = 0

    def view_row(self, row: int) -> np.ndarray:
        self.reads += 1
        return super().view_row(row)


@pytest.mark.parametrize(("budget", "reads_per_image"), [(None, 1), (0, 2)])  # 0: fold by fold, 2 folds
def test_mixed_bundle_reads_each_image_once_per_fold_group(seq_runs: SeqRuns, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, budget: int | None,
                                                          reads_per_image: int) -> None:
    from ichdet.infer import passes

    if budget is not None:
        monkeypatch.setattr(passes, "FEATURE_BUDGET", budget)
    ens = load_ensemble(write_bundle([seq_runs.base, seq_runs.seq, seq_runs.seq2], tmp_path / "mixed.ichdet"))
    cache = CountingCache(seq_runs.cache)
    found = ensemble_probs(ens.members, cache, torch.device("cpu"))
    assert cache.reads == len(cache) * reads_per_image
    assert [p.shape for p in found] == [(2, len(cache), len(LABELS))] * 3


def test_a_sequence_run_over_a_sequence_run_is_refused_by_name(seq_runs: SeqRuns, tmp_path: Path) -> None:
    run = tmp_path / "seq_on_seq"
    shutil.copytree(seq_runs.seq, run)
    (run / "seq.json").write_text(json.dumps({"bases": [str(seq_runs.seq2)]}))
    with pytest.raises(CheckpointError, match=rf"{seq_runs.seq2} \(a base run of .*seq_on_seq\) is a sequence run"):
        load_ensemble(runs=[run])
