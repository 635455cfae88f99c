"""Test helpers: real RSNA slices made DICOM-ready (valid UIDs, SOP class, type-2 elements, planted
identifying values) and a study result for them (made by the study pipeline's own functions)."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, generate_uid

from ichdet.infer.bundle import Ensemble
from ichdet.names import LABELS
from ichdet.study.result import build_result
from ichdet.study.scan import StudySlice, scan_folder

#: Known identifying values planted in every identifying tag; no output without include_phi may hold them.
PHI = {
    "PatientName": "Plantedname^Jane",
    "PatientID": "PLANTEDPID4711",
    "PatientBirthDate": "19230405",
    "AccessionNumber": "PLANTEDACC0815",
    "InstitutionName": "Planted General Hospital",
    "ReferringPhysicianName": "Plantedreferrer^Joe",
}

#: The type-2 elements of the CT image IOD the RSNA files lack (empty or not there), with values.
TYPE2 = {"PatientSex": "O", "StudyDate": "20190101", "StudyTime": "120000", "StudyID": "1",
         "SeriesNumber": 2, "Manufacturer": "RSNA sample", "Laterality": None}


def study_files(folder: Path, n_slices: int) -> list[Path]:
    """The first ``n_slices`` files (by name) of the study of the first file in ``folder``."""
    files = sorted(folder.glob("*.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        same = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID == first]
    return same[:n_slices]


def _valid_uid(value: str) -> str:
    """One valid UID per ``ID_...`` value (the same value always maps to the same UID)."""
    return generate_uid(entropy_srcs=[value])


def make_dicom_ready(files: list[Path], out: Path, *, sop_class: bool = True, uids: bool = True) -> list[Path]:
    """Copies of ``files`` in ``out`` with valid UIDs, the CT Image Storage class, the type-2 elements and PHI."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, path in enumerate(files):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            if uids:
                for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                    setattr(ds, keyword, _valid_uid(str(getattr(ds, keyword))))
            if sop_class:
                ds.SOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            for keyword, value in {**PHI, **TYPE2}.items():
                if value is not None:
                    setattr(ds, keyword, value)
            ds.InstanceNumber = k + 1
            target = out / f"slice{k:03d}"
            ds.save_as(target)
        written.append(target)
    return written


def study_result(files: list[Path], probs: list[float] | list[list[float]], threshold: float | dict[str, float] = 0.5,
                 include_phi: bool = False, manifest: dict | None = None) -> dict:
    """The result ``predict_study`` writes (docs/study-result.md) for DICOM-ready ``files``, the only files of
    their folder: made by ichdet.study.scan.scan_folder and ichdet.study.result.build_result, as predict_study
    makes it. ``probs[i]`` is the i-th slice's (in slice order) probability of every label, or its 6
    probabilities in LABELS order; ``threshold`` one for every label or one per label."""
    scan = scan_folder(files[0].parent, min_slices=1)
    (study,) = scan.studies
    (series,) = study.selected
    slices = [StudySlice(study.study_uid, series.series_uid, i, ref.sop_uid, ref.path, ref.position_mm, i,
                         ref.instance_number) for i, ref in enumerate(series.slices)]
    thresholds = threshold if isinstance(threshold, dict) else dict.fromkeys(LABELS, threshold)
    manifest = manifest or {"bundle_sha256": "ab" * 32, "runs": None, "ichdet_version": "0.1.0", "members": [],
                            "operating_points": None, "thresholds_source": f"test threshold {threshold}"}
    ensemble = Ensemble((), thresholds, manifest)
    table = np.asarray(probs, np.float64)
    if table.ndim == 1:
        table = np.repeat(table[:, None], len(LABELS), axis=1)
    return build_result(scan, slices, table, ensemble, {"read_headers_and_order": 0.1, "read_pixels": 0.1,
                                                        "inference": 0.2}, {"tta": False, "device": "cpu",
                                                                            "min_slices": 1}, include_phi)


PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
#: Debian's Java limits XPath expressions below what pixelmed's compiled templates need (issue 18).
JAVA_XPATH = "-Djdk.xml.xpathExprOpLimit=0 -Djdk.xml.xpathExprGrpLimit=0 -Djdk.xml.xpathTotalOpLimit=0"
VALIDATORS_MISSING = ("dciodvfy (Debian dicom3tools) not installed" if shutil.which("dciodvfy") is None else
                      "pixelmed's DicomSRValidator (Debian pixelmed-apps) not installed"
                      if shutil.which("java") is None or not PIXELMED_JAR.is_file() else None)
needs_validators = pytest.mark.skipif(VALIDATORS_MISSING is not None, reason=VALIDATORS_MISSING or "")


def sr_validator_problems(path: Path) -> list[str]:
    """pixelmed's DicomSRValidator on an SR or KOS: its errors and every content item "not in template"."""
    proc = subprocess.run(["java", *JAVA_XPATH.split(), "-cp", str(PIXELMED_JAR),
                           "com.pixelmed.validate.DicomSRValidator", str(path)],
                          capture_output=True, text=True, check=False, timeout=300)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert any("Root Template Validation Complete" in line for line in lines), lines[-20:]
    return [line for line in lines if line.startswith("Error") or "not in template" in line]


def validation_problems(path: Path) -> list[str]:
    """Every problem the validators find in one DICOM object ichdet wrote: dciodvfy's errors, and for an
    SR or a Key Object Selection pixelmed's DicomSRValidator errors and content items not in the template."""
    problems = dciodvfy_errors(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modality = str(pydicom.dcmread(path, stop_before_pixels=True).Modality)
    if modality in ("SR", "KO"):
        problems += sr_validator_problems(path)
    return problems


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy``'s report on ``path`` that are errors (warnings are allowed)."""
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy is not None
    proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
