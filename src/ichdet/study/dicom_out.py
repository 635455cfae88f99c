"""DICOM results in the source study (highdicom): a TID 1500 measurement report of the findings, a Key
Object Selection of the key slices and a secondary-capture series of the Grad-CAM overlay images.

All are new series of the source study (its Study Instance UID, patient and study modules copied from
the source slices, as DICOM requires so that a PACS files them next to the scan), marked "not for
diagnostic use" in the series description (what a viewer lists) and, for the images, the image comments.

The SR is DICOM TID 1500 "Measurement Report" built with highdicom's ``hd.sr`` templates (the form OHIF
and the IHE AI Results profile read)::

    CONTAINER DCM 126000 "Imaging Measurement Report"  (TID 1500)
      language, observer context: the device (ichdet, its version, a UID fixed by the bundle)
      procedure reported: LN 25045-6 "CT unspecified body region" (CID 100)
      CONTAINER "Imaging Measurements"
        per label, CONTAINER "Measurement Group" (TID 1501):
          tracking identifier: "ichdet <label>: called on images 7-12 (-5.0 to 20.0 mm)" | "... not called"
          finding: the label's SNOMED CT code (:data:`FINDING_CODES`)
          algorithm: name "ichdet", version, parameters (bundle sha256, threshold and its operating point,
                     the training data when synthetic, "NOT FOR DIAGNOSTIC USE")
          source images: the original slices where the label is called
          NUM DCM 122157 "Probability" (UCUM "1"): the study-level probability
      CONTAINER UMLS C0034375 "Qualitative Evaluations"
        per label, CODE <finding> = SCT 52101004 "Present" | SCT 272519000 "Absent": the decision at the
                     bundle's operating point (:mod:`ichdet.study.decision`)

The Key Object Selection (DCM 113000 "Of Interest", highdicom ``hd.ko``) names the original slices with
the highest probability of any hemorrhage, the ones the secondary captures show, so a PACS can jump to them.

It reads the study result of ``ichdet predict-study`` (docs/study-result.md, schema version 1): one
entry of ``studies`` and the result's ``model`` (``model.training.synthetic`` and
``model.operating_points`` read where present).

Source headers are read and checked before anything is written (:func:`check_dicom_ready`): the UIDs
and SOP class results must refer to are required; every other copied attribute (patient and study
modules, equipment) is written as found when valid for its VR, and empty (type 2) or left out (type 3)
when missing or malformed (a birth date ``DOEJOHN1945``, no PatientName): a malformed optional value never
stops the results, and no message names a header value or a UID.

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
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom import config as dicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import validate_value

import ichdet
from ichdet.errors import IchdetError
from ichdet.io import atomic_path
from ichdet.names import LABELS
from ichdet.study.html import NOT_FOR_DIAGNOSIS, operating_point, study_slices, synthetic_training, top_slices
from ichdet.study.naming import ranges_text, slice_name

__all__ = ["FINDING_CODES", "KO_SERIES_NUMBER", "SC_SERIES_NUMBER", "SR_SERIES_NUMBER", "check_dicom_ready",
           "key_slices", "label_code", "patient_orientation", "sr_content", "write_dicom_results"]

SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
KO_SERIES_NUMBER = 9903
MANUFACTURER = "ichdet"
_UID_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

#: The finding of each label in SNOMED CT (SCT), with the source each code was checked against:
#: - any 1386000 "Intracranial hemorrhage (disorder)": pydicom's DICOM coding data (codes.SCT.IntracranialHemorrhage);
#: - subarachnoid 21454007 "Subarachnoid intracranial hemorrhage (disorder)": the VSAC value set "Hemorrhagic
#:   Stroke" (OID 2.16.840.1.113883.3.117.1.7.1.212, SNOMED CT 2019-03);
#: - intraparenchymal 274100004 "Cerebral hemorrhage (disorder)" (intracerebral hemorrhage): public FHIR stroke
#:   profiles' SNOMED CT bindings;
#: - intraventricular 274110009 "Intraventricular hemorrhage (disorder)": a public FHIR stroke registry IG;
#: - subdural 35486000 "Subdural hemorrhage" and epidural 68752002 "Extradural hemorrhage": from the SNOMED CT
#:   International release as remembered, NOT found in a public source here: confirm both in a SNOMED CT
#:   browser before clinical use (docs/dicom-results.md).
FINDING_CODES: dict[str, hd.sr.CodedConcept] = {
    "epidural": hd.sr.CodedConcept("68752002", "SCT", "Extradural hemorrhage"),
    "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": hd.sr.CodedConcept("274110009", "SCT", "Intraventricular hemorrhage"),
    "subarachnoid": hd.sr.CodedConcept("21454007", "SCT", "Subarachnoid hemorrhage"),
    "subdural": hd.sr.CodedConcept("35486000", "SCT", "Subdural hemorrhage"),
    "any": hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
}
#: Procedure reported (TID 1500 row 4, CID 100 "Quantitative Diagnostic Imaging Procedures", the group the
#: validators check): LOINC "CT unspecified body region" (CID 100 has no head CT).
_PROCEDURE = hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")
_QUALITATIVE = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

#: Type 2 attributes of the patient and general study modules the results copy from the source (highdicom
#: reads them from the first source header): value as found when valid for its VR, else empty.
_TYPE2 = {"PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA", "PatientSex": "CS",
          "AccessionNumber": "SH", "StudyID": "SH", "StudyDate": "DA", "StudyTime": "TM",
          "ReferringPhysicianName": "PN"}
#: Type 3 / equipment attributes copied when present and valid (left out otherwise).
_OPTIONAL = {"Manufacturer": "LO", "ManufacturerModelName": "LO", "DeviceSerialNumber": "LO",
             "SoftwareVersions": "LO", "BodyPartExamined": "CS"}
_INSTITUTION = {"InstitutionName": "LO", "InstitutionAddress": "ST", "InstitutionalDepartmentName": "LO"}

_SEXES = {"M", "F", "O"}


def label_code(label: str) -> hd.sr.CodedConcept:
    """The SNOMED CT concept of one label's finding (:data:`FINDING_CODES`)."""
    return FINDING_CODES[label]


