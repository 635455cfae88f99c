"""DICOM results in the source study (highdicom): a Comprehensive SR of the study-level findings and a
secondary-capture series of the Grad-CAM overlay images.

Both are new series of the source study (its Study Instance UID, patient and study modules copied from
the source slices, as DICOM requires so that a PACS files them next to the scan), marked DERIVED and
"not for diagnostic use" in the series description and the image comments.

The SR's content tree (codes from DICOM (DCM), LOINC (LN) and SNOMED CT (SCT) as pydicom lists them;
the five subtypes, which have no code there, under the private scheme ``99ICHDET``)::

    CONTAINER  LN 18748-4 "Diagnostic Imaging Report"
      CONTAINS TEXT  DCM 121106 "Comment"            = not for diagnostic use
      CONTAINS TEXT  DCM 111001 "Algorithm Name"     = ichdet
      CONTAINS TEXT  DCM 111003 "Algorithm Version"  = the model's ichdet version (+ bundle hash when known)
      CONTAINS CONTAINER DCM 121070 "Findings"
        CONTAINS CODE <label>  = DCM 121053 "Present" | DCM 121054 "Absent"   (the decision)
          HAS PROPERTIES NUM  DCM 122157 "Probability" (UCUM "1", no units)
          HAS PROPERTIES TEXT 99ICHDET slices "Slices where called"           (when any)

It reads the study result of ``ichdet predict-study`` (docs/study-result.md, schema version 1): one
entry of ``studies`` and the result's ``model``.

Instance UIDs are derived from the study UID and the result (``pydicom.uid.generate_uid`` with entropy
sources), so rerunning on the same result rewrites the same objects instead of adding copies to the PACS.
File names are the new SOP Instance UIDs: no patient value ever reaches a file name.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid

import ichdet
from ichdet.errors import IchdetError
from ichdet.io import atomic_path
from ichdet.names import LABELS
from ichdet.study.html import NOT_FOR_DIAGNOSIS

__all__ = ["SC_SERIES_NUMBER", "SR_SERIES_NUMBER", "check_dicom_ready", "label_code", "patient_orientation",
           "sr_content", "write_dicom_results"]

SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
MANUFACTURER = "ichdet"
_UID_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_PRIVATE = "99ICHDET"
_Item = TypeVar("_Item", bound=hd.sr.ContentItem)


def label_code(label: str) -> hd.sr.CodedConcept:
    """The coded concept of one label: SNOMED CT "Intracranial hemorrhage" for ``any``, private otherwise."""
    if label == "any":
        return hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage")
    return hd.sr.CodedConcept(label, _PRIVATE, f"{label.capitalize()} hemorrhage")


@contextmanager
def _quiet_reading() -> Iterator[None]:
    """pydicom without its per-value warnings (an ``ID_...`` UID is reported by check_dicom_ready)."""
    with warnings.catch_warnings(), pydicom.config.disable_value_validation():
        warnings.filterwarnings("ignore", message=r"Invalid value for VR UI", category=UserWarning)
        yield


def _read_header(path: Path) -> Dataset:
    try:
        with _quiet_reading():
            return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError) as err:
        raise IchdetError(f"{path}: cannot read it as DICOM ({err}); DICOM results refer to the analysed "
                          "slices, which must still be where predict-study found them") from None


def _check_header(ds: Dataset, path: Path) -> None:
    if not str(ds.get("SOPClassUID", "")).strip():
        raise IchdetError(
            f"{path}: no SOP Class UID (0008,0016), which DICOM results must refer to (the RSNA challenge "
            "files lack it); run without --dicom-out, or give the series its SOP Class UID first")
    for keyword in _UID_FIELDS:
        value = str(ds.get(keyword, ""))
        if not UID(value).is_valid:
            raise IchdetError(
                f"{path}: {keyword} {value!r} is not a valid DICOM UID (anonymised 'ID_...' values, as in "
                "the RSNA challenge files, cannot be referred to); run without --dicom-out, or give the "
                "study valid UIDs first")


def _ready_headers(source_files: Sequence[Path]) -> list[Dataset]:
    """The source headers, checked as :func:`check_dicom_ready` describes."""
    if not source_files:
        raise IchdetError("DICOM results: no source slice given; they refer to the analysed series")
    headers = []
    with _quiet_reading():  # pydicom converts values when first read, here: its UI warning would precede the refusal
        for path in map(Path, source_files):
            headers.append(_read_header(path))
            _check_header(headers[-1], path)
        studies = {str(ds.StudyInstanceUID) for ds in headers}
    if len(studies) > 1:
        raise IchdetError(f"DICOM results: the source slices belong to {len(studies)} studies; write the "
                          "results of one study at a time")
    return headers


def check_dicom_ready(source_files: Sequence[Path]) -> None:
    """Raise IchdetError naming the file and the fix unless every source slice can be referred to.

    DICOM results need, in every source file, a SOP Class UID and valid Study, Series and SOP Instance
    UIDs, all files of one study. Reads headers only.
    """
    _ready_headers(source_files)


def _ranges_text(ranges: Sequence[Mapping[str, Any]], several_series: bool) -> str:
    """``summary.slice_ranges[label]`` as text: index ranges in slice order (with the series when several)."""
    parts = []
    for r in ranges:
        a, b = r["first_index"], r["last_index"]
        span = f"{a}-{b}" if a != b else f"{a}"
        parts.append(f"{r['series_instance_uid']}: {span}" if several_series else span)
    return ", ".join(parts)


def _with_children(item: _Item, children: Sequence[hd.sr.ContentItem]) -> _Item:
    """``item`` with ``children`` as its content sequence (highdicom's constructors take none)."""
    item.ContentSequence = hd.sr.ContentSequence(children)
    return item


def _finding(label: str, probability: float, called: bool, ranges: str) -> hd.sr.CodeContentItem:
    props: list[hd.sr.ContentItem] = [hd.sr.NumContentItem(
        name=codes.DCM.Probability, value=round(float(probability), 6), unit=codes.UCUM.NoUnits,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES)]
    if ranges:
        props.append(hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("slices", _PRIVATE, "Slices where called"), value=ranges,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES))
    return _with_children(hd.sr.CodeContentItem(
        name=label_code(label), value=codes.DCM.Present if called else codes.DCM.Absent,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS), props)


