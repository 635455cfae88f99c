"""Worklist notifications: the HL7 ORU^R01 and FHIR DiagnosticReport of a finding, their transports against
python-hl7's MLLP server and an http.server receiver, and the node sending exactly one of each per analysed
study generation across a receiver outage and a kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import hl7
import pydicom
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from receivers import FhirReceiver, MLLPReceiver
from serve_support import (
    REPO,
    STORESCU,
    NodeProcess,
    free_port,
    make_studies,
    stand_in_analyser,
    storescu,
    wait_for,
)

from ichdet.names import LABELS
from ichdet.serve import Node, ServeConfig, spool_status
from ichdet.serve.messages import Finding, control_id, diagnostic_report, oru_r01
from ichdet.serve.notify import post_fhir, send_hl7

needs_dcmtk = pytest.mark.skipif(STORESCU is None, reason="dcmtk's storescu not installed (apt-get install dcmtk)")
NOW = datetime(2026, 12, 6, 9, 30, 5, tzinfo=UTC)
UID = "1.2.826.0.1.3680043.8.498.1"
PROBS = {"epidural": 0.01, "intraparenchymal": 0.02, "intraventricular": 0.03, "subarachnoid": 0.04,
         "subdural": 0.91, "any": 0.93}
THRESHOLDS = dict.fromkeys(LABELS, 0.5)


def _finding(called: tuple[str, ...], generation: int = 1, accession: str = "ACC-7|1") -> Finding:
    return Finding(UID, generation, accession, "PAT^42", "Doe^Jane", PROBS,
                   {k: k in called for k in LABELS}, THRESHOLDS)


@pytest.mark.parametrize(("called", "generation", "priority", "status", "flags"), [
    (("subdural", "any"), 1, "S", "F", {"subdural": "A", "any": "A", "epidural": "N"}),
    ((), 1, "R", "F", {"subdural": "N", "any": "N"}),
    (("any",), 2, "S", "C", {"any": "A", "subdural": "N"}),
])
def test_oru_r01_fields(called: tuple[str, ...], generation: int, priority: str, status: str,
                        flags: dict[str, str]) -> None:
    msg = hl7.parse(oru_r01(_finding(called, generation), "ICHDET", NOW))
    assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(msg.segment("MSH")[12]) == "2.5"
    assert str(msg.segment("MSH")[10]) == control_id(UID, generation) and len(control_id(UID, generation)) == 20
    obr = msg.segment("OBR")
    # the accession number as the RIS sent it (escaped on the wire, read back unescaped)
    assert [msg.unescape(str(obr[i])) for i in (3, 18)] == ["ACC-7|1", "ACC-7|1"]
    assert msg.unescape(str(msg.segment("ORC")[3])) == "ACC-7|1"
    assert (str(obr[5]), str(obr[25])) == (priority, status)
    assert str(msg.segment("TQ1")[9][0][0]) == priority
    assert str(msg.segment("ZDS")[1][0][0]) == UID
    obx = {str(seg[3][0][0]): seg for seg in msg.segments("OBX")}
    assert sorted(obx) == sorted([*LABELS, "113014"])  # one per label, and the study
    for label in LABELS:
        assert float(str(obx[label][5])) == pytest.approx(PROBS[label], abs=5e-5)
        assert str(obx[label][7]) == "<0.5000" and str(obx[label][11]) == status
    assert {k: str(obx[k][8]) for k in flags} == flags
    assert str(obx["113014"][5]) == UID
    assert msg.unescape(str(msg.segment("PID")[3])) == "PAT^42"


@pytest.mark.parametrize(("called", "generation", "status", "tag"), [
    (("subdural", "any"), 1, "final", "S"),
    ((), 1, "final", None),
    (("any",), 3, "corrected", "S"),
])
def test_diagnostic_report(called: tuple[str, ...], generation: int, status: str, tag: str | None) -> None:
    report = json.loads(diagnostic_report(_finding(called, generation), NOW))
    DiagnosticReport.model_validate(report)  # what was sent validates again
    assert report["status"] == status
    assert report["identifier"] == [{"system": "urn:ichdet:result", "value": control_id(UID, generation)}]
    assert report["imagingStudy"][0]["identifier"] == {"system": "urn:dicom:uid", "value": f"urn:oid:{UID}"}
    assert report["basedOn"][0]["identifier"]["value"] == "ACC-7|1"
    assert report["basedOn"][0]["identifier"]["type"]["coding"][0]["code"] == "ACSN"
    assert [t["code"] for t in report.get("meta", {}).get("tag", [])] == ([tag] if tag else [])
    observations = {o["id"]: o for o in report["contained"]}
    assert sorted(observations) == sorted(LABELS) and [r["reference"] for r in report["result"]] == [
        f"#{label}" for label in LABELS]
    for label, obs in observations.items():
        assert obs["valueQuantity"]["value"] == PROBS[label]
        assert obs["interpretation"][0]["coding"][0]["code"] == ("POS" if label in called else "NEG")


def test_diagnostic_report_without_accession_has_no_based_on() -> None:
    report = json.loads(diagnostic_report(_finding(("any",), accession=""), NOW))
    assert "basedOn" not in report


def test_invalid_report_is_refused_before_sending() -> None:
    bad = Finding(UID, 1, "", "", "", {**PROBS, "any": float("nan")}, dict.fromkeys(LABELS, False), THRESHOLDS)
    with pytest.raises(ValueError, match=r"DiagnosticReport\ncontained\.5\.valueQuantity\.value\n"):
        diagnostic_report(bad, NOW)


# -- transports against real receivers --------------------------------------------------------------------

@pytest.mark.parametrize(("code", "error"), [
    ("AA", None),
    ("AE", "acknowledgement code AE (not AA)"),
    ("AR", "acknowledgement code AR (not AA)"),
])
def test_send_hl7_needs_aa(code: str, error: str | None) -> None:
    port = free_port()
    receiver = MLLPReceiver(port, code=code).start()
    try:
        message = oru_r01(_finding(("any",)), "ICHDET", NOW)
        result = send_hl7("127.0.0.1", port, message, timeout=10)
        assert result == (None if error is None else f"HL7 receiver 127.0.0.1:{port}: {error}")
        assert receiver.messages == [message]
    finally:
        receiver.stop()


def test_send_hl7_receiver_down() -> None:
    port = free_port()
    error = send_hl7("127.0.0.1", port, oru_r01(_finding(()), "ICHDET", NOW), timeout=5)
    assert error is not None and error.startswith(f"HL7 receiver 127.0.0.1:{port}: ") and "Connect call failed" in error


@pytest.mark.parametrize(("status", "error"), [(201, None), (200, None), (500, "HTTP 500 Internal Server Error"),
                                               (400, "HTTP 400 Bad Request")])
def test_post_fhir_needs_2xx(status: int, error: str | None) -> None:
    receiver = FhirReceiver(free_port(), status=status).start()
    try:
        body = diagnostic_report(_finding(("any",)), NOW)
        result = post_fhir(receiver.url, body, timeout=10)
        assert result == (None if error is None else f"FHIR receiver {receiver.url}: {error}")
        assert receiver.posts == [json.loads(body)]
        assert receiver.headers[0]["Content-Type"] == "application/fhir+json"
        assert receiver.headers[0]["If-None-Exist"] == f"identifier=urn:ichdet:result|{control_id(UID, 1)}"
    finally:
        receiver.stop()


def test_post_fhir_receiver_down() -> None:
    url = f"http://127.0.0.1:{free_port()}/fhir/DiagnosticReport"
    assert post_fhir(url, diagnostic_report(_finding(()), NOW), timeout=5) == f"FHIR receiver {url}: ConnectionError"


# -- the node ---------------------------------------------------------------------------------------------

def test_notifications_written_with_the_generation_and_kept_until_acknowledged(rsna_sample: Path,
                                                                              tmp_path: Path) -> None:
    """In process, no receiver: the analysis commits its generation with both notifications pending in it;
    clean-up keeps the study until they are acknowledged."""
    spool_dir = tmp_path / "spool"
    cfg = ServeConfig(bundle=tmp_path / "b", spool=spool_dir, allow=["X"], quiet_seconds=0.001,
                      notify_hl7=f"127.0.0.1:{free_port()}", notify_url=f"http://127.0.0.1:{free_port()}/fhir")
    node = Node(cfg, stand_in_analyser())
    (uid, files), = _study(rsna_sample, tmp_path / "dicom").items()
    for path in files:
        ds = pydicom.dcmread(path)
        stored = node.spool.store(uid, str(ds.SOPInstanceUID), path.read_bytes())
        os.utime(stored, (time.time() - 60, time.time() - 60))  # arrived a minute ago: quiet, due now
    assert node.scan() == [uid]
    node.analyse(node.queue.get())
    notify = spool_dir / "studies" / uid / "results" / "gen-0001" / "notify"
    assert sorted(p.name for p in notify.iterdir()) == ["fhir.pending", "hl7.pending"]
    oru = hl7.parse((notify / "hl7.pending").read_bytes().decode())
    assert str(oru.segment("OBR")[3]) == "ACC202612060" and str(oru.segment("PID")[3]) == "PAT-00420"
    assert json.loads((notify / "fhir.pending").read_text())["identifier"][0]["value"] == control_id(uid, 1)
    assert node.notifier.send_pending("hl7") is False  # nobody listens: recorded as failed, still pending
    assert json.loads((notify / "hl7.error").read_text())["tries"] == 1
    assert spool_status(node.spool)["failed_notifications"] == {"hl7": 1, "fhir": 0}
    for sent in node.spool.pending_sends(uid):
        node.spool.mark_sent(sent)
    later = time.time() + 30 * 86400
    assert node.spool.clean(max_age_days=1, now=later) == []  # notifications not acknowledged: kept
    for channel in ("hl7", "fhir"):
        (notify / f"{channel}.acked").touch()
    assert node.spool.clean(max_age_days=1, now=later) == [uid]



PHI = {"PatientID": "PAT-0042", "AccessionNumber": "ACC20261206", "PatientName": "Doe^Jane"}


def _study(rsna_sample: Path, out: Path, n: int = 1) -> dict[str, list[Path]]:
    """``n`` small valid studies whose instances carry a patient ID, name and accession number."""
    studies = make_studies(rsna_sample, out, n=n, slices=3, size=16)
    for k, files in enumerate(studies.values()):
        for path in files:
            ds = pydicom.dcmread(path)
            for keyword, value in PHI.items():
                setattr(ds, keyword, f"{value}{k}")
            ds.save_as(path, enforce_file_format=True)
    return studies


def _status(spool: Path) -> dict[str, object]:
    run = subprocess.run([sys.executable, "-m", "ichdet", "serve", "--status", "--spool", str(spool)],
                         capture_output=True, text=True, check=True, env={"PYTHONPATH": str(REPO / "src")})
    return dict(json.loads(run.stdout))


@pytest.fixture
def node_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    nodes: list[NodeProcess] = []

    def make(**kwargs) -> NodeProcess:  # type: ignore[no-untyped-def]
        node = NodeProcess(tmp_path / "spool", free_port(), allow=["STORESCU"], **kwargs)
        nodes.append(node)
        return node
    yield make
    for node in nodes:
        node.stop()


@needs_dcmtk
def test_node_notifies_once_per_generation_across_an_outage(node_factory, rsna_sample: Path,  # type: ignore[no-untyped-def]
                                                            tmp_path: Path) -> None:
    """Both receivers down when the study is analysed: the notifications wait (pending, failed in /status),
    are delivered once each when the receivers come up, and a second generation is notified as a correction."""
    hl7_port, fhir_port = free_port(), free_port()
    fhir = FhirReceiver(fhir_port)
    node = node_factory(extra={"notify_hl7": f"127.0.0.1:{hl7_port}", "notify_url": fhir.url}).start()
    (uid, files), = _study(rsna_sample, tmp_path / "dicom").items()
    storescu(node.port, files[:2])
    wait_for(lambda: _status(node.spool)["failed_notifications"] == {"hl7": 1, "fhir": 1}, 60,
             "both notifications to fail while the receivers are down")
    assert _status(node.spool)["pending_notifications"] == {"hl7": 1, "fhir": 1}
    mllp = MLLPReceiver(hl7_port).start()
    fhir.start()
    try:
        wait_for(lambda: _status(node.spool)["pending_notifications"] == {"hl7": 0, "fhir": 0}, 60,
                 "the notifications to be acknowledged")
        assert mllp.control_ids() == [control_id(uid, 1)] and fhir.identifiers() == [control_id(uid, 1)]
        oru = hl7.parse(mllp.messages[0])
        assert str(oru.segment("ZDS")[1][0][0]) == uid and str(oru.segment("OBR")[18]) == "ACC202612060"
        assert str(oru.segment("OBR")[5]) == "S"  # the stand-in analysis calls subdural
        assert fhir.posts[0]["basedOn"][0]["identifier"]["value"] == "ACC202612060"
        assert _status(node.spool)["failed_notifications"] == {"hl7": 0, "fhir": 0}

        storescu(node.port, files[2:])  # one more instance: generation 2, notified once more
        wait_for(lambda: len(mllp.messages) == 2 and len(fhir.posts) == 2, 60, "the second generation's notifications")
        assert mllp.control_ids() == [control_id(uid, 1), control_id(uid, 2)]
        assert str(hl7.parse(mllp.messages[1]).segment("OBR")[25]) == "C"
        assert fhir.posts[1]["status"] == "corrected"
        wait_for(lambda: _status(node.spool)["pending_notifications"] == {"hl7": 0, "fhir": 0}, 30, "the acks")
    finally:
        mllp.stop()
        fhir.stop()
    log = node.log_text()
    assert "notification acknowledged" in log and "not acknowledged" in log
    for value in (uid, *(f"{v}0" for v in PHI.values()), "Doe", "Jane"):
        assert value not in log  # no UID, no patient data in the log


@needs_dcmtk
def test_node_killed_between_send_and_ack_resends_only_unacknowledged(node_factory, rsna_sample: Path,  # type: ignore[no-untyped-def]
                                                                     tmp_path: Path) -> None:
    """kill -9 while the RIS holds its ACK: the restarted node sends the same message again (same control
    ID); once acknowledged, another kill -9 and restart send nothing again."""
    hl7_port = free_port()
    hold = threading.Event()
    mllp = MLLPReceiver(hl7_port, hold=hold).start()
    node = node_factory(extra={"notify_hl7": f"127.0.0.1:{hl7_port}"})
    node.start()
    try:
        studies = _study(rsna_sample, tmp_path / "dicom", n=2)
        (uid1, files1), (uid2, files2) = studies.items()
        storescu(node.port, files1)
        wait_for(lambda: len(mllp.messages) == 1, 60, "the first notification at the receiver")
        node.kill()  # sent, not acknowledged
        hold.set()
        assert _status(node.spool)["pending_notifications"] == {"hl7": 1, "fhir": 0}
        node.start()
        wait_for(lambda: _status(node.spool)["pending_notifications"] == {"hl7": 0, "fhir": 0}, 60,
                 "the resent notification to be acknowledged")
        assert mllp.control_ids() == [control_id(uid1, 1)] * 2
        assert mllp.messages[0] == mllp.messages[1]  # the very same message
        node.kill()  # acknowledged now: not sent again after this restart
        node.start()
        storescu(node.port, files2)  # notifications go oldest first: a resend of the first would come before
        wait_for(lambda: len(mllp.messages) == 3, 60, "the second study's notification")
        assert mllp.control_ids() == [control_id(uid1, 1), control_id(uid1, 1), control_id(uid2, 1)]
    finally:
        hold.set()
        mllp.stop()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--notify-hl7", "ris.local", "notify_hl7 'ris.local': expected HOST:PORT of the RIS's MLLP listener"),
    ("--notify-hl7", "ris:99999", "notify_hl7 'ris:99999': expected HOST:PORT"),
    ("--notify-url", "ftp://ris/fhir", "notify_url 'ftp://ris/fhir': expected http(s)://HOST[:PORT]/path"),
    ("--notify-url", "https://u:p@ris/fhir", "credentials in a URL are refused"),
])
def test_bad_notify_settings_refused(tmp_path: Path, flag: str, value: str, message: str) -> None:
    run = subprocess.run([sys.executable, "-m", "ichdet", "serve", "--bundle", str(tmp_path / "b.ichdet"), "--spool",
                          str(tmp_path / "spool"), "--allow", "X", flag, value], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
