"""Model bundles: pack, verify (tampering, path traversal, pickles refused), load, round-trip predictions;
operating points (metrics.operating_points)."""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from study_support import copy_study, study_files, tiny_runs
from typer.testing import CliRunner

from ichdet.bundle import load_ensemble, sha256_bytes, write_bundle
from ichdet.cli import app
from ichdet.errors import CheckpointError, IchdetError
from ichdet.labels import LABELS, read_labels
from ichdet.metrics import operating_points
from ichdet.predict import predict_runs
from ichdet.study import predict_study


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return tiny_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(runs: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    a, b, labels = runs
    return write_bundle([a, b], tmp_path_factory.mktemp("bundle") / "model.ichdet", {"a": 2.0, "b": 1.0},
                        sensitivity=0.9, labels=labels)


def _rewrite(src: Path, dest: Path, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None,
             manifest_hash: bool = False) -> Path:
    """A copy of bundle ``src`` with entries replaced or added (and, with ``manifest_hash``, the manifest's
    sha256 of each replaced entry updated to match)."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin:
        entries = {name: zin.read(name) for name in zin.namelist()}
    entries.update(replace)
    if manifest_hash:
        manifest = json.loads(entries["manifest.json"])
        for member in manifest["members"]:
            for name in member["sha256"]:
                if name in replace:
                    member["sha256"][name] = sha256_bytes(replace[name])
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
    pd.testing.assert_frame_equal(predict_runs([a, b], cache, device="cpu"),
                                  predict_runs([], cache, device="cpu", bundle=bundle))


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
    ({"weights": {"a": 1.0, "b": 0.0}}, r"weights must be finite and > 0"),
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