@contextmanager
def _quiet_reading() -> Iterator[None]:
    """pydicom without its per-value warnings (they print header values; malformed ones are handled here)."""
    with warnings.catch_warnings(), pydicom.config.disable_value_validation():
        warnings.simplefilter("ignore")
        yield


def _read_header(path: Path) -> Dataset:
    try:
        with _quiet_reading():
            return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError) as err:
        raise IchdetError(f"{path}: cannot read it as DICOM ({type(err).__name__}); DICOM results refer to the "
                          "analysed slices, which must still be where predict-study found them") from None


def _check_header(ds: Dataset, path: Path) -> None:
    """The attributes every result must refer to; messages name the attribute, never its value."""
    if not str(ds.get("SOPClassUID", "")).strip():
        raise IchdetError(
            f"{path}: no SOP Class UID (0008,0016), which DICOM results must refer to (the RSNA challenge "
            "files lack it); run without --dicom-out, or give the series its SOP Class UID first")
    for keyword in _UID_FIELDS:
        value = str(ds.get(keyword, "") or "").strip()
        if not value or not UID(value).is_valid:
            raise IchdetError(
                f"{path}: {keyword} is {'not a valid DICOM UID' if value else 'missing'} (anonymised 'ID_...' "
                "values, as in the RSNA challenge files, cannot be referred to); run without --dicom-out, or "
                "give the study valid UIDs first")


