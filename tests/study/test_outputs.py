"""`ichdet report` and `ichdet predict-study --dicom-out` end to end on real RSNA studies with a tiny trained
bundle: the HTML report rendered in headless Chromium, the DICOM results passing dciodvfy and pixelmed's SR
validator in the source study, the refusal of RSNA-style ``ID_...`` UIDs before anything is written, and no
patient data leaks."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pydicom
import pytest
from dicom_ready import PHI, make_dicom_ready, needs_validators, validation_problems
from study_support import copy_study, study_files, tiny_runs
from test_html import CHROMIUM, PROBE, chromium, data_uri_images
from typer.testing import CliRunner

from ichdet.cli import app
from ichdet.infer.bundle import load_ensemble, write_bundle
from ichdet.names import LABELS
from ichdet.study.dicom_out import SC_SERIES_NUMBER, SR_SERIES_NUMBER, label_code
from ichdet.study.html import NOT_FOR_DIAGNOSIS, REPORT_WINDOWS
from ichdet.study.outputs import cam_members

N_SLICES = 12
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium (Debian package chromium) not installed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return tiny_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(runs: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run ``a`` (resnet18, 64 px, 2 folds) as a bundle."""
    return write_bundle([runs[0]], tmp_path_factory.mktemp("bundle") / "model.ichdet")


def _read(path: Path, pixels: bool = False) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=not pixels)


def _first_slices(rsna_sample: Path, study_uid: str) -> list[Path]:
    """The first N_SLICES files of a real study, in slice order (a contiguous stack)."""
    files = study_files(rsna_sample / "stage_2_train_images", study_uid)
    return sorted(files, key=lambda f: float(_read(f).ImagePositionPatient[2]))[:N_SLICES]


@pytest.fixture(scope="module")
def raw_export(rsna_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real RSNA studies as they are (``ID_...`` UIDs, no SOP class), nested under opaque names."""
    root = tmp_path_factory.mktemp("raw")
    for k, uid in enumerate(_available_studies(rsna_sample)):
        copy_study(_first_slices(rsna_sample, uid), root / f"s{k}")
    return root


def _available_studies(rsna_sample: Path) -> list[str]:
    """Two study UIDs of the sample, sorted (the first two found)."""
    uids = sorted({str(_read(f).StudyInstanceUID) for f in (rsna_sample / "stage_2_train_images").glob("*.dcm")})
    return uids[:2]


@pytest.fixture(scope="module")
def ready_study(rsna_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real study made DICOM-ready (valid UIDs, SOP class, type-2 elements) with planted PHI."""
    folder = tmp_path_factory.mktemp("ready")
    make_dicom_ready(_first_slices(rsna_sample, _available_studies(rsna_sample)[0]), folder)
    return folder


def _invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, [*args, "--device", "cpu", "--no-tta"])
    return res.exit_code, res.output


def test_cam_members_share_the_first_2d_members_input(runs: tuple[Path, Path, Path]) -> None:
    a, b, _ = runs  # b: 48 px, 2.5D, one window: another input than a
    assert [m.name for m in cam_members(load_ensemble(runs=[a, b]))] == ["a"]
    assert [m.name for m in cam_members(load_ensemble(runs=[b, a]))] == ["b"]
    assert [m.name for m in cam_members(load_ensemble(runs=[a]))] == ["a"]


