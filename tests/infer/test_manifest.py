"""The bundle manifest's schema (every value checked, one line naming the field) and the bounded reading
of a bundle's files (size caps before reading, hashing while streaming): issue 17 items 1 and 12."""

from __future__ import annotations

import json
import os
import re
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ichdet.cli import app
from ichdet.errors import CheckpointError, IchdetError
from ichdet.infer import members as members_module
from ichdet.infer.bundle import load_ensemble, sha256_bytes
from ichdet.infer.manifest import parse_manifest
from ichdet.infer.members import normalised, resolve_weights
from ichdet.names import LABELS

HEX = "ab" * 32


def _manifest(**top: Any) -> dict[str, Any]:
    """A valid version-1 manifest of two 2D members (fake hashes), with ``top`` keys replaced."""
    def member(name: str, weight: float) -> dict[str, Any]:
        return {"name": name, "kind": "2d", "weight": weight, "folds": [0, 1], "backbone": "resnet10t",
                "sha256": {f"members/{name}/config.yaml": HEX, f"members/{name}/fold0.safetensors": HEX,
                           f"members/{name}/fold1.safetensors": HEX}}
    tree = {"format": "ichdet-bundle", "format_version": 1, "ichdet_version": "0.1.0",
            "members": [member("a", 2.0), member("b", 1.0)], "thresholds": {"any": 0.3, "subdural": 0.5},
            "operating_points": None, "thresholds_source": "x"}
    tree.update(top)
    return tree


def _with_member(change: dict[str, Any], index: int = 0) -> dict[str, Any]:
    tree = _manifest()
    tree["members"][index].update(change)
    return tree


def _text(tree: dict[str, Any]) -> bytes:
    return json.dumps(tree).encode()  # NaN is written as the bare NaN literal, which json.loads accepts


#: A site calibration's temperatures: one per label.
_TEMPERATURES = {label: 1.2 for label in LABELS}