def _valid(ds: Dataset, keyword: str, vr: str) -> Any | None:
    """The value of ``keyword`` in ``ds`` when present, non-empty and valid for ``vr``; else None."""
    try:
        element = ds[keyword]
    except (KeyError, ValueError, TypeError):
        return None
    value = element.value
    if value is None or value == "" or (isinstance(value, bytes) and not value.strip()):
        return None
    try:
        text = str(value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            validate_value(vr, text, dicom_config.RAISE)
    except (ValueError, TypeError, UnicodeError):
        return None
    if keyword == "PatientSex" and text.strip().upper() not in _SEXES:
        return None
    return text.strip() if vr in {"DA", "TM", "CS", "LO", "SH"} else text


def _reference(ds: Dataset, include_phi: bool) -> Dataset:
    """A clean copy of a source header for highdicom: its UIDs and SOP class, the type-2 patient and study
    attributes (empty when missing or malformed), the valid optional and equipment attributes, the
    institution only with ``include_phi``, and the orientation when it is 6 numbers."""
    ref = Dataset()
    for keyword in ("SOPClassUID", *_UID_FIELDS):
        setattr(ref, keyword, str(ds.get(keyword)).strip())
    charset = ds.get("SpecificCharacterSet")
    if charset:
        try:
            pydicom.charset.convert_encodings(charset)
            ref.SpecificCharacterSet = charset
        except (LookupError, ValueError, TypeError):
            pass
    for keyword, vr in _TYPE2.items():
        value = _valid(ds, keyword, vr)
        setattr(ref, keyword, value if value is not None else "")
    for keyword, vr in (_OPTIONAL | (_INSTITUTION if include_phi else {})).items():
        value = _valid(ds, keyword, vr)
        if value is not None:
            setattr(ref, keyword, value)
    try:
        cosines = [float(v) for v in ds.get("ImageOrientationPatient") or []]
    except (TypeError, ValueError):
        cosines = []
    if len(cosines) == 6 and all(np.isfinite(cosines)):
        ref.ImageOrientationPatient = cosines
    for keyword in ("Rows", "Columns"):  # a key object is referred to as an image only when it has both
        value = ds.get(keyword)
        if isinstance(value, int) and value > 0:
            setattr(ref, keyword, value)
    return ref


def _ready_references(source_files: Sequence[Path], include_phi: bool = False) -> list[Dataset]:
    """The source headers checked (:func:`check_dicom_ready`) and cleaned (:func:`_reference`)."""
    if not source_files:
        raise IchdetError("DICOM results: no source slice given; they refer to the analysed series")
    refs = []
    with _quiet_reading():  # pydicom converts values when first read, here: its UI warning would precede the refusal
        for path in map(Path, source_files):
            header = _read_header(path)
            _check_header(header, path)
            refs.append(_reference(header, include_phi))
    studies = {str(ds.StudyInstanceUID) for ds in refs}
    if len(studies) > 1:
        raise IchdetError(f"DICOM results: the source slices belong to {len(studies)} studies; write the "
                          "results of one study at a time")
    return refs


def check_dicom_ready(source_files: Sequence[Path]) -> None:
    """Raise IchdetError naming the file and the fix unless every source slice can be referred to.

    DICOM results need, in every source file, a SOP Class UID and valid Study, Series and SOP Instance
    UIDs, all files of one study; any other attribute they copy may be missing or malformed (it is then
    written empty or left out). Reads headers only; messages carry no header value and no UID.
    """
    _ready_references(source_files)


def _analysed_summary(study: Mapping[str, Any]) -> Mapping[str, Any]:
    summary = study["summary"]
    if not summary["analysed"]:
        raise IchdetError("DICOM results: the study has no analysed series, so there are no findings to "
                          "write as DICOM results")
    return summary


def _version(model: Mapping[str, Any]) -> str:
    return str(model.get("ichdet_version") or ichdet.__version__)


def _number(value: Any) -> str:
    return f"{float(value):.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "unknown"


def _parameters(model: Mapping[str, Any], summary: Mapping[str, Any], label: str) -> list[str]:
    """The algorithm parameters of one label's group: what a reader must know about the decision."""
    point = operating_point(model, label)
    out = [NOT_FOR_DIAGNOSIS, f"bundle sha256 {model.get('bundle_sha256') or 'none (run folders)'}",
           f"threshold {_number(summary['thresholds'][label])}: called when the probability is >= it; "
           "the study is flagged when any label is called",
           f"operating point sensitivity {_number(point.get('sensitivity'))}, "
           f"specificity {_number(point.get('specificity'))}"]
    out += [f"warning: {w}" for w in point.get("warnings") or [] if isinstance(w, str)]
    if synthetic_training(model):
        out.append("trained on ichdet's synthetic data set only: a demonstration model, not a clinical one")
    return out


def _device_context(study: Mapping[str, Any], model: Mapping[str, Any]) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["ichdet-device", str(model.get("bundle_sha256"))]), name="ichdet",
            manufacturer_name=MANUFACTURER, model_name=f"ichdet {_version(model)}"[:64]))


