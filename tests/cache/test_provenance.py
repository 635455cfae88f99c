"""Provenance (issue 17 item 7, issue 19 item 4): what a cache holds, recorded in cache.json, and the summary
of what an ensemble's runs were trained on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from ichdet.cache.labels import LABELS, read_labels
from ichdet.cache.provenance import UNKNOWN, read_run_record, training_summary
from ichdet.cache.store import PixelCache, read_manifest
from ichdet.cache.writer import PreprocessOptions, is_synthetic, preprocess
from ichdet.synth import SynthSpec, make_dataset

OPTS = PreprocessOptions(size=32, workers=1, n_folds=2, chunk_size=8, progress=False)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    make_dataset(out, SynthSpec(n_studies=4, n_test_studies=1, size=32, slices_per_study=(8, 9), seed=5))
    return out


def test_a_synthetic_cache_records_what_it_holds(synth_dir: Path, tmp_path: Path) -> None:
    preprocess(synth_dir / "stage_2_train_images", tmp_path / "c", synth_dir / "stage_2_train.csv", OPTS)
    record = read_manifest(tmp_path / "c").provenance  # type: ignore[union-attr]
    index = PixelCache(tmp_path / "c").index
    truth = read_labels(synth_dir / "stage_2_train.csv")
    assert record is not None
    assert (record.images, record.studies, record.labelled_images) == (len(index), 4, len(index))
    assert record.positives == {label: int(truth.loc[index["image_id"], label].sum()) for label in LABELS}
    assert (record.synthetic, record.synthetic_images) == (True, len(index))
    assert len(record.fingerprint) == 64 and record.created_utc.endswith("Z")
    # the same data in another folder has the same fingerprint; other labels another one
    preprocess(synth_dir / "stage_2_train_images", tmp_path / "d", synth_dir / "stage_2_train.csv", OPTS)
    assert read_manifest(tmp_path / "d").provenance.fingerprint == record.fingerprint  # type: ignore[union-attr]
    preprocess(synth_dir / "stage_2_train_images", tmp_path / "e", None, OPTS)
    unlabelled = read_manifest(tmp_path / "e").provenance  # type: ignore[union-attr]
    assert unlabelled is not None and unlabelled.fingerprint != record.fingerprint
    assert (unlabelled.positives, unlabelled.labelled_images, unlabelled.synthetic) == (None, 0, True)


def test_a_real_cache_is_not_synthetic(rsna_sample: Path, tmp_path: Path) -> None:
    preprocess(rsna_sample / "stage_2_test_images", tmp_path / "c", None, OPTS)
    record = read_manifest(tmp_path / "c").provenance  # type: ignore[union-attr]
    assert record is not None and (record.synthetic, record.synthetic_images) == (False, 0)
    assert record.images == len(PixelCache(tmp_path / "c"))


def test_chunks_of_an_older_run_make_the_origin_unknown(synth_dir: Path, tmp_path: Path) -> None:
    """A rerun reuses chunks whose manifests an older ichdet wrote (no per-file origin): unknown, not False."""
    preprocess(synth_dir / "stage_2_train_images", tmp_path / "c", None, OPTS)
    manifest = read_manifest(tmp_path / "c")
    assert manifest is not None
    for shard in (tmp_path / "c" / "pixels" / f"gen_{manifest.generation:05d}").glob("*.json"):
        tree = json.loads(shard.read_text())
        for row in tree["rows"]:
            row.pop("synthetic", None)
        shard.write_text(json.dumps(tree))
    preprocess(synth_dir / "stage_2_train_images", tmp_path / "c", None, OPTS)
    record = read_manifest(tmp_path / "c").provenance  # type: ignore[union-attr]
    assert record is not None and (record.synthetic, record.synthetic_images) == (None, 0)


def test_a_cache_from_before_provenance_still_reads(synth_dir: Path, tmp_path: Path) -> None:
    preprocess(synth_dir / "stage_2_train_images", tmp_path / "c", None, OPTS)
    path = tmp_path / "c" / "cache.json"
    tree = json.loads(path.read_text())
    del tree["provenance"]
    path.write_text(json.dumps(tree))
    assert read_manifest(tmp_path / "c").provenance is None  # type: ignore[union-attr]
    assert len(PixelCache(tmp_path / "c")) > 0


def test_is_synthetic(synth_dir: Path, rsna_sample: Path, tmp_path: Path) -> None:
    synth_file = sorted((synth_dir / "stage_2_train_images").iterdir())[0]
    real_file = sorted((rsna_sample / "stage_2_test_images").iterdir())[0]
    (tmp_path / "short").write_bytes(synth_file.read_bytes()[:140])
    (tmp_path / "text").write_text("ICHDET_SYNTH is not a DICOM file")
    edited = bytearray(synth_file.read_bytes())
    at = edited.find(b"ICHDET_SYNTH")
    edited[at:at + 12] = b"OTHER_WRITER"
    (tmp_path / "edited").write_bytes(bytes(edited))
    edited[at:at + 12] = b"ICHDET_OTHER"
    (tmp_path / "other").write_bytes(bytes(edited))
    cases = {synth_file: True, real_file: False, tmp_path / "short": False, tmp_path / "text": False,
             tmp_path / "edited": False, tmp_path / "other": False, tmp_path / "missing": False}
    assert {path: is_synthetic(path) for path in cases} == cases


# --------------------------------------------------------------------------------------------- summary


def _record(fingerprint: str, synthetic: bool | None, images: int = 10, positives: dict[str, int] | None = None,
            created: str = "2026-01-01T00:00:00Z", trained: str = "2026-01-02T00:00:00Z") -> dict[str, Any]:
    data = {"fingerprint": fingerprint * 64, "images": images, "studies": 2, "labelled_images": images,
            "positives": positives if positives is not None else dict.fromkeys(LABELS, 1), "synthetic": synthetic,
            "synthetic_images": images if synthetic else 0, "created_utc": created, "ichdet_version": "0.1.0"}
    return {"data": data, "trained_utc": trained}


@pytest.mark.parametrize(("records", "expected"), [
    ([_record("a", True), _record("a", True)], {"synthetic": True, "images": 10, "studies": 2, "caches": 1}),
    ([_record("a", False), _record("b", False, images=5)], {"synthetic": False, "images": 15, "studies": 4,
                                                           "caches": 2}),
    ([_record("a", False), _record("b", True)], {"synthetic": True, "images": 20, "caches": 2}),
    ([_record("a", False), UNKNOWN], {"synthetic": UNKNOWN, "images": None, "positives": None, "runs_unknown": 1}),
    ([_record("a", True), UNKNOWN], {"synthetic": True, "images": None, "runs_unknown": 1}),
    ([_record("a", None)], {"synthetic": UNKNOWN, "images": 10}),
    ([UNKNOWN], {"synthetic": UNKNOWN, "caches": 0, "images": None, "studies": None, "runs": 1}),
    ([{"trained_utc": "x"}], {"synthetic": UNKNOWN, "runs_unknown": 1}),  # a record that is not one
])
def test_training_summary(records: list[dict[str, Any] | str], expected: dict[str, Any]) -> None:
    summary = training_summary(records)
    shown = {**summary, "caches": len(summary["caches"])}
    assert {k: shown[k] for k in expected} == expected


def test_training_summary_adds_positives_and_dates() -> None:
    a = _record("a", False, positives=dict.fromkeys(LABELS, 2), created="2026-01-01T00:00:00Z")
    b = _record("b", False, positives=dict.fromkeys(LABELS, 3), created="2026-02-01T00:00:00Z",
                trained="2026-02-02T00:00:00Z")
    summary = training_summary([a, b, a])
    assert summary["positives"] == dict.fromkeys(LABELS, 5)
    assert summary["dates"] == {"data_created_utc": ["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"],
                                "trained_utc": ["2026-01-02T00:00:00Z", "2026-02-02T00:00:00Z"]}
    assert summary["runs"] == 3 and summary["runs_unknown"] == 0


@pytest.mark.parametrize("content", [None, "not json", "[1, 2]", '{"other": 1}'])
def test_a_run_without_a_readable_record_is_unknown(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "data.json").write_text(content)
    assert read_run_record(tmp_path) == UNKNOWN


def test_the_synth_writer_marks_its_files(synth_dir: Path, tmp_path: Path) -> None:
    """The marker is the synth writer's: a copy of its files elsewhere is still recognised."""
    shutil.copytree(synth_dir / "stage_2_test_images", tmp_path / "copy")
    assert all(is_synthetic(p) for p in (tmp_path / "copy").iterdir())


def test_a_run_record_of_the_same_data_is_kept(synth_dir: Path, tmp_path: Path) -> None:
    """A resumed or refused train on the same cache leaves RUN/data.json as it was (first training date);
    another cache's record replaces it."""
    from ichdet.cache.provenance import write_run_record

    preprocess(synth_dir / "stage_2_train_images", tmp_path / "c", synth_dir / "stage_2_train.csv", OPTS)
    preprocess(synth_dir / "stage_2_test_images", tmp_path / "t", None, OPTS)
    first, other = read_manifest(tmp_path / "c").provenance, read_manifest(tmp_path / "t").provenance
    run = tmp_path / "run"
    run.mkdir()
    write_run_record(run, first)
    before = (run / "data.json").read_bytes()
    (run / "data.json").write_bytes(before.replace(b'"trained_utc": "', b'"trained_utc": "1999'))
    kept = (run / "data.json").read_bytes()
    write_run_record(run, first)
    assert (run / "data.json").read_bytes() == kept
    write_run_record(run, other)
    assert json.loads((run / "data.json").read_text())["data"] == other.model_dump()  # type: ignore[union-attr]
