"""DICOM results: readiness checks on real RSNA slices, SR + secondary captures valid (dciodvfy), in the
source study, marked derived and not for diagnosis, no institution unless asked, UIDs stable on rerun."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_ready import (
    PHI,
    dciodvfy_errors,
    make_dicom_ready,
    needs_validators,
    study_files,
    study_result,
    validation_problems,
)

from ichdet.errors import IchdetError
from ichdet.names import LABELS
from ichdet.study.dicom_out import (
    KO_SERIES_NUMBER,
    SC_SERIES_NUMBER,
    SR_SERIES_NUMBER,
    check_dicom_ready,
    label_code,
    patient_orientation,
    write_dicom_results,
)
from ichdet.study.naming import range_name, slice_name

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
    (True, False, r"StudyInstanceUID is not a valid DICOM UID \(anonymised 'ID_\.\.\.' values"),
])
def test_rsna_files_are_refused(raw_files: list[Path], tmp_path: Path, sop_class: bool, uids: bool,
                                match: str) -> None:
    files = make_dicom_ready(raw_files[:1], tmp_path, sop_class=sop_class, uids=uids)
    with pytest.raises(IchdetError, match=match) as err:
        check_dicom_ready(files)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):  # no UID in the message
        assert str(header.get(keyword)) not in str(err.value)


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


@needs_validators
@pytest.mark.parametrize(("probs", "called"), [([0.1, 0.9, 0.6], [(1, 2)]), ([0.9, 0.2, 0.7], [(0, 0), (2, 2)]),
                                               ([0.1, 0.2, 0.05], [])])
def test_results_are_valid_dicom_in_the_source_study(ready_files: list[Path], tmp_path: Path,
                                                     probs: list[float], called: list[tuple[int, int]]) -> None:
    result = study_result(ready_files, probs)
    study = result["studies"][0]
    entries = study["series"][0]["slices"]
    shown = entries[1]["sop_instance_uid"]
    source = read(ready_files[0])
    paths = write_dicom_results(study, result["model"], ready_files, overlays(2), tmp_path / "out",
                                overlay_sources=[shown] * 2)
    assert len(paths) == 4 and all(p.parent == tmp_path / "out" for p in paths)
    for path in paths:
        assert validation_problems(path) == [], path
    *scs, ko, sr = (read(p) for p in paths)
    for ds in (*scs, ko, sr):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription and "DEMO" not in ds.SeriesDescription
        assert (ds.PatientID, str(ds.PatientName)) == (PHI["PatientID"], PHI["PatientName"])  # patient module kept
        assert "InstitutionName" not in ds
        assert Path(paths[0]).name.count(".") > 3 and PHI["PatientID"] not in "".join(p.name for p in paths)
    assert [ds.SeriesNumber for ds in (*scs, ko, sr)] == [SC_SERIES_NUMBER, SC_SERIES_NUMBER, KO_SERIES_NUMBER,
                                                          SR_SERIES_NUMBER]
    assert len({ds.SeriesInstanceUID for ds in scs}) == 1 and [ds.InstanceNumber for ds in scs] == [1, 2]
    shown_name = slice_name(entries[1]["instance_number"], entries[1]["position_mm"])
    for ds, rgb in zip(scs, overlays(2), strict=True):
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "NOT FOR DIAGNOSTIC USE" in ds.ImageComments and shown_name in ds.ImageComments
        np.testing.assert_array_equal(ds.pixel_array, rgb)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == shown
        assert list(ds.PatientOrientation) == ["L", "P"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in ko.ContentSequence
            if i.ValueType == "IMAGE"] == [shown]  # the key image is the slice the captures show
    assert sr.Modality == "SR" and sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    present = max(probs) >= 0.5
    assert sr_findings(sr) == {label: (present, pytest.approx(max(probs))) for label in LABELS}
    ranges = [{"first_instance_number": entries[a]["instance_number"],
               "last_instance_number": entries[b]["instance_number"],
               "first_position_mm": entries[a]["position_mm"], "last_position_mm": entries[b]["position_mm"]}
              for a, b in called]
    expected = f"called on {'; '.join(map(range_name, ranges))}" if called else "not called"
    assert sr_tracking(sr) == {label: f"ichdet {label}: {expected}" for label in LABELS}
    called_sops = sorted(entries[i]["sop_instance_uid"] for a, b in called for i in range(a, b + 1))
    assert sr_sources(sr) == {label: called_sops for label in LABELS}


def _groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(measurements.ContentSequence)


def _label(group: pydicom.Dataset) -> str:
    finding = next(i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121071")
    code = finding.ConceptCodeSequence[0]
    assert code.CodingSchemeDesignator == "SCT"
    return next(lab for lab in LABELS if label_code(lab).value == code.CodeValue)


def sr_findings(sr: pydicom.Dataset) -> dict[str, tuple[bool, float]]:
    """label -> (present, probability) read back from the TID 1500 report: the probability of each label's
    measurement group and the decision in the report's Qualitative Evaluations."""
    probs = {}
    for group in _groups(sr):
        num = next(c for c in group.ContentSequence if c.ValueType == "NUM")
        assert num.ConceptNameCodeSequence[0].CodeValue == "122157"  # DCM Probability
        assert num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "1"
        probs[_label(group)] = float(num.MeasuredValueSequence[0].NumericValue)
    decisions = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    present = {next(lab for lab in LABELS if label_code(lab).value == i.ConceptNameCodeSequence[0].CodeValue):
               {"52101004": True, "272519000": False}[i.ConceptCodeSequence[0].CodeValue]
               for i in decisions.ContentSequence}
    return {label: (present[label], probs[label]) for label in LABELS}