def _group(study: Mapping[str, Any], model: Mapping[str, Any], label: str, sop_classes: Mapping[str, str],
           uid: Callable[..., str]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    summary = study["summary"]
    called = bool(summary["called"][label])
    names = {s["series_instance_uid"]: f"series {s['series_number']}" for s in study["series"]} \
        if len(study["series"]) > 1 else None
    where = ranges_text(summary["slice_ranges"][label], names)
    slices = {(r["series_instance_uid"], i) for r in summary["slice_ranges"][label]
              for i in range(r["first_index"], r["last_index"] + 1)}
    sources = [hd.sr.SourceImageForMeasurementGroup(sop_classes[e["sop_instance_uid"]], e["sop_instance_uid"])
               for e in study_slices(study) if (e["series_instance_uid"], e["index"]) in slices]
    text = f"ichdet {label}: called on {where}" if called and where else f"ichdet {label}: not called"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid("group", label), identifier=text),
        finding_type=label_code(label),
        algorithm_id=hd.sr.AlgorithmIdentification(name="ichdet", version=_version(model)[:64],
                                                   parameters=_parameters(model, summary, label)),
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability,
                                        value=round(float(summary["probability"][label]), 6),
                                        unit=codes.UCUM.NoUnits)],
        source_images=sources or None)


def _decisions(summary: Mapping[str, Any]) -> hd.sr.ContainerContentItem:
    """TID 1500's "Qualitative Evaluations" container (rows 12-13): per label its finding = SCT Present or
    Absent, the decision at the operating point (:mod:`ichdet.study.decision`). pixelmed's template of TID
    1501 has no row for a qualitative evaluation inside a measurement group; the report level has one."""
    container = hd.sr.ContainerContentItem(name=_QUALITATIVE, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([hd.sr.CodeContentItem(
        name=label_code(label), value=codes.SCT.Present if summary["called"][label] else codes.SCT.Absent,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS) for label in LABELS])
    return container


def sr_content(study: Mapping[str, Any], model: Mapping[str, Any], sop_classes: Mapping[str, str] | None = None,
               uid: Callable[..., str] | None = None) -> hd.sr.MeasurementReport:
    """The TID 1500 measurement report of one analysed study of a result (``model``: the result's ``model``).

    ``sop_classes`` maps each analysed slice's SOP Instance UID to its SOP Class UID (CT Image Storage
    where not given); ``uid`` makes the tracking UIDs (stable ones from the result where not given).
    """
    _analysed_summary(study)
    classes = sop_classes or {}
    known = {e["sop_instance_uid"]: classes.get(e["sop_instance_uid"], "1.2.840.10008.5.1.4.1.1.2")
             for e in study_slices(study)}
    make = uid or (lambda *parts: _uid(study, model, *parts))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device_context(study, model)),
        procedure_reported=_PROCEDURE,
        imaging_measurements=[_group(study, model, label, known, make) for label in LABELS])
    report[0].ContentSequence.append(_decisions(study["summary"]))
    return report


def key_slices(study: Mapping[str, Any], shown: Sequence[str] = (), k: int = 3) -> list[dict[str, Any]]:
    """The key slices of a study (entries of :func:`ichdet.study.html.study_slices`): those the secondary
    captures show (``shown``, SOP Instance UIDs, in order, each once), else the ``k`` with the highest
    probability of any hemorrhage."""
    entries = study_slices(study)
    by_sop = {e["sop_instance_uid"]: e for e in entries}
    if shown:
        return [by_sop[sop] for sop in dict.fromkeys(shown) if sop in by_sop]
    return [entries[i] for i in top_slices(study, k)]


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