def _text(name: hd.sr.CodedConcept | Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _version(model: Mapping[str, Any]) -> str:
    version = str(model.get("ichdet_version") or ichdet.__version__)
    digest = model.get("bundle_sha256")
    return f"{version} (bundle sha256 {str(digest)[:16]})" if digest else version


def _analysed_summary(study: Mapping[str, Any]) -> Mapping[str, Any]:
    summary = study["summary"]
    if not summary["analysed"]:
        raise IchdetError(f"study {study['study_instance_uid']}: no series was analysed, so there are no "
                          "findings to write as DICOM results")
    return summary


def sr_content(study: Mapping[str, Any], model: Mapping[str, Any]) -> hd.sr.ContainerContentItem:
    """The SR's root container for one analysed study of a result (``model``: the result's ``model``)."""
    summary = _analysed_summary(study)
    several = len(study["series"]) > 1
    findings = _with_children(
        hd.sr.ContainerContentItem(name=codes.DCM.Findings, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        [_finding(label, summary["probability"][label], bool(summary["called"][label]),
                  _ranges_text(summary["slice_ranges"][label], several)) for label in LABELS])
    items = [_text(codes.DCM.Comment, NOT_FOR_DIAGNOSIS), _text(codes.DCM.AlgorithmName, "ichdet"),
             _text(codes.DCM.AlgorithmVersion, _version(model)), findings]
    return _with_children(hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport), items)


def _uid(study: Mapping[str, Any], model: Mapping[str, Any], *parts: object) -> str:
    """A UID fixed by the study's whole result and ``parts``: the same analysis of the same instances gives
    the same objects (a rerun or a resent result replaces, never adds), while an analysis of a study that
    has gained instances (other slices, other series) is a new result series."""
    basis = json.dumps({"study": study, "model": [model.get("bundle_sha256"), model.get("members")]},
                       sort_keys=True, default=str)
    return generate_uid(entropy_srcs=[basis, *map(str, parts)])


def _save(ds: Dataset, out_dir: Path) -> Path:
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


_INSTITUTION = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName")


def _drop_institution(ds: Dataset) -> None:
    """Delete the institution attributes everywhere in ``ds``, nested sequences included (highdicom
    copies the source's equipment, institution and all, into the Contributing Equipment Sequence)."""
    for keyword in _INSTITUTION:
        if keyword in ds:
            del ds[keyword]
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _drop_institution(item)


def _equipment(ds: Dataset, source: Dataset, include_phi: bool) -> None:
    """The source's institution only with ``include_phi`` (the patient and study modules are always copied)."""
    if not include_phi:
        _drop_institution(ds)
        return
    for keyword in _INSTITUTION:
        if keyword in source:
            setattr(ds, keyword, source.get(keyword))


def patient_orientation(ref: Dataset) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of the slice's pixel grid from its Image Orientation (Patient): the
    dominant patient direction of the rows and of the columns (an overlay keeps the slice's grid);
    ``("L", "P")``, a plain axial slice, where the source has none."""
    cosines = [float(v) for v in ref.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0]]

    def letter(vector: list[float]) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return ("RL", "AP", "FH")[axis][int(vector[axis] > 0)]

    return letter(cosines[:3]), letter(cosines[3:])


def _secondary_capture(ref: Dataset, rgb: np.ndarray, uid: Callable[..., str], index: int,
                       source_uid: str | None) -> hd.sc.SCImage:
    series_uid = uid("sc-series")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=np.ascontiguousarray(rgb, np.uint8), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER, sop_instance_uid=uid("sc", index), instance_number=index + 1,
        manufacturer=MANUFACTURER, patient_orientation=patient_orientation(ref),
        series_description="ichdet Grad-CAM overlays - NOT FOR DIAGNOSTIC USE")
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    sc.BurnedInAnnotation = "NO"
    # Laterality (type 2C) is for paired body parts; naming the part tells validators the head is not one
    sc.BodyPartExamined = str(ref.get("BodyPartExamined") or "HEAD")
    sc.DerivationDescription = "Grad-CAM saliency of the ichdet ensemble over the windowed CT slice"
    if source_uid is not None:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.SOPClassUID
        item.ReferencedSOPInstanceUID = source_uid
        sc.SourceImageSequence = [item]
    return sc


def write_dicom_results(study: Mapping[str, Any], model: Mapping[str, Any], source_files: Sequence[Path],
                        overlays: Sequence[np.ndarray], out_dir: Path, include_phi: bool = False,
                        overlay_sources: Sequence[str] | None = None) -> list[Path]:
    """Write the SR and one secondary capture per overlay (RGB uint8 (H, W, 3)) into ``out_dir``; return the paths.

    ``study`` is an analysed entry of a study result's ``studies`` and ``model`` the result's ``model``.
    ``source_files`` are the analysed slices of the study (checked by :func:`check_dicom_ready` first);
    ``overlay_sources`` optionally names the SOP Instance UID of the slice each overlay shows (written as
    its Source Image Sequence). ``include_phi`` adds the source's institution; the patient and study
    modules are copied either way (DICOM requires them). Each file is written atomically, the SR last.
    """
    if overlay_sources is not None and len(overlay_sources) != len(overlays):
        raise ValueError(f"write_dicom_results: {len(overlays)} overlays but {len(overlay_sources)} sources")
    content = sr_content(study, model)
    headers = _ready_headers(source_files)
    ref = headers[0]
    out_dir = Path(out_dir)

    def uid(*parts: object) -> str:
        return _uid(study, model, *parts)

    written = []
    for index, rgb in enumerate(overlays):
        sc = _secondary_capture(ref, rgb, uid, index, overlay_sources[index] if overlay_sources else None)
        _equipment(sc, ref, include_phi)
        written.append(_save(sc, out_dir))
    sr = hd.sr.ComprehensiveSR(
        evidence=headers, content=content, series_instance_uid=uid("sr-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=uid("sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, series_description="ichdet findings - NOT FOR DIAGNOSTIC USE")
    _equipment(sr, ref, include_phi)
    written.append(_save(sr, out_dir))
    return written
