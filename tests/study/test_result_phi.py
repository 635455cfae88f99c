"""Without --include-phi the result JSON carries no path under the scanned folder (folder names can name
patients) and no free-text header value; with it, both (issue 17 item 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from dicom_ready import make_dicom_ready, study_files, study_result

from ichdet.study.html import ReportFigures, render_report
from ichdet.study.result import opaque_path

NAMED = "x_DOE_JOHN_MRN123"  # sorts after the slices: its copy is the duplicate left out
DESCRIPTION = "HEAD DOE JOHN 5mm"


@pytest.fixture(scope="module")
def files(rsna_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three DICOM-ready slices with a series description, a file that is not DICOM and a duplicate slice,
    both in a folder named after the patient."""
    folder = tmp_path_factory.mktemp("in")
    out = make_dicom_ready(study_files(rsna_sample / "stage_2_train_images", 3), folder)
    for f in out:
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = DESCRIPTION
        ds.save_as(f)
    (folder / NAMED).mkdir()
    (folder / NAMED / "notes").write_text("not DICOM")
    shutil.copy(out[0], folder / NAMED / "again.dcm")  # the same SOP Instance UID twice: a duplicate
    scout = pydicom.dcmread(out[0])
    scout.SeriesInstanceUID = "1.2.3.999"
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999.1"
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.save_as(folder / "scout")
    return out


@pytest.mark.parametrize("include_phi", [False, True])
def test_paths_and_descriptions_only_with_include_phi(files: list[Path], include_phi: bool) -> None:
    result = study_result(files, [0.1, 0.2, 0.3], include_phi=include_phi)
    study = result["studies"][0]
    (skipped,) = result["skipped_files"]
    (duplicate,) = study["series"][0]["duplicates"]
    expected = {"skipped": f"{NAMED}/notes", "duplicate": f"{NAMED}/again.dcm"}
    if not include_phi:
        expected = {k: opaque_path(v) for k, v in expected.items()}
    assert {"skipped": skipped["path"], "duplicate": duplicate["path"]} == expected
    assert study["series"][0]["description"] == (DESCRIPTION if include_phi else None)
    assert study["skipped_series"][0]["description"] == (DESCRIPTION if include_phi else None)
    text = json.dumps(result)
    assert (NAMED in text) == include_phi and ("DOE JOHN" in text) == include_phi


@pytest.mark.parametrize(("a", "b", "same"), [
    ("DOE_JOHN/1.dcm", "DOE_JOHN/1.dcm", True),
    ("DOE_JOHN/1.dcm", "DOE_JOHN/2.dcm", False),
    ("x", "y", False),
])
def test_opaque_path(a: str, b: str, same: bool) -> None:
    assert (opaque_path(a) == opaque_path(b)) == same
    assert opaque_path(a).startswith("file-") and len(opaque_path(a)) == 17 and "DOE" not in opaque_path(a)


def test_report_without_phi_shows_no_description_and_no_none(files: list[Path]) -> None:
    result = study_result(files, [0.1, 0.2, 0.3])
    page = render_report(result, result["studies"][0], ReportFigures())
    assert DESCRIPTION not in page and ">None<" not in page
    assert "<td>-</td><td>1.2.3.999</td>" in page  # the skipped scout: its description left out
