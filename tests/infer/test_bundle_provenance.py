"""What a bundle says about its training data and its operating points, and how the study result carries it
(issue 17 items 5 and 7, issue 19 item 4)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
from seq_support import SeqRuns
from typer.testing import CliRunner

from ichdet.cache.provenance import RUN_DATA_FILE, SYNTHETIC_WARNING, UNKNOWN
from ichdet.cache.store import read_manifest
from ichdet.cli import app
from ichdet.infer.bundle import load_ensemble, write_bundle
from ichdet.names import LABELS
from ichdet.study.predict import predict_study
from ichdet.study.result import NO_OPERATING_POINT

POINT_FIELDS = {"threshold", "auc", "sensitivity", "specificity", "positives", "warnings"}


def _manifest(bundle: Path) -> dict[str, Any]:
    with zipfile.ZipFile(bundle) as zf:
        tree: dict[str, Any] = json.loads(zf.read("manifest.json"))
    return tree


def test_runs_record_their_training_cache(seq_runs: SeqRuns) -> None:
    cache = read_manifest(seq_runs.cache).provenance  # type: ignore[union-attr]
    assert cache is not None and cache.synthetic is True
    for run in (seq_runs.base, seq_runs.seq):
        record = json.loads((run / RUN_DATA_FILE).read_text())
        assert record["data"] == cache.model_dump() and record["trained_utc"].endswith("Z")


def test_a_bundle_records_what_its_runs_were_trained_on(seq_bundle: Path, seq_runs: SeqRuns) -> None:
    manifest = _manifest(seq_bundle)
    cache = read_manifest(seq_runs.cache).provenance  # type: ignore[union-attr]
    assert cache is not None
    training = manifest["training"]
    assert (training["synthetic"], training["runs"], training["runs_unknown"]) == (True, 2, 0)  # seq and its base
    assert [c["fingerprint"] for c in training["caches"]] == [cache.fingerprint]
    assert (training["images"], training["studies"], training["positives"]) == (cache.images, cache.studies,
                                                                                cache.positives)
    assert manifest["members"][0]["training"]["data"]["fingerprint"] == cache.fingerprint
    assert manifest["bases"][0]["training"]["data"]["fingerprint"] == cache.fingerprint
    assert load_ensemble(seq_bundle).manifest["training"] == training


def test_runs_from_before_provenance_say_unknown(seq_runs: SeqRuns, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(seq_runs.base, old, ignore=shutil.ignore_patterns("features", RUN_DATA_FILE))
    out = write_bundle([old], tmp_path / "old.ichdet")
    manifest = _manifest(out)
    assert manifest["members"][0]["training"] == UNKNOWN
    assert (manifest["training"]["synthetic"], manifest["training"]["runs_unknown"]) == (UNKNOWN, 1)
    mixed = write_bundle([old, seq_runs.seq2], tmp_path / "mixed.ichdet")
    assert _manifest(mixed)["training"]["synthetic"] is True  # one run on synthetic data is enough


def test_the_result_says_the_model_was_trained_on_synthetic_data(seq_bundle: Path, seq_runs: SeqRuns) -> None:
    images = seq_runs.cache.parent / "data" / "stage_2_train_images"
    result = predict_study(images, load_ensemble(seq_bundle), device="cpu").result
    assert result["warnings"] == [SYNTHETIC_WARNING]
    assert result["model"]["training"]["synthetic"] is True
    assert result["model"]["members"][0]["training"]["data"]["synthetic"] is True
    points = result["model"]["operating_points"]  # bundled without --labels: nothing measured
    assert points == {label: {"threshold": 0.5, "auc": None, "sensitivity": None, "specificity": None,
                              "positives": None, "warnings": [NO_OPERATING_POINT]} for label in LABELS}


def test_bundle_labels_records_and_warns_of_operating_point_quality(seq_runs: SeqRuns, tmp_path: Path) -> None:
    out = tmp_path / "m.ichdet"
    res = CliRunner().invoke(app, ["bundle", "--run", str(seq_runs.seq), "--out", str(out),
                                   "--labels", str(seq_runs.labels), "--sensitivity", "0.9"])
    assert res.exit_code == 0, res.output
    points = _manifest(out)["operating_points"]
    assert set(points) == set(LABELS)
    for point in points.values():
        assert set(point) >= POINT_FIELDS and point["positives"] == point["n_pos"]
        assert point["sensitivity"] is None or point["sensitivity"] >= 0.9
    # one stderr line per label with warnings, naming them all; none for a label without
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning: ") and ":" in line[9:]]
    expected = [f"warning: {label}: " + "; ".join(p["warnings"]) for label, p in points.items() if p["warnings"]]
    assert [w for w in warned if not w.startswith("warning: trained on")] == expected and expected
    assert "warning: trained on ichdet's synthetic data: every result of this bundle says so" in res.stderr
    assert "warning" not in res.stdout
    # the study result states each label's operating point as the manifest holds it
    images = seq_runs.cache.parent / "data" / "stage_2_train_images"
    result = predict_study(images, load_ensemble(out), device="cpu").result
    for label in LABELS:
        shown = result["model"]["operating_points"][label]
        assert set(shown) == POINT_FIELDS
        assert {k: shown[k] for k in POINT_FIELDS - {"threshold"}} == {k: points[label][k]
                                                                      for k in POINT_FIELDS - {"threshold"}}
        assert shown["threshold"] == result["model"]["thresholds"][label]


def test_an_older_bundles_operating_points_get_their_warnings(seq_runs: SeqRuns, tmp_path: Path) -> None:
    """A manifest written before the quality fields (n_pos, no auc, no warnings): the result derives them."""
    from ichdet.study.result import _operating_point

    old = {"threshold": 0.2, "sensitivity": 1.0, "specificity": 0.01, "n_pos": 3, "n_neg": 40}
    assert _operating_point(old, 0.2) == {
        "threshold": 0.2, "auc": None, "sensitivity": 1.0, "specificity": 0.01, "positives": 3,
        "warnings": ["only 3 positive images (fewer than 10): the threshold rests on a handful of cases",
                     "specificity 0.010 at the threshold is below 0.05: the label is called on nearly every "
                     "negative"]}


@pytest.mark.parametrize("resume", [False, True])
def test_seq_train_out_on_a_2d_run_says_so(seq_runs: SeqRuns, resume: bool) -> None:
    before = sorted(p.name for p in seq_runs.base.iterdir())
    res = CliRunner().invoke(app, ["seq", "train", "--run", str(seq_runs.base), "--data", str(seq_runs.cache),
                                   "--out", str(seq_runs.base), *(["--resume"] if resume else [])])
    assert res.exit_code == 2
    assert res.output == (f"error: --out {seq_runs.base} holds a 2D run (`ichdet train`), not a sequence run; "
                          "choose a new --out for the sequence run (a 2D run goes to --run as its base)\n")
    assert sorted(p.name for p in seq_runs.base.iterdir()) == before


def test_seq_train_out_on_a_file_or_a_sequence_run(seq_runs: SeqRuns, tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("x")
    res = CliRunner().invoke(app, ["seq", "train", "--run", str(seq_runs.base), "--data", str(seq_runs.cache),
                                   "--out", str(tmp_path / "notes")])
    assert res.exit_code == 2 and res.output == (f"error: --out {tmp_path / 'notes'} is a file, not a run folder; "
                                                 "choose a new --out for the sequence run\n")
    res = CliRunner().invoke(app, ["seq", "train", "--run", str(seq_runs.base), "--data", str(seq_runs.cache),
                                   "--out", str(seq_runs.seq)])
    assert res.exit_code == 2 and "already holds a sequence run (fold0); pass --resume" in res.output
