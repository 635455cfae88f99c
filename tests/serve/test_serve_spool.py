"""The node's on-disk state: when a study is due, generations, pending sends, recovery, clean-up; the
instance checks, the back-off, and the worker's handling of a failed analysis (no network here)."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from serve_support import REPO, stand_in_analyser
from typer.testing import CliRunner

from ichdet.cli import app
from ichdet.errors import IchdetError
from ichdet.serve import Node, ServeConfig, Spool, StudyState, spool_status
from ichdet.serve.analysis import AnalysisResult
from ichdet.serve.scp import check_instance
from ichdet.serve.sender import Backoff
from ichdet.serve.spool import sop_of, study_key

A, B, C = "a.dcm", "b.dcm", "c.dcm"


def _state(received: set[str], last: set[str] = frozenset(), failed: set[str] = frozenset(),  # type: ignore[assignment]
           arrival: float = 100.0) -> StudyState:
    return StudyState("1.2.3", frozenset(received), arrival, (1,) if last else (), frozenset(last), frozenset(failed))


@pytest.mark.parametrize(("state", "now", "due"), [
    (_state({A, B}), 110.0, True),              # quiet for 10 s
    (_state({A, B}), 105.0, False),             # still receiving
    (_state(set()), 200.0, False),              # nothing received
    (_state({A, B}, last={A, B}), 200.0, False),  # analysed already
    (_state({A, B, C}, last={A, B}), 200.0, True),  # more instances after the analysis
    (_state({A, B}, failed={A, B}), 200.0, False),  # failed on exactly these: wait for new instances
    (_state({A, B, C}, failed={A, B}), 200.0, True),
])
def test_is_due(state: StudyState, now: float, due: bool) -> None:
    assert state.is_due(now, quiet_seconds=10.0) is due


def _ct(**changes: object) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SOPInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "CT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0\0"
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(("ds", "sop_class", "reason"), [
    (_ct(), CTImageStorage, None),
    (_ct(), MRImageStorage, f"SOP class {MRImageStorage} is not CT image storage"),
    (_ct(StudyInstanceUID="ID_134d398b61"), CTImageStorage, "Study Instance UID 'ID_134d398b61' is not a valid UID"),
    (_ct(SOPInstanceUID="1.02.3"), CTImageStorage, "SOP Instance UID '1.02.3' is not a valid UID"),
    (_ct(Modality="MR"), CTImageStorage, "Modality is 'MR', not CT"),
    # what the analysis would refuse before decoding (ichdet.dicom.read): refused before acknowledging
    (_ct(Rows=40000, Columns=40000), CTImageStorage,
     "image too large: 40000 x 40000 pixels x 1 frame(s) x 2 byte(s) (padded square 40000^2) is over the limit of "
     "16777216 16-bit pixels; skipped before decoding (raise --max-pixels if the file is genuine)"),
    (_ct(Rows=1, Columns=65535), CTImageStorage,
     "image too large: 1 x 65535 pixels x 1 frame(s) x 2 byte(s) (padded square 65535^2) is over the limit of "
     "16777216 16-bit pixels; skipped before decoding (raise --max-pixels if the file is genuine)"),
    (_ct(NumberOfFrames=3), CTImageStorage, "unsupported NumberOfFrames 3: only single-frame 2-D slices are read"),
    (_ct(SamplesPerPixel=3, PhotometricInterpretation="RGB"), CTImageStorage,
     "unsupported image type (PhotometricInterpretation 'RGB', SamplesPerPixel 3): only MONOCHROME1/2 grey-level CT "
     "slices are read"),
    (_ct(RescaleSlope=0), CTImageStorage, "unusable RescaleSlope 0.0 / RescaleIntercept 0.0 (must be finite, slope "
     "not 0): the image would be blank; fix the header or skip the file"),
])
def test_check_instance(ds: Dataset, sop_class: str, reason: str | None) -> None:
    assert check_instance(ds, sop_class) == reason


def test_check_instance_no_pixels() -> None:
    ds = _ct()
    del ds.PixelData
    assert check_instance(ds, CTImageStorage) == "no pixel data"


@pytest.mark.parametrize(("outcomes", "delay"), [
    ([], 0.0), ([False], 1.0), ([False, False], 2.0), ([False] * 3, 4.0), ([False] * 10, 5.0), ([False, True], 0.0),
])
def test_backoff(outcomes: list[bool], delay: float) -> None:
    backoff = Backoff(initial=1.0, maximum=5.0)
    for ok in outcomes:
        backoff.record(ok)
    assert backoff.delay() == delay


def _sops(names: Iterable[str]) -> list[str]:
    """The SOP Instance UIDs of received files' names, sorted."""
    return sorted(sop_of(name) for name in names)