@needs_chromium
def test_report_of_two_real_studies_renders_in_chromium(raw_export: Path, bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    code, output = _invoke("report", str(raw_export), "--bundle", str(bundle), "--out", str(out))
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-1.html", "report-2.html", "report.html"]
    index = out.read_text()
    assert re.findall(r'href="([^"]+)"', index) == ["report-1.html", "report-2.html"]
    for page in (tmp_path / "report-1.html", tmp_path / "report-2.html"):
        html = page.read_text()
        assert NOT_FOR_DIAGNOSIS in html and not re.search(r'(?:src|href)="(?:https?:)?//', html)
        assert len(data_uri_images(html)) == 3 * len(REPORT_WINDOWS)  # 3 top slices x the windows
        polylines = re.findall(r'<polyline class="series" data-label="(\w+)"[^>]*points="([^"]+)"', html)
        assert [(label, len(points.split())) for label, points in polylines] == [(lab, N_SLICES) for lab in LABELS]
        probe = tmp_path / f"probe-{page.name}"
        probe.write_text(html.replace("</body>", PROBE + "</body>"))
        dom = chromium(["--window-size=1366,900", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                       tmp_path)
        found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout)
        assert found, dom.stderr[-2000:]
        shown = json.loads(found.group(1).replace("&quot;", '"'))
        assert len(shown["imgs"]) == 3 * len(REPORT_WINDOWS)
        for img in shown["imgs"]:
            assert img["w"] == 512 and img["shown"] > 200 and img["hi"] - img["lo"] > 100  # decoded, not blank
        assert shown["chart"][0] > 800 and shown["scroll"] <= 1366


def test_report_on_ready_study_has_no_patient_data(ready_study: Path, bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "r" / "report.html"
    code, output = _invoke("report", str(ready_study), "--bundle", str(bundle), "--out", str(out), "--top-k", "1")
    assert code == 0, output
    texts = [output, out.read_text()]
    for value in PHI.values():
        assert not any(v in t for t in texts for v in {value, value.split("^")[0]}), value
    assert len(data_uri_images(out.read_text())) == len(REPORT_WINDOWS)
    code, output = _invoke("report", str(ready_study), "--bundle", str(bundle), "--out", str(out), "--top-k", "1",
                           "--include-phi")
    assert code == 0 and PHI["PatientID"] in out.read_text()


def _sr_probabilities(sr: pydicom.Dataset) -> dict[str, float]:
    """label -> probability of the TID 1500 report's measurement group of the label's finding."""
    measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    out = {}
    for group in measurements.ContentSequence:
        finding = next(i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121071")
        label = next(lab for lab in LABELS if label_code(lab).value == finding.ConceptCodeSequence[0].CodeValue)
        num = next(c for c in group.ContentSequence if c.ValueType == "NUM")
        out[label] = float(num.MeasuredValueSequence[0].NumericValue)
    return out


@needs_validators
def test_predict_study_dicom_out_is_valid_dicom_in_the_source_study(ready_study: Path, bundle: Path,
                                                                    tmp_path: Path) -> None:
    code, output = _invoke("predict-study", str(ready_study), "--bundle", str(bundle), "--out",
                           str(tmp_path / "result.json"), "--dicom-out", str(tmp_path / "dicom"))
    assert code == 0, output
    result = json.loads((tmp_path / "result.json").read_text())
    (study,) = result["studies"]
    source = {str(_read(f).SOPInstanceUID): _read(f) for f in ready_study.iterdir()}
    first = next(iter(source.values()))
    objects = [(p, _read(p, pixels=True)) for p in sorted((tmp_path / "dicom").iterdir())]
    assert sorted(str(ds.Modality) for _, ds in objects) == ["KO", "OT", "OT", "OT", "SR"]
    for path, ds in objects:
        assert validation_problems(path) == [], path
        assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.SeriesInstanceUID != first.SeriesInstanceUID
        assert path.name == f"{ds.SOPInstanceUID}.dcm" and "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
        assert "InstitutionName" not in ds and PHI["InstitutionName"].encode() not in path.read_bytes()
    scs = [ds for _, ds in objects if ds.Modality == "OT"]
    sr = next(ds for _, ds in objects if ds.Modality == "SR")
    slices = [s for series in study["series"] for s in series["slices"]]
    top = sorted(slices, key=lambda s: -s["probabilities"]["any"])[:3]
    scs.sort(key=lambda ds: int(ds.InstanceNumber))
    shown = [str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in scs]
    assert shown == [s["sop_instance_uid"] for s in top]
    ko = next(ds for _, ds in objects if ds.Modality == "KO")
    assert [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in ko.ContentSequence
            if i.ValueType == "IMAGE"] == shown  # the key images are the slices the captures show
    assert {ds.SeriesNumber for ds in scs} == {SC_SERIES_NUMBER} and sr.SeriesNumber == SR_SERIES_NUMBER
    assert _sr_probabilities(sr) == {k: pytest.approx(v, abs=1e-6) for k, v in study["summary"]["probability"].items()}
    assert all(str(ds.SOPInstanceUID) not in source for _, ds in objects)

    # the report of the same study writes the same objects (same result, same UIDs: a PACS replaces, not adds)
    code, output = _invoke("report", str(ready_study), "--bundle", str(bundle), "--out", str(tmp_path / "r.html"),
                           "--dicom-out", str(tmp_path / "again"))
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [p.name for p, _ in objects]


# an earlier output of the command's own kind (which a rerun may replace)
@pytest.mark.parametrize(("command", "out_name", "earlier"), [
    ("predict-study", "result.json", '{"schema": "an earlier output"}'),
    ("report", "report.html", "<!DOCTYPE html> an earlier output"),
])
@pytest.mark.parametrize(("prepare", "match"), [
    ("raw", r"no SOP Class UID \(0008,0016\).*run without --dicom-out"),
    ("ids", r"StudyInstanceUID is not a valid DICOM UID.*run without --dicom-out"),
])
def test_dicom_out_refuses_rsna_uids_before_writing(raw_export: Path, bundle: Path, tmp_path: Path, command: str,
                                                    out_name: str, earlier: str, prepare: str, match: str) -> None:
    folder = raw_export
    if prepare == "ids":  # the SOP class given, the anonymised ID_ UIDs left
        folder = tmp_path / "in"
        make_dicom_ready(sorted(p for p in raw_export.rglob("*") if p.is_file())[:6], folder, uids=False)
    out = tmp_path / out_name
    out.write_text(earlier)
    code, output = _invoke(command, str(folder), "--bundle", str(bundle), "--out", str(out),
                           "--dicom-out", str(tmp_path / "dicom"))
    assert code == 2 and re.search(match, output.replace("\n", " ")), output
    assert out.read_text() == earlier and not (tmp_path / "dicom").exists()
    code, output = _invoke(command, str(raw_export), "--bundle", str(bundle), "--out", str(out))
    assert code == 0, output  # without --dicom-out the same files are analysed as they are


@pytest.mark.parametrize(("command", "out_name"), [("predict-study", "result.json"), ("report", "report.html")])
def test_dicom_out_that_is_a_file_is_refused(ready_study: Path, bundle: Path, tmp_path: Path, command: str,
                                             out_name: str) -> None:
    (tmp_path / "dicom").write_text("a file")
    code, output = _invoke(command, str(ready_study), "--bundle", str(bundle), "--out", str(tmp_path / out_name),
                           "--dicom-out", str(tmp_path / "dicom"))
    assert code == 2 and f"--dicom-out {tmp_path / 'dicom'} is a file; give a folder" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicom"] and (tmp_path / "dicom").read_text() == "a file"


# `report` of two studies writes report-1.html and report-2.html next to --out: each page is checked as
# --out is, before any work
@pytest.mark.parametrize(("existing", "force", "refused"), [
    ("<p>my notes</p>", False, True),  # a file ichdet did not write: refused, named, left as it was
    ("<!DOCTYPE html> an earlier page", False, False),  # a page ichdet wrote earlier: replaced
    ("<p>my notes</p>", True, False),  # --force replaces it
])
def test_report_study_pages_are_checked_like_out(raw_export: Path, bundle: Path, tmp_path: Path, existing: str,
                                                 force: bool, refused: bool) -> None:
    page = tmp_path / "report-2.html"
    page.write_text(existing)
    code, output = _invoke("report", str(raw_export), "--bundle", str(bundle), "--out", str(tmp_path / "report.html"),
                           *(["--force"] if force else []))
    if refused:
        assert code == 2, output
        assert f"{page} (where a study page of --out report.html goes" in output and "pass --force" in output
        assert [p.name for p in tmp_path.iterdir()] == ["report-2.html"] and page.read_text() == existing
        return
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-1.html", "report-2.html", "report.html"]
    assert page.read_text().startswith("<!DOCTYPE html><html") and NOT_FOR_DIAGNOSIS in page.read_text()


@pytest.mark.parametrize("command", ["report", "predict-study"])
def test_dicom_out_without_patient_name_and_with_a_bad_birth_date(ready_study: Path, bundle: Path, tmp_path: Path,
                                                                  command: str) -> None:
    """Type-2 values highdicom reads, missing or malformed, are written empty: the command succeeds (it
    crashed after writing the HTML and three images, issue 17 items 9 and 14) and no message quotes them."""
    folder = tmp_path / "in"
    folder.mkdir()
    for f in ready_study.iterdir():
        ds = _read(f, pixels=True)
        del ds.PatientName
        with warnings.catch_warnings(), pydicom.config.disable_value_validation():
            warnings.simplefilter("ignore")
            ds["PatientBirthDate"].value = "DOEJOHN1945"
            ds.save_as(folder / f.name)
    out = tmp_path / ("report.html" if command == "report" else "result.json")
    code, output = _invoke(command, str(folder), "--bundle", str(bundle), "--out", str(out),
                           "--dicom-out", str(tmp_path / "dicom"), *(["--top-k", "1"] if command == "report" else []))
    assert code == 0, output
    assert "DOEJOHN1945" not in output and "Traceback" not in output
    objects = [_read(p) for p in (tmp_path / "dicom").iterdir()]
    captures = ["OT"] * (1 if command == "report" else 3)
    assert sorted(str(ds.Modality) for ds in objects) == sorted(["SR", "KO", *captures])
    for ds in objects:
        assert ds.PatientName == "" and ds.PatientBirthDate == ""
