"""The worklist notification of one analysed study generation: an HL7 v2.5 ORU^R01 (python-hl7) and a
FHIR R4 DiagnosticReport (fhir.resources, validated), built from the same :class:`Finding`. Pure: no I/O.

What a RIS matches on is in both: the Study Instance UID (HL7: ZDS-1 as IHE Scheduled Workflow puts it, and
an OBX of concept (113014, DCM, "DICOM Study"); FHIR: ``imagingStudy`` by identifier ``urn:oid:<UID>``) and
the Accession Number (HL7: ORC-3/OBR-3 filler order number and OBR-18 as IHE does; FHIR: ``basedOn`` a
ServiceRequest by its ACSN identifier). One observation per label: the study-level probability, the
operating point, and whether the label is called (HL7: OBX-8 abnormal flag ``A``/``N``; FHIR:
interpretation POS/NEG). Priority STAT when hemorrhage is called (HL7: TQ1-9 ``S`` and OBR-5; FHIR: a
``meta.tag`` of v3-ActPriority ``S``). A later generation of the same study is a correction (OBR-25 and
OBX-11 ``C``, DiagnosticReport ``corrected``).

fhir.resources ships FHIR R4B (4.3), whose DiagnosticReport and Observation are R4's (4.0.1) element for
element; the resources built here use nothing R4B added.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import hl7
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from ichdet import __version__
from ichdet.names import LABELS

__all__ = ["LABEL_TEXT", "Finding", "control_id", "diagnostic_report", "finding_from_result", "oru_r01"]

#: How each label is named in the messages (code: the label itself, in the local coding system below).
LABEL_TEXT = {"any": "Intracranial hemorrhage", "epidural": "Epidural hemorrhage",
              "intraparenchymal": "Intraparenchymal hemorrhage", "intraventricular": "Intraventricular hemorrhage",
              "subarachnoid": "Subarachnoid hemorrhage", "subdural": "Subdural hemorrhage"}
#: The local coding system of the labels and the report (HL7 coding system names starting 99 are local).
LOCAL_SYSTEM, LOCAL_URI = "99ICHDET", "urn:ichdet:label"
REPORT_CODE = ("ICH-TRIAGE", "Intracranial hemorrhage triage (automated, not for diagnostic use)")
#: The DiagnosticReport identifier system: its value is the HL7 message control ID of the same generation.
RESULT_SYSTEM = "urn:ichdet:result"
_UCUM = "http://unitsofmeasure.org"
_ENCODING = hl7.parse("MSH|^~\\&|")  # the separators every message here uses (to escape values with)


@dataclass(frozen=True)
class Finding:
    """Everything a notification says about one analysed study generation."""

    study_uid: str
    generation: int
    accession: str
    patient_id: str
    patient_name: str
    probability: Mapping[str, float]
    called: Mapping[str, bool]
    thresholds: Mapping[str, float]

    @property
    def flagged(self) -> bool:
        """Any label called: the study goes to the top of the worklist (priority STAT)."""
        return any(self.called.values())


def finding_from_result(result: Mapping[str, Any], study_uid: str, generation: int, header: Mapping[str, str]
                        ) -> Finding | None:
    """The :class:`Finding` of ``study_uid`` in a result JSON; ``None`` when the study was not analysed.

    ``header`` gives AccessionNumber, PatientID and PatientName from one of the study's instances (the
    result JSON carries none of them unless ``--include-phi``).
    """
    for study in result.get("studies", []):
        if study.get("study_instance_uid") == study_uid and study.get("summary", {}).get("analysed"):
            summary = study["summary"]
            return Finding(study_uid, generation, header.get("AccessionNumber", ""), header.get("PatientID", ""),
                           header.get("PatientName", ""),
                           {k: float(summary["probability"][k]) for k in LABELS},
                           {k: bool(summary["called"][k]) for k in LABELS},
                           {k: float(summary["thresholds"][k]) for k in LABELS})
    return None


def control_id(study_uid: str, generation: int) -> str:
    """The message control ID (MSH-10, 20 characters) of a generation: the same on every resend, so a
    receiver can recognise a message it already has; a hash, not the UID."""
    return hashlib.sha256(f"{study_uid}/{generation}".encode()).hexdigest()[:20]


def _esc(value: str) -> str:
    return str(hl7.util.escape(_ENCODING, value))


def _hl7_time(now: datetime) -> str:
    return now.strftime("%Y%m%d%H%M%S%z")


def _hl7_name(dicom_name: str) -> str:
    """A DICOM PN's alphabetic group (Family^Given^Middle^Prefix^Suffix) as an HL7 XPN, each part escaped."""
    alphabetic = dicom_name.split("=")[0]
    return "^".join(_esc(part) for part in alphabetic.split("^")[:5])


