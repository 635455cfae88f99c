"""Study pipeline: folder scan, series selection, slice order, prediction and the result JSON."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from study_support import copy_study, study_files, tiny_runs
from typer.testing import CliRunner

from ichdet.cache.writer import PreprocessOptions, preprocess
from ichdet.cli import app
from ichdet.dicom.series import SliceHeader, order_series, series_reason
from ichdet.errors import IchdetError
from ichdet.evaluate.ensembling import ensemble
from ichdet.infer.bundle import Ensemble, load_ensemble
from ichdet.infer.predict import predict_runs
from ichdet.names import LABELS
from ichdet.study.predict import predict_study
from ichdet.study.result import slice_ranges, write_result
from ichdet.study.scan import scan_folder

STUDY = "ID_134d398b61"  # 28 slices, one series, tilted gantry, no duplicate positions
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
TILT30 = (1.0, 0.0, 0.0, 0.0, math.cos(math.radians(30)), -math.sin(math.radians(30)))


def _h(sop: str, position: tuple[float, ...] | None = (0.0, 0.0, 0.0), **fields: object) -> SliceHeader:
    values: dict[str, object] = dict(
        path=Path(f"/x/{sop}"), sop_uid=sop, sop_class="", modality="CT", study_uid="1.2", series_uid="1.2.3",
        series_number=1, description="", image_type=("ORIGINAL", "PRIMARY", "AXIAL"), orientation=AXIAL,
        position=position, spacing=(0.5, 0.5), rows=512, cols=512, frames=1, instance_number=None)
    values.update(fields)
    return SliceHeader(**values)  # type: ignore[arg-type]


def _series(n: int = 6, **fields: object) -> list[SliceHeader]:
    return [_h(f"s{i}", (0.0, 0.0, 5.0 * i), **fields) for i in range(n)]


# --------------------------------------------------------------------------------------------- pure


def test_tilted_gantry_orders_along_the_normal_not_z() -> None:
    # 30 degree tilt: normal (0, 0.5, 0.866); each slice 5 mm further along it but shifted 12 mm down its
    # column direction, so z *falls* from slice to slice while the true order rises
    col, normal = np.array(TILT30[3:]), np.array([0.0, 0.5, math.cos(math.radians(30))])
    headers = [_h(f"s{i}", tuple(5.0 * i * normal + 12.0 * i * col), orientation=TILT30) for i in (3, 0, 4, 1, 2)]
    assert sorted(headers, key=lambda h: h.position[2])[0].sop_uid == "s4"  # z alone would get it backwards
    slices, duplicates = order_series(headers)
    assert [s.sop_uid for s in slices] == ["s0", "s1", "s2", "s3", "s4"]
    assert [round(s.position_mm, 6) for s in slices] == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert duplicates == []


def test_duplicate_positions_kept_once_and_reported() -> None:
    headers = [*_series(5), _h("r2", (0.0, 0.0, 10.0)), _h("s3", (0.0, 0.0, 15.0))]
    slices, duplicates = order_series(headers)
    assert [s.sop_uid for s in slices] == ["s0", "s1", "r2", "s3", "s4"]  # "r2" < "s2": kept by UID order
    assert sorted((d.sop_uid, d.kept_sop_uid) for d in duplicates) == [("s2", "r2"), ("s3", "s3")]


@pytest.mark.parametrize(("fields", "n", "reason"), [
    ({}, 6, None),
    ({"image_type": ()}, 6, None),  # the RSNA files: no ImageType, no SOP Class UID in the data set
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.2"}, 5, None),
    ({"orientation": TILT30}, 6, None),
    ({}, 4, r"^too short: 4 distinct slice positions, at least 5 needed$"),
    ({"modality": "MR"}, 6, r"^modality MR, not CT$"),
    ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, 6, r"^localizer/scout \(ImageType ORIGINAL\\PRIMARY"),
    ({"image_type": ("DERIVED", "SECONDARY", "REFORMATTED")}, 6, r"^derived or secondary image"),
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.7"}, 6, r"^secondary capture"),
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.88.11", "rows": 0}, 6, r"^not an image \(structured report"),
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.2.1", "frames": 40}, 6, r"only single-frame CT Image Storage"),
    ({"orientation": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)}, 6, r"^not axial: the slice normal is 90 degrees"),
    ({"orientation": None}, 6, r"^no ImagePositionPatient/ImageOrientationPatient"),
    ({"spacing": None}, 6, r"^PixelSpacing missing"),
])
def test_series_reason(fields: dict[str, object], n: int, reason: str | None) -> None:
    got = series_reason(_series(n, **fields))
    if reason is None:
        assert got is None
    else:
        assert got is not None and re.search(reason, got), got


def test_series_reason_mixed_orientations_and_matrices() -> None:
    tilted = [*_series(5), _h("t", (0.0, 0.0, 40.0), orientation=TILT30)]
    assert series_reason(tilted) == "ImageOrientationPatient differs between slices: not one stack of slices"
    assert series_reason([*_series(5), _h("m", (0.0, 0.0, 40.0), rows=256)]) == "Rows/Columns differ between slices"


@pytest.mark.parametrize(("called", "ranges"), [
    ([False, True, True, False, True], [(1, 2), (4, 4)]),
    ([True, True, True], [(0, 2)]),
    ([False, False], []),
    ([], []),
])
def test_slice_ranges(called: list[bool], ranges: list[tuple[int, int]]) -> None:
    assert slice_ranges(np.array(called, dtype=bool)) == ranges


# --------------------------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def study(rsna_sample: Path) -> list[Path]:
    return study_files(rsna_sample / "stage_2_train_images", STUDY)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return tiny_runs(tmp_path_factory)


def _z_order(files: list[Path]) -> list[str]:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return [str(d.SOPInstanceUID) for d in sorted(headers, key=lambda d: float(d.ImagePositionPatient[2]))]


def _comparable(result: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in result.items() if k not in ("timings_s", "created_utc")}


def test_nested_rle_layout_gives_the_flat_result(study: list[Path], runs: tuple[Path, Path, Path],
                                                 tmp_path: Path) -> None:
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    copy_study(study, flat, nested=False)
    for path in copy_study(study, nested):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless, generate_instance_uid=False)  # same image, same UID
        ds.save_as(path)
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for p in nested.rglob("IM*")} == {RLELossless}
    before = {p: p.read_bytes() for p in nested.rglob("*") if p.is_file()}
    ens = load_ensemble(runs=[runs[0]])
    results = [predict_study(folder, ens, device="cpu").result for folder in (flat, nested)]
    assert _comparable(results[0]) == _comparable(results[1])
    series = results[1]["studies"][0]["series"]  # type: ignore[index]
    assert len(series) == 1 and series[0]["n_slices"] == len(study) == 28
    assert [s["sop_instance_uid"] for s in series[0]["slices"]] == _z_order(study)
    assert before == {p: p.read_bytes() for p in nested.rglob("*") if p.is_file()}  # nothing modified


def _variant(src: Path, dest: Path, series_uid: str, **values: object) -> None:
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = f"{series_uid}.{src.stem[3:]}"
    for key, value in values.items():
        setattr(ds, key, value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest)


def _structured_report(dest: Path, study_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(dest), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "SR", study_uid, "1.2.3.4.5"
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)


def _mixed_folder(study: list[Path], root: Path) -> None:
    copy_study(study, root / "ct")
    for i, f in enumerate(study[:3]):
        _variant(f, root / "scout" / f"s{i}", "1.2.9.1", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _variant(study[0], root / "sc" / "x", "1.2.9.2", SOPClassUID="1.2.840.10008.5.1.4.1.1.7",
             ImageType=["DERIVED", "SECONDARY"])
    for i, f in enumerate(study[:3]):
        _variant(f, root / "short" / f"t{i}", "1.2.9.3")
    _structured_report(root / "sr" / "report", STUDY)
    (root / "notes").write_text("not a DICOM file\n")


def test_scout_secondary_capture_report_and_junk_are_skipped_with_reasons(study: list[Path], tmp_path: Path) -> None:
    _mixed_folder(study, tmp_path)
    scan = scan_folder(tmp_path)
    assert scan.n_files == 28 + 3 + 1 + 3 + 1 + 1
    assert [(f.path, f.reason.split(" (")[0]) for f in scan.skipped_files] == [("notes", "not a DICOM file")]
    (entry,) = scan.studies
    assert [len(s.slices) for s in entry.selected] == [28]
    reasons = {s.series_uid: s.reason for s in entry.series if not s.selected}
    assert reasons["1.2.9.1"] == "localizer/scout (ImageType ORIGINAL\\PRIMARY\\LOCALIZER)"
    assert reasons["1.2.9.2"] == "secondary capture (SOP class 1.2.840.10008.5.1.4.1.1.7): screenshots are not analysed"
    assert reasons["1.2.9.3"] == "too short: 3 distinct slice positions, at least 5 needed"
    assert reasons["1.2.3.4.5"] == "not an image (structured report; SOP class 1.2.840.10008.5.1.4.1.1.88.11)"


def test_folder_without_ct_is_a_clear_error(study: list[Path], runs: tuple[Path, Path, Path],
                                            tmp_path: Path) -> None:
    _structured_report(tmp_path / "in" / "a" / "report", STUDY)
    (tmp_path / "in" / "readme").write_text("hello")
    _variant(study[0], tmp_path / "in" / "sc", "1.2.9.2", SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    with pytest.raises(IchdetError, match=r"in: no usable axial CT series \(3 files, 1 studies, 2 series, "
                                          r"1 unreadable; skipped because: not an image"):
        predict_study(tmp_path / "in", load_ensemble(runs=[runs[0]]), device="cpu")
    res = CliRunner().invoke(app, ["predict-study", str(tmp_path / "in"), "--run", str(runs[0]),
                                   "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "no usable axial CT series" in res.output
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("existing", [b"my notes, not a result\n", b""])
def test_predict_study_never_overwrites_a_file_it_did_not_write(tmp_path: Path, existing: bytes) -> None:
    (tmp_path / "notes.txt").write_bytes(existing)
    res = CliRunner().invoke(app, ["predict-study", str(tmp_path), "--bundle", str(tmp_path / "absent.ichdet"),
                                   "--out", str(tmp_path / "notes.txt")])
    assert res.exit_code == 2 and "pass --force to replace it" in res.output  # refused before any work
    assert (tmp_path / "notes.txt").read_bytes() == existing
    res = CliRunner().invoke(app, ["predict-study", str(tmp_path), "--bundle", str(tmp_path / "absent.ichdet"),
                                   "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder" in res.output


PHI = {"PatientName": "Zyxwv^Quortle", "PatientID": "PID-9931-77", "PatientBirthDate": "19310517",
       "AccessionNumber": "ACC-55-KLM", "InstitutionName": "Sankt Quirinus Spital",
       "InstitutionAddress": "Quirinusgasse 17", "InstitutionalDepartmentName": "Neuro-Q Abteilung"}


@pytest.mark.parametrize("include_phi", [False, True])
def test_no_patient_data_in_any_output_unless_asked(study: list[Path], runs: tuple[Path, Path, Path],
                                                    tmp_path: Path, include_phi: bool) -> None:
    folder = tmp_path / "in"
    for i, f in enumerate(study[:6]):
        ds = pydicom.dcmread(f)
        for key, value in PHI.items():
            setattr(ds, key, value)
        (folder / "p").mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / "p" / f"{i}")
    out = tmp_path / "out" / "result.json"
    res = CliRunner().invoke(app, ["predict-study", str(folder), "--run", str(runs[0]), "--device", "cpu",
                                   "--out", str(out), *(["--include-phi"] if include_phi else [])])
    assert res.exit_code == 0, res.output
    texts = [res.output, *(p.read_text() + p.name for p in (tmp_path / "out").rglob("*"))]
    for value in PHI.values():
        assert any(value in t for t in texts) == include_phi, value
    result = json.loads(out.read_text())
    assert ("patient" in result["studies"][0]) == include_phi


def test_study_prediction_equals_batch_prediction(study: list[Path], runs: tuple[Path, Path, Path],
                                                  tmp_path: Path) -> None:
    """The in-memory store gives the model exactly what `preprocess` + `predict` give it."""
    copy_study(study[:8], tmp_path / "in", nested=False)
    preprocess(tmp_path / "in", tmp_path / "cache", None, PreprocessOptions(size=64, workers=1, progress=False))
    batch = ensemble(predict_runs([runs[0]], tmp_path / "cache", tta=True, device="cpu"))
    pred = predict_study(tmp_path / "in", load_ensemble(runs=[runs[0]]), tta=True, device="cpu")
    slices = pred.result["studies"][0]["series"][0]["slices"]
    ours = np.array([[s["probabilities"][k] for k in LABELS] for s in slices])
    assert len(slices) == 8
    np.testing.assert_allclose(ours, batch.loc[[s["sop_instance_uid"] for s in slices]].to_numpy(), atol=2e-6)
    first = pred.slices(STUDY)[0]
    assert first.hu().shape == (512, 512)
    assert tuple(pred.model_input(first, pred.ensemble.members[0]).shape) == (3, 64, 64)


def test_result_json_schema_and_write_timing(study: list[Path], runs: tuple[Path, Path, Path],
                                             tmp_path: Path) -> None:
    copy_study(study[:7], tmp_path / "in")
    ens = load_ensemble(runs=[runs[0], runs[1]], weights={"a": 3.0, "b": 1.0})
    thresholds = dict.fromkeys(LABELS, 0.0) | {"epidural": 1.1}  # every slice called except epidural
    ens = Ensemble(ens.members, thresholds, ens.manifest)
    pred = predict_study(tmp_path / "in", ens, tta=False, device="cpu")
    out = write_result(pred.result, tmp_path / "r.json")
    result = json.loads(out.read_text())
    assert (result["schema"], result["schema_version"], result["labels"]) == ("ichdet-study-result", 1, list(LABELS))
    assert result["settings"] == {"tta": False, "device": "cpu", "min_slices": 5}
    assert [m["name"] for m in result["model"]["members"]] == ["a", "b"]
    assert result["model"]["bundle_sha256"] is None
    assert set(result["timings_s"]) == {"read_headers_and_order", "read_pixels", "inference", "write"}
    assert result["timings_s"]["write"] > 0
    summary = result["studies"][0]["summary"]
    assert summary["called"] == {k: k != "epidural" for k in LABELS} and summary["hemorrhage"] is True
    series_uid = result["studies"][0]["series"][0]["series_instance_uid"]
    slices = result["studies"][0]["series"][0]["slices"]
    assert summary["slice_ranges"]["subdural"] == [
        {"series_instance_uid": series_uid, "first_index": 0, "last_index": 6,
         "first_sop_instance_uid": slices[0]["sop_instance_uid"],
         "last_sop_instance_uid": slices[6]["sop_instance_uid"],
         "first_instance_number": slices[0]["instance_number"], "last_instance_number": slices[6]["instance_number"],
         "first_position_mm": slices[0]["position_mm"], "last_position_mm": slices[6]["position_mm"]}]
    assert summary["slice_ranges"]["epidural"] == []
    probs = np.array([[s["probabilities"][k] for k in LABELS] for s in result["studies"][0]["series"][0]["slices"]])
    assert [summary["probability"][k] for k in LABELS] == probs.max(axis=0).tolist()
