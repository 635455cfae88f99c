"""ONNX bundles (``ichdet bundle --runtime onnx``): every network exported and checked, run by onnxruntime,
the same probabilities as the torch bundle (1e-4); tampering and inconsistent bundles refused."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from seq_support import SeqRuns
from study_support import copy_study, study_files, tiny_runs
from typer.testing import CliRunner

from ichdet.cache.labels import LABELS
from ichdet.cli import app
from ichdet.errors import CheckpointError, RunFailed
from ichdet.infer.bundle import load_ensemble, write_bundle
from ichdet.infer.onnx_export import TOLERANCE, check_graph, export_2d, export_seq
from ichdet.infer.onnx_runtime import OnnxEmbedder, OnnxSequence, cpu_threads
from ichdet.infer.predict import predict_runs
from ichdet.models.backbones import build_model, build_seq_model
from ichdet.models.config import build_config, load_seq_config
from ichdet.study.predict import predict_study


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return tiny_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def bundles(runs: tuple[Path, Path, Path], seq_runs: SeqRuns, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Path]:
    """torch and onnx bundles of the 2D runs a (64 px) and b (48 px, 2.5D), and of the sequence run with its base."""
    root = tmp_path_factory.mktemp("onnx_bundles")
    a, b, labels = runs
    return {"2d_torch": write_bundle([a, b], root / "t.ichdet", {"a": 2.0, "b": 1.0}, 0.9, labels),
            "2d_onnx": write_bundle([a, b], root / "o.ichdet", {"a": 2.0, "b": 1.0}, 0.9, labels, runtime="onnx"),
            "seq_torch": write_bundle([seq_runs.base, seq_runs.seq], root / "st.ichdet"),
            "seq_onnx": write_bundle([seq_runs.base, seq_runs.seq], root / "so.ichdet", runtime="onnx")}


def _cache(runs: tuple[Path, Path, Path]) -> Path:
    return runs[0].parents[1] / "cache"


@pytest.mark.parametrize(("kind", "cache"), [("2d", "runs"), ("seq", "seq")])
def test_onnx_bundle_predicts_the_torch_bundles_probabilities(bundles: dict[str, Path], runs: tuple[Path, Path, Path],
                                                             seq_runs: SeqRuns, kind: str, cache: str) -> None:
    data = _cache(runs) if cache == "runs" else seq_runs.cache
    torch_preds = predict_runs([], data, bundle=bundles[f"{kind}_torch"], device="cpu")
    onnx_preds = predict_runs([], data, bundle=bundles[f"{kind}_onnx"], device="cpu")
    assert onnx_preds[["image_id", "model", "fold"]].equals(torch_preds[["image_id", "model", "fold"]])
    diff = np.abs(onnx_preds[list(LABELS)].to_numpy() - torch_preds[list(LABELS)].to_numpy()).max()
    assert diff <= 1e-4
    ens = load_ensemble(bundles[f"{kind}_onnx"])
    assert ens.manifest["runtime"] == "onnx" and all(m.onnx for m in ens.members)


def test_onnx_bundle_stores_graphs_with_sha256_and_keeps_the_weights(bundles: dict[str, Path]) -> None:
    with zipfile.ZipFile(bundles["seq_onnx"]) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        names = set(zf.namelist())
    assert manifest["format_version"] == 3 and manifest["runtime"] == "onnx"
    assert 0 <= manifest["onnx_check"]["max_abs_diff"] <= TOLERANCE
    for entry in [*manifest["members"], *manifest.get("bases", [])]:
        for k in entry["folds"]:
            for ext in ("onnx", "safetensors"):
                path = f"members/{entry['name']}/fold{k}.{ext}"
                assert path in names and path in entry["sha256"]


def _rewrite(src: Path, dest: Path, change: dict[str, bytes | None], manifest: dict[str, object] | None = None) -> Path:
    """A copy of bundle ``src`` with entries replaced (None: dropped) and manifest keys set."""
    with zipfile.ZipFile(src) as zin:
        entries = {n: zin.read(n) for n in zin.namelist()}
    for name, data in change.items():
        if data is None:
            entries.pop(name)
        else:
            entries[name] = data
    if manifest is not None:
        tree = json.loads(entries["manifest.json"])
        tree.update(manifest)
        entries["manifest.json"] = json.dumps(tree).encode()
    with zipfile.ZipFile(dest, "w") as zout:
        for name, data in entries.items():
            zout.writestr(name, data)
    return dest


@pytest.mark.parametrize(("change", "manifest", "message"), [
    ({"members/a/fold0.onnx": b"not a graph"}, None, "members/a/fold0.onnx holds 11 bytes uncompressed"),
    ({"members/a/fold1.onnx": None}, None, "members/a/fold1.onnx is listed in the manifest but missing"),
    ({}, {"runtime": "tensorrt"}, "manifest runtime = 'tensorrt': Input should be 'torch' or 'onnx'"),
])
def test_a_tampered_or_inconsistent_onnx_bundle_is_refused(bundles: dict[str, Path], tmp_path: Path,
                                                           change: dict[str, bytes | None],
                                                           manifest: dict[str, object] | None, message: str) -> None:
    bad = _rewrite(bundles["2d_onnx"], tmp_path / "bad.ichdet", change, manifest)
    with pytest.raises(CheckpointError, match=None) as err:
        load_ensemble(bad)
    assert message in str(err.value)


def test_a_torch_bundle_claiming_the_onnx_runtime_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    bad = _rewrite(bundles["2d_torch"], tmp_path / "bad.ichdet", {}, {"runtime": "onnx"})
    with pytest.raises(CheckpointError, match=r"runtime onnx but members \['a', 'b'\] lack ONNX graphs"):
        load_ensemble(bad)


@pytest.mark.parametrize("kind", ["bigru", "transformer"])
def test_sequence_graphs_take_any_batch_and_series_length(kind: str) -> None:
    cfg = load_seq_config(None, [f"model.kind={kind}", "model.hidden=16"])
    model = build_seq_model(cfg.model, 70, [64]).eval()
    graph, worst = export_seq(model, 70, kind, "test")
    assert worst <= TOLERANCE
    net = OnnxSequence(graph, "test")
    x = torch.randn(4, 23, 70)
    mask = torch.ones(4, 23, dtype=torch.bool)
    mask[2, 9:] = False
    with torch.inference_mode():
        diff = (net(x, mask) - model(x, mask))[mask].abs().max().item()
    assert diff <= TOLERANCE


def test_a_2d_graph_embeds_uint8_images_as_the_torch_path() -> None:
    cfg = build_config({}, ["model.backbone=resnet10t", "model.pretrained=false", "data.image_size=32"])
    model = build_model(cfg.model, cfg.data.in_chans).eval()
    graph, _ = export_2d(model, cfg.data.in_chans, 32, "test")
    net = OnnxEmbedder(graph, "test")
    assert net.num_features == model.num_features
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert tuple(net(images).shape) == (5, int(model.num_features) + len(LABELS))


def test_an_export_that_differs_from_torch_is_refused_with_the_difference() -> None:
    model = build_seq_model(load_seq_config(None, ["model.hidden=8"]).model, 20, [14]).eval()
    graph, _ = export_seq(model, 20, "bigru", "test")

    def shifted(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # a reference the graph does not compute
        return model(x, mask) + 0.01

    feed = {"features": torch.randn(1, 6, 20), "mask": torch.ones(1, 6, dtype=torch.bool)}
    with pytest.raises(RunFailed, match=r"member x fold 0: the ONNX export differs from the torch network by up to "
                                        r"0\.01 \(more than 0\.0001\); refusing to bundle it"):
        check_graph(graph, shifted, [feed], "member x fold 0", valid=lambda f: f["mask"].numpy())


def test_cpu_threads_share_the_cores_among_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    alone = cpu_threads()
    assert alone == len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(alone * 2))
    assert cpu_threads() == 1


def test_cli_bundle_runtime_onnx_and_unknown_runtime(runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, _, _ = runs
    ok = CliRunner().invoke(app, ["bundle", "--run", str(a), "--out", str(tmp_path / "m.ichdet"), "--runtime", "onnx"])
    assert ok.exit_code == 0, ok.output
    assert "runtime onnx" in ok.output
    bad = CliRunner().invoke(app, ["bundle", "--run", str(a), "--out", str(tmp_path / "n.ichdet"), "--runtime", "trt"])
    assert bad.exit_code == 2 and "--runtime 'trt': choose one of ['torch', 'onnx']" in bad.output
    assert not (tmp_path / "n.ichdet").exists()


def test_predict_study_with_an_onnx_bundle_gives_the_torch_bundles_result(bundles: dict[str, Path],
                                                                          rsna_sample: Path, tmp_path: Path) -> None:
    files = study_files(rsna_sample / "stage_2_test_images", "ID_1366d7c64f")[:6]
    copy_study(files, tmp_path / "in")
    found = {kind: predict_study(tmp_path / "in", load_ensemble(bundles[f"2d_{kind}"]), device="cpu").result
             for kind in ("torch", "onnx")}
    assert found["onnx"]["model"]["runtime"] == "onnx" and found["torch"]["model"]["runtime"] == "torch"
    series = [found[kind]["studies"][0]["series"] for kind in ("torch", "onnx")]
    assert len(series[0]) == len(series[1]) == 1
    probs = [np.array([[sl["probabilities"][label] for label in LABELS] for sl in part[0]["slices"]])
             for part in series]
    assert probs[0].shape == (6, len(LABELS)) and np.abs(probs[0] - probs[1]).max() <= 1e-4