def sr_tracking(sr: pydicom.Dataset) -> dict[str, str]:
    """label -> its measurement group's Tracking Identifier (what a viewer lists)."""
    return {_label(g): next(str(c.TextValue) for c in g.ContentSequence
                            if c.ConceptNameCodeSequence[0].CodeValue == "112039") for g in _groups(sr)}


def sr_sources(sr: pydicom.Dataset) -> dict[str, list[str]]:
    """label -> the SOP Instance UIDs of its group's source images, sorted."""
    return {_label(g): sorted(str(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for c in g.ContentSequence
                              if c.ValueType == "IMAGE") for g in _groups(sr)}


def sr_parameters(sr: pydicom.Dataset) -> dict[str, list[str]]:
    """label -> its group's Algorithm Parameters texts."""
    return {_label(g): [str(c.TextValue) for c in g.ContentSequence
                        if c.ConceptNameCodeSequence[0].CodeValue == "111002"] for g in _groups(sr)}


def test_unanalysed_study_is_refused(ready_files: list[Path], tmp_path: Path) -> None:
    result = study_result(ready_files, [0.1, 0.9, 0.3])
    study = {**result["studies"][0], "summary": {"analysed": False}}
    with pytest.raises(IchdetError, match=r"the study has no analysed series"):
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


BAD = "DOEJOHN1945"  # a malformed value that must reach no output and no message


MALFORMED: list[tuple[str, str | None]] = [
    ("PatientBirthDate", BAD),          # not a date
    ("PatientName", None),              # type 2, absent: highdicom read it and crashed (issue 17 item 14)
    ("PatientSex", "X" + BAD),          # not M/F/O
    ("StudyDate", "2019-01-01"),        # not DICOM's DA form
    ("StudyTime", BAD),
    ("AccessionNumber", None),
    ("ReferringPhysicianName", None),
    ("PatientID", BAD * 7),             # 77 characters: too long for LO
]


def _with_values(files: list[Path], out: Path, values: list[tuple[str, str | None]]) -> list[Path]:
    """Copies of ``files`` in ``out`` with each keyword set to its (malformed) value, or deleted for None."""
    out.mkdir()
    for f in files:
        ds = read(f)
        with warnings.catch_warnings(), pydicom.config.disable_value_validation():
            warnings.simplefilter("ignore")
            for keyword, value in values:
                if value is None:
                    del ds[keyword]
                else:
                    ds[keyword].value = value
            ds.save_as(out / f.name)
    return [out / f.name for f in files]


def _write(files: list[Path], out: Path) -> list[Path]:
    check_dicom_ready(files)  # nothing to refuse: every value is optional or type 2
    result = study_result(files, [0.1, 0.9, 0.3])
    study = result["studies"][0]
    shown = study["series"][0]["slices"][1]["sop_instance_uid"]
    return write_dicom_results(study, result["model"], files, overlays(1), out, overlay_sources=[shown])


@needs_validators
@pytest.mark.parametrize(("keyword", "value"), [*MALFORMED, ("PatientBirthDate", None)])
def test_malformed_or_missing_header_values_are_written_empty(ready_files: list[Path], tmp_path: Path,
                                                              keyword: str, value: str | None) -> None:
    paths = _write(_with_values(ready_files, tmp_path / "in", [(keyword, value)]), tmp_path / "out")
    assert len(paths) == 3
    for path in paths:
        ds = read(path)
        assert keyword in ds and ds[keyword].value in ("", None), path  # type 2: present, empty
        assert BAD.encode() not in path.read_bytes()
        assert dciodvfy_errors(path) == [], path


@needs_validators
def test_every_malformed_value_at_once_passes_both_validators(ready_files: list[Path], tmp_path: Path) -> None:
    paths = _write(_with_values(ready_files, tmp_path / "in", MALFORMED), tmp_path / "out")
    for path in paths:
        assert validation_problems(path) == [], path
        assert all(read(path)[k].value in ("", None) for k, _ in MALFORMED)


def test_synthetic_training_and_operating_points_are_said(ready_files: list[Path], tmp_path: Path) -> None:
    """A result of a bundle that records its training data and operating points (model.training,
    model.operating_points, added by the bundle's provenance): the SR, KOS and captures say so."""
    manifest = {"bundle_sha256": "cd" * 32, "runs": None, "ichdet_version": "0.1.0", "members": [],
                "thresholds_source": "out-of-fold operating points",
                "training": {"synthetic": True, "data": "ichdet synth"},
                "operating_points": {label: {"threshold": 0.5, "auc": 0.71, "sensitivity": 0.95, "specificity": 0.25,
                                             "positives": 4, "warnings": ["only 4 positives"]} for label in LABELS}}
    result = study_result(ready_files, [0.1, 0.9, 0.3], manifest=manifest)
    study = result["studies"][0]
    shown = study["series"][0]["slices"][1]["sop_instance_uid"]
    paths = write_dicom_results(study, result["model"], ready_files, overlays(1), tmp_path / "out",
                                overlay_sources=[shown])
    sc, ko, sr = (read(p) for p in paths)
    for ds in (sc, ko, sr):
        assert ds.SeriesDescription.endswith(" - NOT FOR DIAGNOSTIC USE - DEMO MODEL")
        assert len(ds.SeriesDescription) <= 64
    assert "synthetic" in sc.ImageComments
    for label, params in sr_parameters(sr).items():
        assert "sensitivity 0.950, specificity 0.250" in " ".join(params), label
        assert "warning: only 4 positives" in params
        assert any("synthetic data set only" in p for p in params)
        assert f"bundle sha256 {'cd' * 32}" in params
    description = next(str(i.TextValue) for i in ko.ContentSequence
                       if i.ConceptNameCodeSequence[0].CodeValue == "113012")  # Key Object Description
    assert "synthetic" in description and "NOT FOR DIAGNOSTIC USE" in description


def test_without_provenance_the_parameters_say_unknown(ready_files: list[Path], tmp_path: Path) -> None:
    result = study_result(ready_files, [0.1, 0.9, 0.3])
    paths = write_dicom_results(result["studies"][0], result["model"], ready_files, [], tmp_path / "out")
    sr = read(paths[-1])
    params = sr_parameters(sr)["any"]
    assert "operating point sensitivity unknown, specificity unknown" in params
    assert not any("synthetic" in p for p in params)
    assert "DEMO" not in sr.SeriesDescription