def oru_r01(finding: Finding, sending_facility: str, now: datetime) -> str:
    """The HL7 v2.5 ORU^R01 of ``finding`` (segments separated by carriage returns), parsed once by python-hl7
    as a check. ``sending_facility`` is MSH-4 (the node's AE title); ``now`` must carry a time zone."""
    status = "F" if finding.generation == 1 else "C"
    priority = ("S", "Stat") if finding.flagged else ("R", "Routine")
    accession, stamp = _esc(finding.accession), _hl7_time(now)
    code = f"{REPORT_CODE[0]}^{REPORT_CODE[1]}^{LOCAL_SYSTEM}"
    obr = ["OBR", "1", "", accession, code, priority[0], "", stamp, *[""] * 10, accession, "", "", "", stamp, "",
           "CT", status]
    segments = [
        f"MSH|^~\\&|ICHDET|{_esc(sending_facility)}|||{stamp}||ORU^R01^ORU_R01|"
        f"{control_id(finding.study_uid, finding.generation)}|P|2.5",
        f"PID|1||{_esc(finding.patient_id)}||{_hl7_name(finding.patient_name)}",
        f"ORC|RE||{accession}||CM",
        "|".join(obr),
        f"NTE|1|L|ichdet {__version__}: automated triage result of generation {finding.generation}, "
        "not for diagnostic use",
        "TQ1|1" + "|" * 8 + f"{priority[0]}^{priority[1]}^HL70485",
    ]
    for i, label in enumerate(LABELS, start=1):
        segments.append(f"OBX|{i}|NM|{label}^{LABEL_TEXT[label]} (probability)^{LOCAL_SYSTEM}||"
                        f"{finding.probability[label]:.4f}|1^^UCUM|<{finding.thresholds[label]:.4f}|"
                        f"{'A' if finding.called[label] else 'N'}|||{status}")
    segments.append(f"OBX|{len(LABELS) + 1}|HD|113014^DICOM Study^DCM||{finding.study_uid}||||||{status}")
    segments.append(f"ZDS|{finding.study_uid}^ICHDET^Application^DICOM")
    text = "\r".join(segments) + "\r"  # every segment ends with a carriage return, the last one too
    hl7.parse(text)  # raises on a message python-hl7 cannot read back
    return text


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _observation(finding: Finding, label: str, status: str) -> dict[str, Any]:
    called = finding.called[label]
    return {
        "resourceType": "Observation", "id": label, "status": status,
        "code": _coding(LOCAL_URI, label, f"{LABEL_TEXT[label]} (probability)"),
        "valueQuantity": {"value": round(finding.probability[label], 4), "unit": "probability",
                          "system": _UCUM, "code": "1"},
        "interpretation": [_coding("http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                   "POS" if called else "NEG", "Positive" if called else "Negative")],
        "referenceRange": [{"text": f"called at or above {finding.thresholds[label]:.4f}"}],
    }


def diagnostic_report(finding: Finding, now: datetime) -> str:
    """The FHIR R4 DiagnosticReport of ``finding`` as JSON, validated by fhir.resources (a ValueError
    otherwise); the per-label observations are contained resources."""
    status = "final" if finding.generation == 1 else "corrected"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": RESULT_SYSTEM, "value": control_id(finding.study_uid, finding.generation)}],
        "status": status,
        "category": [_coding("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")],
        "code": _coding(LOCAL_URI, *REPORT_CODE),
        "issued": now.isoformat(timespec="seconds"),
        "imagingStudy": [{"type": "ImagingStudy",
                          "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{finding.study_uid}"}}],
        "contained": [_observation(finding, label, status) for label in LABELS],
        "result": [{"reference": f"#{label}"} for label in LABELS],
        "conclusion": ("hemorrhage suspected: " + ", ".join(k for k in LABELS if finding.called[k])
                       if finding.flagged else "no hemorrhage called") + "; automated triage, not for diagnostic use",
    }
    if finding.accession:
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": {
            "type": _coding("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN", "Accession ID"),
            "value": finding.accession}}]
    if finding.patient_id:
        report["subject"] = {"type": "Patient", "identifier": {"value": finding.patient_id}}
    if finding.flagged:
        report["meta"] = {"tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActPriority", "code": "S",
                                   "display": "stat"}]}
    validated = DiagnosticReport.model_validate(report)
    return json.dumps(json.loads(validated.model_dump_json(exclude_none=True)), indent=1)
