"""DICOM results: readiness checks on real RSNA slices, SR + secondary captures valid (dciodvfy), in the
source study, marked derived and not for diagnosis, no institution unless asked, UIDs stable on rerun."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_ready import PHI, dciodvfy_errors, make_dicom_ready, study_files, study_result

from ichdet.errors import IchdetError
from ichdet.names import LABELS
from ichdet.study.dicom_out import (
    SC_SERIES_NUMBER,
    SR_SERIES_NUMBER,
    check_dicom_ready,
    label_code,
    patient_orientation,
    write_dicom_results,
)

N_SLICES = 3


@pytest.fixture(scope="module")
def raw_files(rsna_sample: Path) -> list[Path]:
    return study_files(rsna_sample / "stage_2_train_images", N_SLICES)


@pytest.fixture(scope="module")
def ready_files(raw_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_dicom_ready(raw_files, tmp_path_factory.mktemp("ready"))


def overlays(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(n)]


def read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


@pytest.mark.parametrize(("sop_class", "uids", "match"), [
    (False, False, r"no SOP Class UID \(0008,0016\).*run without --dicom-out"),
    (False, True, r"no SOP Class UID"),
    (True, False, r"StudyInstanceUID 'ID_[0-9a-f]+' is not a valid DICOM UID"),
])
def test_rsna_files_are_refused(raw_files: list[Path], tmp_path: Path, sop_class: bool, uids: bool,
                                match: str) -> None:
    files = make_dicom_ready(raw_files[:1], tmp_path, sop_class=sop_class, uids=uids)
    with pytest.raises(IchdetError, match=match):
        check_dicom_ready(files)


def test_raw_rsna_file_is_refused_by_name(raw_files: list[Path]) -> None:
    with pytest.raises(IchdetError, match=rf"^{raw_files[0]}: no SOP Class UID"):
        check_dicom_ready(raw_files)


def test_two_studies_and_nothing_are_refused(ready_files: list[Path], rsna_sample: Path, tmp_path: Path) -> None:
    other = sorted((rsna_sample / "stage_2_test_images").glob("*.dcm"))[:1]
    with pytest.raises(IchdetError, match="belong to 2 studies"):
        check_dicom_ready([*ready_files, *make_dicom_ready(other, tmp_path)])
    with pytest.raises(IchdetError, match="no source slice"):
        check_dicom_ready([])
    with pytest.raises(IchdetError, match=r"gone: cannot read it as DICOM"):
        check_dicom_ready([*ready_files, tmp_path / "gone"])
    (tmp_path / "text").write_text("not dicom")
    with pytest.raises(IchdetError, match=r"text: cannot read it as DICOM"):
        check_dicom_ready([tmp_path / "text"])
    check_dicom_ready(ready_files)  # ready: no error


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
@pytest.mark.parametrize(("probs", "expected_slices"), [([0.1, 0.9, 0.6], "1-2"), ([0.9, 0.2, 0.7], "0, 2"),
                                                       ([0.1, 0.2, 0.05], "")])
def test_results_are_valid_dicom_in_the_source_study(ready_files: list[Path], tmp_path: Path,
                                                     probs: list[float], expected_slices: str) -> None:
    result = study_result(ready_files, probs)
    study, shown = result["studies"][0], result["studies"][0]["series"][0]["slices"][1]["sop_instance_uid"]
    source = read(ready_files[0])
    paths = write_dicom_results(study, result["model"], ready_files, overlays(2), tmp_path / "out",
                                overlay_sources=[shown] * 2)
    assert len(paths) == 3 and all(p.parent == tmp_path / "out" for p in paths)
    for path in paths:
        assert dciodvfy_errors(path) == [], path
    *scs, sr_path = (read(p) for p in paths)
    for ds in (*scs, sr_path):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
        assert (ds.PatientID, str(ds.PatientName)) == (PHI["PatientID"], PHI["PatientName"])  # patient module kept
        assert "InstitutionName" not in ds
        assert Path(paths[0]).name.count(".") > 3 and PHI["PatientID"] not in "".join(p.name for p in paths)
    assert [ds.SeriesNumber for ds in (*scs, sr_path)] == [SC_SERIES_NUMBER, SC_SERIES_NUMBER, SR_SERIES_NUMBER]
    assert len({ds.SeriesInstanceUID for ds in scs}) == 1 and [ds.InstanceNumber for ds in scs] == [1, 2]
    for ds, rgb in zip(scs, overlays(2), strict=True):
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "NOT FOR DIAGNOSTIC USE" in ds.ImageComments
        np.testing.assert_array_equal(ds.pixel_array, rgb)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == shown
        assert list(ds.PatientOrientation) == ["L", "P"]
    assert sr_path.Modality == "SR" and sr_path.CompletionFlag == "COMPLETE"
    assert sr_findings(sr_path) == {label: (max(probs) >= 0.5, pytest.approx(max(probs))) for label in LABELS}
    assert sr_slices(sr_path) == ({label: expected_slices for label in LABELS} if max(probs) >= 0.5 else {})


def sr_findings(sr: pydicom.Dataset) -> dict[str, tuple[bool, float]]:
    """label -> (present, probability) read back from the SR's Findings container."""
    findings = next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121070")
    out = {}
    for item in findings.ContentSequence:
        code = item.ConceptNameCodeSequence[0]
        label = next(lab for lab in LABELS if label_code(lab).value == code.CodeValue)
        present = item.ConceptCodeSequence[0].CodeValue == "121053"
        num = next(c for c in item.ContentSequence if c.ValueType == "NUM")
        out[label] = (present, float(num.MeasuredValueSequence[0].NumericValue))
    return out