def _drop_institution(ds: Dataset) -> None:
    """Delete the institution attributes everywhere in ``ds``, nested sequences included (highdicom
    copies the source's equipment into the Contributing Equipment Sequence)."""
    for keyword in _INSTITUTION:
        if keyword in ds:
            del ds[keyword]
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _drop_institution(item)


def _equipment(ds: Dataset, ref: Dataset, include_phi: bool) -> None:
    """The source's institution (already cleaned into ``ref`` only with ``include_phi``) on the result."""
    if not include_phi:
        _drop_institution(ds)
        return
    for keyword in _INSTITUTION:
        if keyword in ref:
            setattr(ds, keyword, ref.get(keyword))


def patient_orientation(ref: Dataset) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of the slice's pixel grid from its Image Orientation (Patient): the
    dominant patient direction of the rows and of the columns (an overlay keeps the slice's grid);
    ``("L", "P")``, a plain axial slice, where the source has none."""
    cosines = [float(v) for v in ref.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0]]

    def letter(vector: list[float]) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return ("RL", "AP", "FH")[axis][int(vector[axis] > 0)]

    return letter(cosines[:3]), letter(cosines[3:])


def _description(what: str, model: Mapping[str, Any]) -> str:
    """A series description (LO, at most 64 characters) saying what it is, "not for diagnostic use" and,
    for a bundle trained on synthetic data, that it is a demonstration model."""
    tail = " - NOT FOR DIAGNOSTIC USE" + (" - DEMO MODEL" if synthetic_training(model) else "")
    return f"ichdet {what}"[:64 - len(tail)] + tail  # the warnings are never the part cut off


def _secondary_capture(ref: Dataset, rgb: np.ndarray, uid: Callable[..., str], index: int,
                       source: tuple[str, str] | None, model: Mapping[str, Any]) -> hd.sc.SCImage:
    """One overlay image; ``source``: (SOP Instance UID, name) of the slice it shows."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=np.ascontiguousarray(rgb, np.uint8), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=uid("sc-series"),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=uid("sc", index), instance_number=index + 1,
        manufacturer=MANUFACTURER, patient_orientation=patient_orientation(ref),
        series_description=_description("Grad-CAM overlays", model))
    sc.ImageType = ["DERIVED", "SECONDARY"]
    shows = f" Grad-CAM over {source[1]} of the source series." if source else ""
    demo = " Demonstration model trained on synthetic data." if synthetic_training(model) else ""
    sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}.{shows}{demo}"
    sc.BurnedInAnnotation = "NO"
    # Laterality (type 2C) is for paired body parts; naming the part tells validators the head is not one
    sc.BodyPartExamined = str(ref.get("BodyPartExamined") or "HEAD")
    sc.DerivationDescription = "Grad-CAM saliency of the ichdet ensemble over the windowed CT slice"
    if source is not None:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.SOPClassUID
        item.ReferencedSOPInstanceUID = source[0]
        sc.SourceImageSequence = [item]
    return sc


def _key_objects(refs: Mapping[str, Dataset], keys: Sequence[Mapping[str, Any]], study: Mapping[str, Any],
                 model: Mapping[str, Any], uid: Callable[..., str]) -> hd.ko.KeyObjectSelectionDocument:
    """The Key Object Selection of the key slices (``keys``: entries of ``study_slices``, most likely first)."""
    named = "; ".join(f"{slice_name(e.get('instance_number'), e['position_mm'])} "
                      f"(any {float(e['probabilities']['any']):.3f})" for e in keys)
    demo = " Demonstration model trained on synthetic data." if synthetic_training(model) else ""
    objects = [refs[e["sop_instance_uid"]] for e in keys]
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=objects,
        observer_device_context=_device_context(study, model),
        description=f"ichdet: slices with the highest probability of any intracranial hemorrhage: {named}. "
                    f"{NOT_FOR_DIAGNOSIS}.{demo}")
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=objects, content=content, series_instance_uid=uid("ko-series"), series_number=KO_SERIES_NUMBER,
        sop_instance_uid=uid("ko"), instance_number=1, manufacturer=MANUFACTURER)
    ko.SeriesDescription = _description("key images", model)
    # highdicom names each referenced image "Source" (SCT 260753009); TID 2010 gives its IMAGE rows no
    # concept name and pixelmed's validator rejects one ("Purpose of Reference forbidden"): left unnamed
    for item in ko.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE") and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
    return ko