def _with_graphs(tree: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``tree`` with an ONNX graph listed for every fold of the members ``names``."""
    for entry in tree["members"]:
        if entry["name"] in names:
            entry["sha256"].update({f"members/{entry['name']}/fold{k}.onnx": HEX for k in entry["folds"]})
    return tree


# Each case: the manifest as a hostile or careless editor leaves it, and the one line that refuses it.
BAD = [
    (_with_member({"weight": 1e308}), r"members\[0\]\.weight = 1e\+308: Input should be less than or equal to 1000000"),
    (_manifest(thresholds={"any": 7}), r"thresholds\.any = 7: Input should be less than or equal to 1"),
    (_manifest(thresholds={"any": -3}), r"thresholds\.any = -3: Input should be greater than or equal to 0"),
    (_with_member({"weight": -1.0}), r"members\[0\]\.weight = -1\.0: Input should be greater than 0"),
    (_manifest(members=[_with_member({"weight": 0})["members"][0], _with_member({"weight": 0}, 1)["members"][1]]),
     r"members\[0\]\.weight = 0: Input should be greater than 0"),
    (_manifest(thresholds={"any": float("nan")}), r"thresholds\.any = nan: Input should be a finite number"),
    (_with_member({"weight": "2"}), r"members\[0\]\.weight = '2': Input should be a valid number"),
    (_with_member({"weight": True}), r"members\[0\]\.weight = True: Input should be a valid number"),
    (_manifest(members=5), r"members = 5: Input should be a valid list"),
    (_manifest(members=[]), r"members = \[\]: List should have at least 1 item"),
    (_with_member({"folds": ["../x"]}), r"members\[0\]\.folds\[0\] = '\.\./x': Input should be a valid integer"),
    (_with_member({"folds": [0, 0]}), r"members\[0\]\.folds = \[0, 0\]: Value error, folds must be distinct"),
    (_with_member({"folds": [1000]}), r"members\[0\]\.folds\[0\] = 1000: Input should be less than or equal to 999"),
    (_with_member({"sha256": [HEX]}), r"members\[0\]\.sha256 = \['abab.*: Input should be a valid dictionary"),
    (_with_member({"sha256": {"members/a/config.yaml": "x" * 64}}),
     r"members\[0\]\.sha256\.members/a/config\.yaml = 'xxx.*: String should match pattern"),
    (_manifest(thresholds=[0.5] * 6), r"thresholds = \[0\.5, .*: Input should be a valid dictionary"),
    (_manifest(thresholds={"bleed": 0.5}), r"thresholds\.bleed = 'bleed': String should match pattern"),
    (_with_member({"name": "../evil"}), r"members\[0\]\.name = '\.\./evil': String should match pattern"),
    (_with_member({"kind": "3d"}), r"members\[0\]\.kind = '3d': Input should be '2d' or 'seq'"),
    (_with_member({"name": None}), r"members\[0\]\.name = None: Input should be a valid string"),
    ({k: v for k, v in _manifest().items() if k != "members"}, r"manifest members: missing"),
    (_manifest(runtime="tensorrt"), r"runtime = 'tensorrt': Input should be 'torch' or 'onnx'"),
    (_manifest(calibration=[1]), r"calibration = \[1\]: Input should be a valid dictionary"),
    (_manifest(bases=[{**_manifest()["members"][0], "weight": -1}]),
     r"bases\[0\]\.weight = -1: Input should be greater"),
    (_with_graphs(_manifest(), ["b"]), r"^model\.ichdet: manifest runtime torch but members \['b'\] have ONNX graphs"),
    (_with_graphs(_manifest(runtime="onnx"), ["a"]), r"runtime onnx but members \['b'\] lack ONNX graphs"),
    (_with_graphs(_manifest(runtime="onnx", calibration={"temperature": {"any": 1.2}}), ["a", "b"]),
     r"calibration = .*temperature must give a finite number > 0 for each of"),
    (_manifest(calibration={"temperature": {**_TEMPERATURES, "any": -1.0}}), r"temperature must give a finite"),
    (_manifest(calibration={"temperature": {**_TEMPERATURES, "any": float("nan")}}), r"temperature must give"),
    (_manifest(format_version="1"), r"bundle format version '1'; this ichdet .* reads versions \[1, 2, 3\]"),
    (_manifest(format_version=True), r"bundle format version True; this ichdet .* reads versions \[1, 2, 3\]"),
]


@pytest.mark.parametrize(("tree", "match"), BAD)
def test_a_bad_manifest_is_refused_in_one_line_naming_the_field(tree: dict[str, Any], match: str) -> None:
    with pytest.raises(CheckpointError) as err:
        parse_manifest(_text(tree), Path("model.ichdet"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.ichdet: ")
    assert re.search(match, message), message


@pytest.mark.parametrize("change", [
    {},  # the manifest as written
    {"runtime": "onnx", "calibration": {"site": "x", "temperature": _TEMPERATURES}},  # bundle --runtime onnx
    {"runtime": "torch", "training": {"synthetic": True}, "newer_key": 1},  # unknown top-level keys are ignored
    {"format_version": 2, "bases": []},
])
def test_a_good_manifest_and_its_optional_fields_are_accepted(change: dict[str, Any]) -> None:
    tree = _manifest(**change)
    if change.get("runtime") == "onnx":  # a graph next to the weights of every fold of every network
        tree = _with_graphs(tree, ["a", "b"])
    manifest = parse_manifest(_text(tree), Path("m.ichdet"))
    assert [(m.name, m.weight, m.folds) for m in manifest.members] == [("a", 2.0, [0, 1]), ("b", 1.0, [0, 1])]
    assert manifest.thresholds == {"any": 0.3, "subdural": 0.5}
    assert manifest.runtime == change.get("runtime", "torch")


def _rewrite_manifest(src: Path, dest: Path, tree: dict[str, Any] | bytes, add: dict[str, bytes] | None = None,
                      deflate: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(src) as zin:
        entries = {name: zin.read(name) for name in zin.namelist()}
    entries["manifest.json"] = tree if isinstance(tree, bytes) else _text(tree)
    entries.update(add or {})
    with zipfile.ZipFile(dest, "w") as zout:
        for name, data in entries.items():
            zout.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
    return dest


def _read_manifest(bundle: Path) -> dict[str, Any]:
    with zipfile.ZipFile(bundle) as zf:
        tree: dict[str, Any] = json.loads(zf.read("manifest.json"))
    return tree


@pytest.mark.parametrize(("change", "field"), [
    (lambda t: t["members"][0].update(weight=1e308), "members[0].weight = 1e+308"),
    (lambda t: t["thresholds"].update(any=7), "thresholds.any = 7"),
    (lambda t: t["thresholds"].update(any=float("nan")), "thresholds.any = nan"),
    (lambda t: t["members"][0].update(weight="2"), "members[0].weight = '2'"),
    (lambda t: t.update(members=5), "members = 5"),
    (lambda t: t["members"][0].update(folds=["../x"]), "members[0].folds[0] = '../x'"),
    (lambda t: t["bases"][0].update(sha256=["x"]), "bases[0].sha256 = ['x']"),
    (lambda t: t.update(thresholds=[0.5]), "thresholds = [0.5]"),
])
def test_cli_refuses_a_tampered_manifest_in_one_line(seq_bundle: Path, tmp_path: Path, change: Any,
                                                     field: str) -> None:
    tree = _read_manifest(seq_bundle)
    change(tree)
    bad = _rewrite_manifest(seq_bundle, tmp_path / "bad.ichdet", tree)
    res = CliRunner().invoke(app, ["predict-study", str(tmp_path), "--bundle", str(bad), "--out",
                                   str(tmp_path / "r.json")])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and "Traceback" not in res.output, res.output
    assert f"bad.ichdet: manifest {field}" in res.output
    assert not (tmp_path / "r.json").exists()


def test_an_onnx_graph_listed_in_the_manifest_is_accepted_and_verified(seq_bundle: Path, tmp_path: Path) -> None:
    graph = b"onnx graph bytes"
    tree = _read_manifest(seq_bundle)
    tree["runtime"], tree["calibration"] = "onnx", {"sensitivity": 0.9}
    graphs = {}  # an ONNX bundle has a graph for every fold of every network (members and bases)
    for entry in [*tree["members"], *tree.get("bases", [])]:
        for k in entry["folds"]:
            graphs[f"members/{entry['name']}/fold{k}.onnx"] = graph
            entry["sha256"][f"members/{entry['name']}/fold{k}.onnx"] = sha256_bytes(graph)
    good = _rewrite_manifest(seq_bundle, tmp_path / "onnx.ichdet", tree, graphs)
    ens = load_ensemble(good)
    assert ens.manifest["runtime"] == "onnx" and ens.members[0].onnx
    assert ens.members[0].sha256["members/seq/fold0.onnx"] == sha256_bytes(graph)
    bad = _rewrite_manifest(seq_bundle, tmp_path / "bad.ichdet", tree,
                            {**graphs, "members/seq/fold0.onnx": graph + b"!"})
    with pytest.raises(CheckpointError, match=r"member members/seq/fold0.onnx was modified"):
        load_ensemble(bad)
    tree["members"][0]["sha256"]["members/base/fold0.onnx"] = sha256_bytes(graph)  # another member's folder
    other = _rewrite_manifest(seq_bundle, tmp_path / "other.ichdet", tree, graphs)
    with pytest.raises(CheckpointError, match=r"member 'seq' lists files .* and ONNX graphs of its own"):
        load_ensemble(other)


# --------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize(("weights", "expected"), [
    ([2.0, 1.0], [2 / 3, 1 / 3]),
    ([1e6, 1e6], [0.5, 0.5]),
    ([1.7e308, 1.7e308, 1.7e308], [1 / 3, 1 / 3, 1 / 3]),  # their plain sum is inf: every share was 0
    ([1e-300, 1.0], [1e-300, 1.0]),
])
def test_weights_normalise_without_overflow(weights: list[float], expected: list[float]) -> None:
    np.testing.assert_allclose(normalised(weights), expected, rtol=1e-15)


@pytest.mark.parametrize("weight", [1e308, 0.0, -1.0, float("nan"), float("inf"), 1e6 * 1.0000001])
def test_run_weights_outside_the_range_are_refused(weight: float) -> None:
    with pytest.raises(IchdetError, match=r"ensemble weights must be finite, > 0 and <= 1e\+06"):
        resolve_weights(["a", "b"], {"a": weight, "b": 1.0})


# --------------------------------------------------------------------------------------------- zip bomb


class _Reads:
    """Counts the bytes read from each bundle file (zipfile's streams), and the largest single read of each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes: dict[str, int] = {}
        self.largest: dict[str, int] = {}
        original = zipfile.ZipExtFile.read

        def read(stream: zipfile.ZipExtFile, n: int = -1) -> bytes:
            data = original(stream, n)
            name = stream.name
            self.bytes[name] = self.bytes.get(name, 0) + len(data)
            self.largest[name] = max(self.largest.get(name, 0), len(data))
            return data

        monkeypatch.setattr(zipfile.ZipExtFile, "read", read)


def test_a_deflated_member_over_the_cap_is_refused_unread(seq_bundle: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = bytes(8 << 20)  # 8 MiB of zeros deflate to ~8 kB: the bundle file stays small
    entry = "members/base/fold0.safetensors"
    tree = _read_manifest(seq_bundle)
    tree["bases"][0]["sha256"][entry] = sha256_bytes(bomb)
    tree["bases"][0].pop("bytes", None)
    bad = _rewrite_manifest(seq_bundle, tmp_path / "bomb.ichdet", tree, {entry: bomb}, deflate=(entry,))
    with zipfile.ZipFile(bad) as zf:
        assert zf.getinfo(entry).compress_size < 64 << 10  # stored small, declared large
    monkeypatch.setattr(members_module, "MAX_WEIGHTS_BYTES", 4 << 20)
    reads = _Reads(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"bomb.ichdet: member {entry} declares 8388608 bytes uncompressed, "
                                              r"over the 4194304 a bundle file may hold; refusing it unread"):
        load_ensemble(bad)
    assert reads.bytes.get(entry, 0) == 0


def test_a_member_whose_size_differs_from_the_manifest_is_refused_unread(seq_bundle: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    entry = "members/seq/fold1.safetensors"
    tree = _read_manifest(seq_bundle)
    size = tree["members"][0]["bytes"][entry]
    tree["members"][0]["bytes"][entry] = size - 1
    bad = _rewrite_manifest(seq_bundle, tmp_path / "short.ichdet", tree)
    reads = _Reads(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"member {entry} holds {size} bytes uncompressed, the manifest says "
                                              rf"{size - 1}; refusing a modified bundle"):
        load_ensemble(bad)
    assert reads.bytes.get(entry, 0) == 0


def test_bundle_files_are_hashed_in_bounded_blocks(seq_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading checks every fold's weights without keeping them: memory stays well below the largest file."""
    largest = max(size for entry in _read_manifest(seq_bundle)["members"] + _read_manifest(seq_bundle)["bases"]
                   for name, size in entry["bytes"].items() if name.endswith(".safetensors"))
    monkeypatch.setattr(members_module, "READ_BLOCK", 4096)
    reads = _Reads(monkeypatch)
    tracemalloc.start()
    try:
        ens = load_ensemble(seq_bundle)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < largest / 2, (peak, largest)
    weights = [name for name in reads.bytes if name.endswith(".safetensors")]
    assert len(weights) == 4 and all(reads.bytes[name] > 4096 for name in weights)  # read whole, in blocks
    assert max(reads.largest[name] for name in weights) == 4096
    assert ens.members[0].name == "seq"


# --------------------------------------------------------------------------------------------- --bundle paths


@pytest.mark.parametrize(("kind", "says"), [
    ("folder", "is a folder, not a bundle file; pass the model.ichdet file that `ichdet bundle` wrote (a run "
               "folder goes to --run)"),
    ("fifo", "is not a regular file (a FIFO, socket or device); pass the model.ichdet file that `ichdet bundle` "
             "wrote"),
    ("missing", "bundle not found; write one with `ichdet bundle --run RUN --out {path}`"),
    ("text", "not a bundle (not a zip archive)"),
])
def test_a_bundle_path_that_is_no_bundle_file_says_what_it_is(tmp_path: Path, kind: str, says: str) -> None:
    path = tmp_path / "m.ichdet"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it would block: it must be refused unopened
    elif kind == "text":
        path.write_text("notes")
    res = CliRunner().invoke(app, ["predict-study", str(tmp_path), "--bundle", str(path), "--out",
                                   str(tmp_path / "r.json")])
    assert res.exit_code == 2
    assert res.output == f"error: {path}: {says.format(path=path)}\n"


def test_a_deflated_manifest_over_its_cap_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "big.ichdet"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("manifest.json", b" " * (17 << 20), zipfile.ZIP_DEFLATED)  # 17 MiB of blanks: ~17 kB stored
    reads = _Reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"big.ichdet: member manifest.json declares 17825792 bytes uncompressed, "
                                              r"over the 16777216 a bundle file may hold; refusing it unread"):
        load_ensemble(bad)
    assert reads.bytes == {}
