"""The DICOM node against real DICOM software: dcmtk's storescu/echoscu and Orthanc as the PACS.

The node runs as a child process (so it can be SIGKILLed) with a stand-in analyser that writes a JSON
result, a text SR and a secondary capture per study; the real analysis runs in test_serve_e2e.py.
"""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request
from pathlib import Path

import pydicom
import pytest
from serve_support import (
    ECHOSCU,
    ORTHANC,
    STORESCU,
    NodeProcess,
    Orthanc,
    analyses,
    free_port,
    make_studies,
    make_valid,
    storescu,
    wait_for,
)

from ichdet.serve.spool import sop_of

needs_dcmtk = pytest.mark.skipif(STORESCU is None or ECHOSCU is None,
                                 reason="dcmtk's storescu/echoscu not installed (apt-get install dcmtk)")
needs_orthanc = pytest.mark.skipif(ORTHANC is None, reason="Orthanc not installed (apt-get install orthanc)")


@pytest.fixture
def node_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    nodes: list[NodeProcess] = []

    def make(**kwargs) -> NodeProcess:  # type: ignore[no-untyped-def]
        kwargs.setdefault("allow", ["STORESCU", "ORTHANC"])
        node = NodeProcess(tmp_path / "spool", kwargs.pop("port", None) or free_port(), **kwargs)
        nodes.append(node)
        return node
    yield make
    for node in nodes:
        node.stop()


def _generations(spool: Path) -> list[Path]:
    return sorted(spool.glob("studies/*/results/gen-*"))