def _build(what: str, make: Callable[[], Dataset]) -> Dataset:
    """``make()``; an error of highdicom becomes one line naming the object and the error's kind only (its
    message may quote a header value)."""
    try:
        return make()
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise IchdetError(f"DICOM results: the {what} could not be built from the source headers "
                          f"({type(err).__name__}); nothing was written. Please report this with the "
                          "ichdet version") from None


def write_dicom_results(study: Mapping[str, Any], model: Mapping[str, Any], source_files: Sequence[Path],
                        overlays: Sequence[np.ndarray], out_dir: Path, include_phi: bool = False,
                        overlay_sources: Sequence[str] | None = None) -> list[Path]:
    """Write the secondary captures (one per overlay, RGB uint8 (H, W, 3)), the Key Object Selection and
    the TID 1500 SR into ``out_dir``; return the paths in that order.

    ``study`` is an analysed entry of a study result's ``studies`` and ``model`` the result's ``model``.
    ``source_files`` are the analysed slices of the study (checked by :func:`check_dicom_ready` first);
    ``overlay_sources`` optionally names the SOP Instance UID of the slice each overlay shows (written as
    its Source Image Sequence; the key images are these slices, else the 3 most likely). ``include_phi``
    adds the source's institution; the patient and study modules are copied either way (DICOM requires
    them). Every object is built before the first is written; each file is written atomically, the SR last.
    """
    if overlay_sources is not None and len(overlay_sources) != len(overlays):
        raise ValueError(f"write_dicom_results: {len(overlays)} overlays but {len(overlay_sources)} sources")
    _analysed_summary(study)
    refs = _ready_references(source_files, include_phi)
    by_sop = {str(r.SOPInstanceUID): r for r in refs}
    entries = {e["sop_instance_uid"]: e for e in study_slices(study)}
    missing = [sop for sop in entries if sop not in by_sop]
    if missing:
        raise IchdetError(f"DICOM results: {len(missing)} analysed slices of the study are not among the "
                          f"{len(refs)} source files given; pass every analysed slice")
    ref = refs[0]
    out_dir = Path(out_dir)

    def uid(*parts: object) -> str:
        return _uid(study, model, *parts)

    def source(index: int) -> tuple[str, str] | None:
        if not overlay_sources:
            return None
        e = entries[overlay_sources[index]]
        return e["sop_instance_uid"], slice_name(e.get("instance_number"), e["position_mm"])

    objects: list[Dataset] = [_build("secondary capture", lambda i=i, rgb=rgb: _secondary_capture(  # type: ignore[misc]
        ref, rgb, uid, i, source(i), model)) for i, rgb in enumerate(overlays)]
    keys = key_slices(study, overlay_sources or ())
    objects.append(_build("key object selection", lambda: _key_objects(by_sop, keys, study, model, uid)))
    classes = {sop: str(r.SOPClassUID) for sop, r in by_sop.items()}
    objects.append(_build("structured report", lambda: hd.sr.ComprehensiveSR(
        evidence=refs, content=sr_content(study, model, classes, uid), series_instance_uid=uid("sr-series"),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=uid("sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, series_description=_description("findings", model))))
    written = []
    for ds in objects:
        _equipment(ds, ref, include_phi)
        written.append(_save(ds, out_dir))
    return written
