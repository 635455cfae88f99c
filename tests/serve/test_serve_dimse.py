"""The node's DIMSE code against real pynetdicom peers in this process: the order of writes before an
acknowledgement (recorded), and the sender against a destination that answers failure statuses (Orthanc,
the other tests' destination, accepts everything, so it cannot show that a refused result stays pending)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from serve_support import BASIC_TEXT_SR, free_port, make_valid, stand_in_analyser

from ichdet.serve.config import Destination
from ichdet.serve.scp import start_scp
from ichdet.serve.sender import send_files
from ichdet.serve.spool import Spool


@pytest.fixture
def one_instance(rsna_sample: Path, tmp_path: Path) -> pydicom.Dataset:
    src = sorted((rsna_sample / "stage_2_train_images").glob("*.dcm"))[0]
    return make_valid(src, tmp_path / "in.dcm", size=16)


def test_instance_acknowledged_only_after_its_data_and_its_name_are_on_disk(
        one_instance: pydicom.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace
    received = tmp_path / "spool" / "studies" / str(one_instance.StudyInstanceUID) / "received"

    def recording_fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)
        events.append(("fsync", "folder" if target == received else f"file in {target.parent.name}"))

    def recording_replace(src: Any, dst: Any) -> None:
        replace(src, dst)
        events.append(("rename into", Path(dst).parent.name))
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    port = free_port()
    server = start_scp(Spool(tmp_path / "spool"), "ICHDET", "127.0.0.1", port, ["SCU"], lambda uid: None)
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage, str(one_instance.file_meta.TransferSyntaxUID))
        assoc = scu.associate("127.0.0.1", port, ae_title="ICHDET")
        assert assoc.is_established
        status = assoc.send_c_store(one_instance)
        events.append(("acknowledged", hex(status.Status)))
        assoc.release()
    finally:
        server.shutdown()
    assert events == [("fsync", "file in received"), ("rename into", "received"), ("fsync", "folder"),
                      ("acknowledged", "0x0")]


@pytest.fixture
def destination() -> Iterator[tuple[Destination, list[int], list[str]]]:
    """A pynetdicom Storage SCP answering, instance after instance, the statuses the test puts into the list
    (then success); it records the SOP classes it was sent."""
    answers: list[int] = []
    got: list[str] = []

    def handle(event: Any) -> int:
        got.append(str(event.dataset.SOPClassUID))
        return answers.pop(0) if answers else 0x0000
    ae = AE(ae_title="PACS")
    for sop_class in (BASIC_TEXT_SR, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        yield Destination(ae_title="PACS", host="127.0.0.1", port=port), answers, got
    finally:
        server.shutdown()


def _pending(spool: Spool, rsna_sample: Path, tmp_path: Path) -> list[Any]:
    """A committed generation's two result files (SR, SC), pending."""
    src = sorted((rsna_sample / "stage_2_train_images").glob("*.dcm"))[0]
    ds = make_valid(src, tmp_path / "in.dcm", size=16)
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    spool.store(study, sop, (tmp_path / "in.dcm").read_bytes())
    state = spool.state(study)
    work = spool.begin(study, 1, state.received)
    (work / "out").mkdir()
    result = stand_in_analyser()(work / "input", work / "out")
    spool.commit(study, 1, work, state.received, result.json_path, result.dicom_files)
    return spool.pending_sends(study)


@pytest.mark.parametrize(("answers", "sent", "error"), [
    ([], 2, None),
    ([0xB000], 2, None),                                           # a warning: stored (coerced), sent
    ([0xA700], 0, "PACS@127.0.0.1:{port} refused a result (status 0xa700)"),  # out of resources
    ([0x0000, 0xC000], 1, "PACS@127.0.0.1:{port} refused a result (status 0xc000)"),  # cannot understand
    ([0xA900], 0, "PACS@127.0.0.1:{port} refused a result (status 0xa900)"),  # data set does not match SOP class
])
def test_a_result_is_marked_sent_only_when_the_destination_stored_it(
        destination: tuple[Destination, list[int], list[str]], rsna_sample: Path, tmp_path: Path,
        answers: list[int], sent: int, error: str | None) -> None:
    dest, queue, got = destination
    queue.extend(answers)
    spool = Spool(tmp_path / "spool")
    pending = _pending(spool, rsna_sample, tmp_path)
    assert send_files(pending, dest, "ICHDET") == (sent, error and error.format(port=dest.port))
    assert [p.marker.exists() for p in pending] == [i < sent for i in range(2)]
    assert len(spool.pending_sends(pending[0].study_uid)) == 2 - sent
    assert got == [BASIC_TEXT_SR, SecondaryCaptureImageStorage][:len(got)] and len(got) == min(2, sent + 1)


def test_destination_down_leaves_everything_pending(rsna_sample: Path, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    pending = _pending(spool, rsna_sample, tmp_path)
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=free_port())
    assert send_files(pending, dest, "ICHDET") == (0, f"cannot associate with {dest}")
    assert [p.marker.exists() for p in pending] == [False, False]