def _encoded(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file's bytes (what the SCP spools)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _receive(spool: Spool, study: str, names: list[str]) -> None:
    """Spool tiny CT instances (header and two pixel bytes) named ``names`` in ``study``."""
    for name in names:
        ds = _ct(StudyInstanceUID=study, SOPInstanceUID=name, SOPClassUID=CTImageStorage)
        spool.store(study, name, _encoded(ds))
    # the tests' quiet time is 1 ms: let it pass, so a scan right after this call finds the study settled
    # (file times can be fine-grained: on a fast machine the next scan can come within the millisecond)
    time.sleep(0.01)


def test_generation_life_cycle(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    _receive(spool, "1.2.3", ["1.1", "1.2"])
    state = spool.state("1.2.3")
    assert (_sops(state.received), state.next_generation, state.needs_analysis()) == (["1.1", "1.2"], 1, True)
    work = spool.begin("1.2.3", 1, state.received)
    _receive(spool, "1.2.3", ["1.3"])  # arrives during the analysis: not in this generation's input
    assert _sops(p.name for p in (work / "input").iterdir()) == ["1.1", "1.2"]
    (work / "out").mkdir()
    result = stand_in_analyser()(work / "input", work / "out")
    spool.commit("1.2.3", 1, work, state.received, result.json_path, result.dicom_files)
    state = spool.state("1.2.3")
    assert (state.generations, _sops(state.last_inputs), state.needs_analysis()) == ((1,), ["1.1", "1.2"], True)
    assert (tmp_path / "outbox" / "1.2.3.gen-0001.json").is_file()
    pending = spool.pending_sends("1.2.3")
    assert [(p.generation, p.index, p.path.name) for p in pending] == [(1, 0, "sr.dcm"), (1, 1, "sc.dcm")]
    Spool.mark_sent(pending[0])
    assert [p.index for p in spool.pending_sends("1.2.3")] == [1]


def test_recover_removes_half_done_work(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    _receive(spool, "1.2.3", ["1.1"])
    work = spool.begin("1.2.3", 1, spool.state("1.2.3").received)
    (tmp_path / "studies" / "1.2.3" / "received" / ".1.2.dcm.0123456789ab.tmp.dcm").write_text("half")
    assert spool.recover() == 2
    assert not work.exists()
    assert _sops(p.name for p in (tmp_path / "studies" / "1.2.3" / "received").iterdir()) == ["1.1"]


@pytest.mark.parametrize("uid", ["ID_134d398b61", "../etc", "1.2.", ""])
def test_study_uid_must_be_a_uid(tmp_path: Path, uid: str) -> None:
    with pytest.raises(IchdetError, match="is not a valid DICOM UID"):
        Spool(tmp_path).store(uid, "1.2", b"x")


def test_clean_keeps_unsent_and_recent(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for study in ("1.1", "1.2", "1.3"):
        _receive(spool, study, ["9.1"])
    for study in ("1.1", "1.2"):  # analysed; 1.1 fully sent, 1.2 not; 1.3 never analysed
        work = spool.begin(study, 1, spool.state(study).received)
        (work / "out").mkdir()
        result = stand_in_analyser()(work / "input", work / "out")
        spool.commit(study, 1, work, spool.state(study).received, result.json_path, result.dicom_files)
    for send in spool.pending_sends("1.1"):
        Spool.mark_sent(send)
    now = os.path.getmtime(next((tmp_path / "studies" / "1.1" / "received").glob("9.1_*.dcm")))
    assert spool.clean(max_age_days=1, now=now + 3600) == []  # too recent
    assert spool.clean(max_age_days=1, now=now + 2 * 86400) == ["1.1"]
    assert spool.study_uids() == ["1.2", "1.3"]


def test_failed_analysis_recorded_and_not_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken(study_dir: Path, out_dir: Path) -> AnalysisResult:
        raise ValueError("no usable series")
    cfg = ServeConfig(bundle=tmp_path / "b", spool=tmp_path / "spool", allow=["X"], quiet_seconds=0.001)
    node = Node(cfg, broken)
    _receive(node.spool, "1.2.3", ["1.1"])
    assert node.scan() == ["1.2.3"]
    node.analyse(node.queue.get())
    node.in_flight.clear()
    failed = json.loads((tmp_path / "spool" / "studies" / "1.2.3" / "failed-gen-0001.json").read_text())
    assert (_sops(failed["inputs"]), failed["reason"]) == (["1.1"], "ValueError: no usable series")
    assert node.scan() == []  # not retried on the same instances
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"study {study_key('1.2.3')} generation 1: analysis failed (ValueError); the reason is in the study's "
        "failed-gen-0001.json in the spool"]  # no message text: the pipeline's messages quote paths and values
    assert (node.status()["failed"], node.status()["waiting_analysis"]) == (1, 0)
    _receive(node.spool, "1.2.3", ["1.2"])
    assert (node.status()["failed"], node.status()["waiting_analysis"]) == (0, 1)
    assert node.scan() == ["1.2.3"]
    assert node.spool.state("1.2.3").next_generation == 2


def test_results_outside_the_output_folder_are_a_recorded_failure(tmp_path: Path) -> None:
    stray = tmp_path / "elsewhere.dcm"
    stray.write_bytes(b"x")

    def misplaced(study_dir: Path, out_dir: Path) -> AnalysisResult:
        (out_dir / "result.json").write_text("{}")
        return AnalysisResult(out_dir / "result.json", [stray])
    cfg = ServeConfig(bundle=tmp_path / "b", spool=tmp_path / "spool", allow=["X"], quiet_seconds=0.001)
    node = Node(cfg, misplaced)
    _receive(node.spool, "1.2.3", ["1.1"])
    node.analyse(node.scan()[0])
    failed = json.loads((tmp_path / "spool" / "studies" / "1.2.3" / "failed-gen-0001.json").read_text())
    assert failed["reason"].startswith("results not stored: ValueError:")
    assert node.spool.state("1.2.3").generations == ()
    assert not list((tmp_path / "spool" / "studies" / "1.2.3" / "results").iterdir())


def _version(pixel: bytes) -> bytes:
    """One instance (SOP Instance UID 1.1 of study 1.2.3) whose pixel bytes are ``pixel``."""
    return _encoded(_ct(StudyInstanceUID="1.2.3", SOPInstanceUID="1.1", SOPClassUID=CTImageStorage, PixelData=pixel))


def _analyse_all(spool: Spool, study: str) -> None:
    """Commit one generation of what ``study`` holds now (the stand-in analyser)."""
    state = spool.state(study)
    work = spool.begin(study, state.next_generation, state.received)
    (work / "out").mkdir()
    result = stand_in_analyser()(work / "input", work / "out")
    spool.commit(study, state.next_generation, work, state.received, result.json_path, result.dicom_files)


@pytest.mark.parametrize(("resent", "again"), [
    (b"\0\0", False),   # the same bytes again (a PACS retrying): nothing changes, no new analysis
    (b"\7\0", True),    # other pixels under the same SOP Instance UID: a change of the study, analysed again
])
def test_resent_instance_with_other_content_is_a_new_generation(tmp_path: Path, resent: bytes, again: bool) -> None:
    spool = Spool(tmp_path)
    first = spool.store("1.2.3", "1.1", _version(b"\0\0"))
    _analyse_all(spool, "1.2.3")
    assert not spool.state("1.2.3").needs_analysis()
    second = spool.store("1.2.3", "1.1", _version(resent))
    assert spool.state("1.2.3").needs_analysis() is again
    received = sorted(p.name for p in (tmp_path / "studies" / "1.2.3" / "received").iterdir())
    assert received == [second.name]  # one version of each instance: the newest
    assert (second == first) is not again
    assert second.read_bytes() == _version(resent)


def test_recover_keeps_the_newest_version_and_removes_empty_studies(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    old = spool.store("1.2.3", "1.1", _version(b"\0\0"))
    kept = tmp_path / "old-version.dcm"
    os.link(old, kept)
    new = spool.store("1.2.3", "1.1", _version(b"\7\0"))
    os.link(kept, old)  # as a kill between the new version's rename and the old one's removal leaves it
    os.utime(old, ns=(new.stat().st_mtime_ns - 10**9,) * 2)
    (tmp_path / "studies" / "1.2.4" / "received").mkdir(parents=True)  # a full disk before its first instance
    assert spool.recover() == 2
    assert sorted(p.name for p in (tmp_path / "studies" / "1.2.3" / "received").iterdir()) == [new.name]
    assert spool.study_uids() == ["1.2.3"]


def test_status_counts_an_empty_study_folder_apart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    _receive(spool, "1.2.3", ["1.1"])
    _analyse_all(spool, "1.2.3")
    (tmp_path / "studies" / "1.2.4" / "received").mkdir(parents=True)
    (tmp_path / "studies" / "1.2.5").mkdir()
    status = spool_status(spool)
    assert (status["studies"], status["analysed"], status["empty_study_folders"]) == (1, 1, 2)


@pytest.mark.parametrize("config", [False, True])
def test_status_of_a_missing_spool_creates_nothing(tmp_path: Path, config: bool) -> None:
    spool = tmp_path / "var" / "spool"
    args = ["serve", "--status", "--spool", str(spool)]
    if config:  # the sample config names /var/lib/ichdet/spool; a copy names a folder that does not exist
        text = (REPO / "deploy" / "serve.yaml").read_text().replace("/var/lib/ichdet/spool", str(spool))
        (tmp_path / "serve.yaml").write_text(text)
        args = ["serve", "--status", "--config", str(tmp_path / "serve.yaml")]
    result = CliRunner().invoke(app, args)
    assert (result.exit_code, result.output.strip()) == (2, f"error: no spool at {spool}: check --spool (or spool: "
                                                            "in the serve config)")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["serve.yaml"] if config else [])