def sr_slices(sr: pydicom.Dataset) -> dict[str, str]:
    """label -> the "Slices where called" text of the SR's findings (labels without one left out)."""
    findings = next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121070")
    out = {}
    for item in findings.ContentSequence:
        label = next(lab for lab in LABELS if label_code(lab).value == item.ConceptNameCodeSequence[0].CodeValue)
        for child in item.ContentSequence:
            if child.ValueType == "TEXT":
                out[label] = str(child.TextValue)
    return out


def test_unanalysed_study_is_refused(ready_files: list[Path], tmp_path: Path) -> None:
    result = study_result(ready_files, [0.1, 0.9, 0.3])
    study = {**result["studies"][0], "summary": {"analysed": False}}
    with pytest.raises(IchdetError, match=r"no series was analysed"):
        write_dicom_results(study, result["model"], ready_files, overlays(1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


#: The planted values DICOM requires in the results: the patient module and the study module's type-2 elements.
REQUIRED_PHI = ["AccessionNumber", "PatientBirthDate", "PatientID", "PatientName", "ReferringPhysicianName"]


@pytest.mark.parametrize(("include_phi", "expected"), [
    (False, REQUIRED_PHI),
    (True, sorted([*REQUIRED_PHI, "InstitutionName"])),
])
def test_identifying_values_in_the_results(ready_files: list[Path], tmp_path: Path, include_phi: bool,
                                           expected: list[str]) -> None:
    result = study_result(ready_files, [0.1, 0.9, 0.3])
    paths = write_dicom_results(result["studies"][0], result["model"], ready_files, overlays(1), tmp_path,
                                include_phi=include_phi)
    for path in paths:  # the raw bytes, nested sequences included
        raw = path.read_bytes()
        assert sorted(k for k, v in PHI.items() if v.encode() in raw) == expected, path
        assert not any(v.split("^")[0] in path.name for v in PHI.values())


def test_reruns_replace(ready_files: list[Path], tmp_path: Path) -> None:
    result = study_result(ready_files, [0.1, 0.9, 0.3])
    study, model = result["studies"][0], result["model"]
    first = write_dicom_results(study, model, ready_files, overlays(1), tmp_path / "a", include_phi=True)
    again = write_dicom_results(study, model, ready_files, overlays(1), tmp_path / "b", include_phi=True)
    assert [p.name for p in first] == [p.name for p in again]  # same result, same objects
    other = study_result(ready_files, [0.1, 0.2, 0.3])
    changed = write_dicom_results(other["studies"][0], other["model"], ready_files, overlays(1), tmp_path / "c")
    assert not {p.name for p in changed} & {p.name for p in first}  # another result: new objects


def test_a_study_that_gained_instances_gets_a_new_result_series(ready_files: list[Path], tmp_path: Path) -> None:
    # the same summary (max 0.9 on the second slice) over two slices, then over the three the study now has
    (tmp_path / "early").mkdir()
    early_files = [Path(shutil.copy(f, tmp_path / "early")) for f in ready_files[:2]]
    early, full = study_result(early_files, [0.1, 0.9]), study_result(ready_files, [0.1, 0.9, 0.3])
    assert early["studies"][0]["summary"] == full["studies"][0]["summary"]
    before = write_dicom_results(early["studies"][0], early["model"], early_files, overlays(1), tmp_path / "a")
    after = write_dicom_results(full["studies"][0], full["model"], ready_files, overlays(1), tmp_path / "b")
    assert not {p.name for p in after} & {p.name for p in before}
    assert read(after[-1]).SeriesInstanceUID != read(before[-1]).SeriesInstanceUID


def test_overlay_sources_must_match(ready_files: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 overlays but 1 sources"):
        result = study_result(ready_files, [0.1, 0.2, 0.3])
        write_dicom_results(result["studies"][0], result["model"], ready_files, overlays(2), tmp_path,
                            overlay_sources=["1.2.3"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("cosines", "expected"), [
    ([1, 0, 0, 0, 1, 0], ("L", "P")),                       # plain axial
    ([1, 0, 0, 0, 0.968148, -0.25038], ("L", "P")),         # a tilted gantry (an RSNA slice's values)
    ([-1, 0, 0, 0, -1, 0], ("R", "A")),
    ([0, 1, 0, 0, 0, -1], ("P", "F")),                      # sagittal
    (None, ("L", "P")),                                     # no orientation: axial assumed
])
def test_patient_orientation(cosines: list[float] | None, expected: tuple[str, str]) -> None:
    ds = pydicom.Dataset()
    if cosines is not None:
        ds.ImageOrientationPatient = cosines
    assert patient_orientation(ds) == expected