@needs_dcmtk
@pytest.mark.parametrize(("calling", "accepted"), [("STORESCU", True), ("ORTHANC", True), ("INTRUDER", False)])
def test_echo_allow_list(node_factory, calling: str, accepted: bool) -> None:  # type: ignore[no-untyped-def]
    node = node_factory().start()
    assert ECHOSCU is not None
    run = subprocess.run([ECHOSCU, "-aet", calling, "-aec", "ICHDET", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True, timeout=60)
    assert (run.returncode == 0) is accepted, run.stderr
    if not accepted:
        wait_for(lambda: "association from INTRUDER" in node.log_text(), 10, "the rejection in the log")
        assert "rejected" in node.log_text()


@needs_dcmtk
def test_storescu_study_analysed_then_reanalysed_with_more(node_factory, rsna_sample: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "analyses.log"
    node = node_factory(log=log, status_port=free_port()).start()
    (uid, files), = make_studies(rsna_sample, tmp_path / "dicom", n=1, slices=7).items()
    storescu(node.port, files[:5])
    wait_for(lambda: len(_generations(node.spool)) == 1, 60, "the first analysis")
    received = sorted(p.name for p in (node.spool / "studies" / uid / "received").iterdir())
    assert sorted(map(sop_of, received)) == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files[:5])
    assert analyses(log) == [(uid, 5)]
    assert json.loads((node.spool / "outbox" / f"{uid}.gen-0001.json").read_text())["studies"][0]["study_uid"] == uid
    storescu(node.port, files[5:])  # two more instances after the analysis: a second generation, all 7
    wait_for(lambda: len(_generations(node.spool)) == 2, 60, "the second analysis")
    assert analyses(log) == [(uid, 5), (uid, 7)]
    with urllib.request.urlopen(f"http://127.0.0.1:{node.status_port}/status", timeout=10) as resp:
        status = json.loads(resp.read())
    with urllib.request.urlopen(f"http://127.0.0.1:{node.status_port}/health", timeout=10) as resp:
        assert resp.read() == b"ok\n"
    assert (status["studies"], status["analysed"], status["instances"], status["running"]) == (1, 1, 7, True)
    assert uid not in node.log_text()  # logs name studies by a hash, never by UID


@needs_dcmtk
@pytest.mark.parametrize(("change", "reason"), [
    ({"StudyInstanceUID": "ID_134d398b61"}, "Study Instance UID 'ID_134d398b61' is not a valid UID"),
    ({"Modality": "MR"}, "Modality is 'MR', not CT"),
])
def test_bad_instance_quarantined(node_factory, rsna_sample: Path, tmp_path: Path, change: dict[str, str],  # type: ignore[no-untyped-def]
                                  reason: str) -> None:
    node = node_factory().start()
    src = next((rsna_sample / "stage_2_train_images").glob("*.dcm"))
    ds = make_valid(src, tmp_path / "bad.dcm", size=16)
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    run = storescu(node.port, [tmp_path / "bad.dcm"], check=False)
    assert "Cannot understand" in run.stderr or run.returncode != 0, run.stderr
    reasons = [p.read_text().strip() for p in (node.spool / "quarantine").glob("*.reason.txt")]
    assert reasons == [reason]
    assert list((node.spool / "studies").iterdir()) == []
    echo = subprocess.run([str(ECHOSCU), "-aet", "STORESCU", "-aec", "ICHDET", "127.0.0.1", str(node.port)],
                          capture_output=True, timeout=60)
    assert echo.returncode == 0  # still alive


@needs_orthanc
def test_orthanc_round_trip(node_factory, rsna_sample: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Orthanc sends two real studies (full size) to the node and ends up holding the results in them."""
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", node_port)
    node = node_factory(port=node_port, send_to=f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
                        log=tmp_path / "a.log").start()
    pacs.start()
    try:
        studies = make_studies(rsna_sample, tmp_path / "dicom", n=2, slices=40, size=None)
        ids = pacs.upload([f for files in studies.values() for f in files])
        pacs.send_to_node(ids)
        for study_id in sorted(ids):
            wait_for(lambda sid=study_id: {"SR", "OT"} <= set(pacs.modalities(sid)), 120,
                     "ichdet's SR and SC in Orthanc")
        counts = sorted((uid, n) for uid, n in analyses(tmp_path / "a.log"))
        assert counts == sorted((uid, len(files)) for uid, files in studies.items())
        for study_id in ids:
            assert pacs.modalities(study_id).count("SR") == 1
        assert sorted(p.name for p in (node.spool / "outbox").iterdir()) == sorted(
            f"{uid}.gen-0001.json" for uid in studies)
    finally:
        pacs.stop()


@needs_dcmtk
def test_load_20_studies_concurrently(node_factory, rsna_sample: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "analyses.log"
    node = node_factory(log=log).start()
    studies = make_studies(rsna_sample, tmp_path / "dicom", n=20, slices=4, size=16)
    batches = [[f for files in list(studies.values())[i::4] for f in files] for i in range(4)]
    threads = [threading.Thread(target=storescu, args=(node.port, batch)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: len(_generations(node.spool)) >= 20, 120, "20 analyses")
    assert sorted(analyses(log)) == sorted((uid, 4) for uid in studies)
    assert sorted(p.name for p in (node.spool / "studies").iterdir()) == sorted(studies)


@needs_dcmtk
def test_kill_while_receiving(node_factory, rsna_sample: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL during a transfer: what was acknowledged survives; after a restart and a resend, one analysis each."""
    log = tmp_path / "analyses.log"
    node = node_factory(log=log, quiet=8.0).start()  # longer than a restart on a loaded machine
    studies = make_studies(rsna_sample, tmp_path / "dicom", n=3, slices=40, size=None)
    files = [f for fs in studies.values() for f in fs]

    def received() -> list[Path]:  # renamed into place: not a killed writer's hidden temporary (.name.hex.tmp.dcm)
        return sorted(p for p in node.spool.glob("studies/*/received/*.dcm") if not p.name.startswith("."))
    sender = threading.Thread(target=storescu, args=(node.port, files), kwargs={"check": False})
    sender.start()
    wait_for(lambda: len(received()) >= 3, 60, "some instances")
    node.kill()
    sender.join()
    kept = received()
    assert 3 <= len(kept) < len(files)
    for path in kept:  # every acknowledged instance is complete
        assert pydicom.dcmread(path).pixel_array.shape == (512, 512)
    node.start()
    storescu(node.port, files)  # the sender retries everything
    wait_for(lambda: len(analyses(log)) >= 3, 90, "the analyses")
    assert sorted(analyses(log)) == sorted((uid, len(fs)) for uid, fs in studies.items())
    assert not list(node.spool.glob("studies/*/received/.*"))  # no temporary file left behind


@needs_orthanc
def test_kill_while_analysing_then_destination_down(node_factory, rsna_sample: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL in the middle of an analysis, destination down: after a restart one analysis, and the results
    reach the destination once it is back."""
    log = tmp_path / "analyses.log"
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", node_port)
    node = node_factory(port=node_port, log=log, seconds=3.0,
                        send_to=f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}").start()
    (uid, files), = make_studies(rsna_sample, tmp_path / "dicom", n=1, slices=6, size=16).items()
    storescu(node.port, files, calling="ORTHANC")
    wait_for(lambda: log.exists() and "start" in log.read_text(), 60, "the analysis to start")
    node.kill()
    assert analyses(log) == [] and _generations(node.spool) == []
    node.args[-1] = "0"  # the restarted node analyses at once
    node.start()
    wait_for(lambda: _generations(node.spool), 60, "the analysis after the restart")
    assert analyses(log) == [(uid, 6)]
    pending = json.loads(subprocess.run([*node.args[:1], "-m", "ichdet", "serve", "--status", "--spool",
                                         str(node.spool)], capture_output=True, text=True, check=True,
                                        env={"PYTHONPATH": str(Path(__file__).parents[2] / "src")}).stdout)
    assert pending["pending_sends"] == 2
    node.kill()  # killed again with the sends pending: they are on disk
    node.start()
    pacs.start()  # the destination comes back
    try:
        wait_for(lambda: pacs.rest("GET", "/studies"), 60, "the results in Orthanc")
        (study_id,) = pacs.rest("GET", "/studies")
        wait_for(lambda: sorted(pacs.modalities(study_id)) == ["OT", "SR"], 60, "the SR and the SC")
        assert analyses(log) == [(uid, 6)]
    finally:
        pacs.stop()


@needs_dcmtk
def test_association_to_another_called_ae_title_is_rejected(node_factory) -> None:  # type: ignore[no-untyped-def]
    node = node_factory().start()
    assert ECHOSCU is not None
    run = subprocess.run([ECHOSCU, "-aet", "STORESCU", "-aec", "OTHERNODE", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "Called AE Title Not Recognized" in run.stderr, run.stderr
    wait_for(lambda: "rejected: called AE title 'OTHERNODE'" in node.log_text(), 10, "the rejection in the log")


@needs_dcmtk
def test_instance_the_analysis_would_refuse_is_refused_and_the_rest_analysed(node_factory, rsna_sample: Path,  # type: ignore[no-untyped-def]
                                                                             tmp_path: Path) -> None:
    log = tmp_path / "analyses.log"
    node = node_factory(log=log).start()
    (uid, files), = make_studies(rsna_sample, tmp_path / "dicom", n=1, slices=6, size=16).items()
    huge = pydicom.dcmread(files[0])
    huge.Rows = huge.Columns = 40000  # claims 40000 x 40000 (the pixel data stays small)
    huge.SOPInstanceUID = huge.file_meta.MediaStorageSOPInstanceUID = "1.2.3.40000"
    huge.save_as(tmp_path / "huge.dcm", enforce_file_format=True)
    run = storescu(node.port, [tmp_path / "huge.dcm", *files], check=False, options=("-v", "--no-halt"))
    assert run.stderr.count("Received Store Response (Error: CannotUnderstand)") == 1, run.stderr
    assert run.stderr.count("Received Store Response (Success)") == 6, run.stderr
    wait_for(lambda: _generations(node.spool), 60, "the analysis of the other instances")
    assert analyses(log) == [(uid, 6)]
    reasons = [p.read_text() for p in (node.spool / "quarantine").glob("*.reason.txt")]
    assert len(reasons) == 1 and reasons[0].startswith("image too large: 40000 x 40000 pixels")
    assert "refused an instance from STORESCU (0xC000)" in node.log_text()


@needs_dcmtk
def test_full_disk_answers_out_of_resources(node_factory, rsna_sample: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A write the file system refuses (RLIMIT_FSIZE: EFBIG, as a full disk) is answered 0xA700 with one clean
    log line (no traceback, no UID); smaller instances are still taken."""
    log = tmp_path / "analyses.log"
    node = node_factory(log=log, file_size_limit=200_000).start()
    (uid, big), = make_studies(rsna_sample, tmp_path / "big", n=1, slices=1, size=None).items()  # 512 x 512
    run = storescu(node.port, big, check=False, options=("-v",))
    assert "Received Store Response (Refused: OutOfResources)" in run.stderr, run.stderr
    wait_for(lambda: "answered 0xA700" in node.log_text(), 10, "the refusal in the log")
    text = node.log_text()
    assert "cannot keep an instance from STORESCU (File too large): answered 0xA700 (out of resources)" in text
    assert "Traceback" not in text and uid not in text
    (small_uid, small), = make_studies(rsna_sample, tmp_path / "small", n=1, slices=3, size=16).items()
    storescu(node.port, small)
    wait_for(lambda: analyses(log), 60, "the analysis of the small study")
    assert analyses(log) == [(small_uid, 3)]


@needs_dcmtk
def test_resent_instance_with_other_pixels_is_analysed_again(node_factory, rsna_sample: Path,  # type: ignore[no-untyped-def]
                                                             tmp_path: Path) -> None:
    log = tmp_path / "analyses.log"
    node = node_factory(log=log).start()
    (uid, files), = make_studies(rsna_sample, tmp_path / "dicom", n=1, slices=3, size=16).items()
    storescu(node.port, files)
    wait_for(lambda: len(_generations(node.spool)) == 1, 60, "the first analysis")
    changed = pydicom.dcmread(files[1])
    changed.PixelData = bytes(len(changed.PixelData))  # the same SOP Instance UID, other pixels
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    storescu(node.port, [tmp_path / "changed.dcm"])
    wait_for(lambda: len(_generations(node.spool)) == 2, 60, "the analysis of the changed study")
    assert analyses(log) == [(uid, 3), (uid, 3)]
    (kept,) = (node.spool / "studies" / uid / "received").glob(f"{changed.SOPInstanceUID}_*.dcm")
    assert pydicom.dcmread(kept).PixelData == changed.PixelData != pydicom.dcmread(files[1]).PixelData
