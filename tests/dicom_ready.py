"""Test helpers: real RSNA slices made DICOM-ready (valid UIDs, SOP class, type-2 elements, planted
identifying values) and a study result for them."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, generate_uid

from ichdet.labels import LABELS

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


def study_result(files: list[Path], probs: list[float]) -> dict:
    """A study result (the shape predict_study writes) for DICOM-ready ``files``: ``probs`` for every label."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    slices = [{"sop_uid": str(h.SOPInstanceUID), "probabilities": {label: p for label in LABELS}}
              for h, p in zip(headers, probs, strict=True)]
    top = max(probs)
    return {
        "study_uid": str(headers[0].StudyInstanceUID),
        "series": [{"series_uid": str(headers[0].SeriesInstanceUID), "slices": slices}],
        "summary": {"probabilities": {label: top for label in LABELS},
                    "ranges": {label: [[1, 2]] if top >= 0.5 else [] for label in LABELS},
                    "decision": {label: top >= 0.5 for label in LABELS}},
        "skipped": [{"series_uid": "1.2.3.999", "reason": "scout/localizer (ImageType LOCALIZER)"}],
        "manifest": {"ichdet_version": "0.1.0", "bundle_sha256": "ab" * 32},
        "timings": {"read_s": 0.1, "infer_s": 0.2},
    }


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy``'s report on ``path`` that are errors (warnings are allowed)."""
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy is not None
    proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
