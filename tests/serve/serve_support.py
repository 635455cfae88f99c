"""Helpers for the DICOM node's tests: valid DICOM from the RSNA sample, a stand-in analyser, the node as a
child process, Orthanc as the PACS, dcmtk as a second client. Imported by tests/test_serve_*.py."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from ichdet.serve.analysis import AnalysisResult

REPO = Path(__file__).resolve().parents[2]
# dcmtk's switch for TCP_NODELAY: with Nagle's algorithm each instance waits for a delayed ACK (~20/s)
os.environ.setdefault("TCP_NODELAY", "1")
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
STORESCU, ECHOSCU, STORESCP = shutil.which("storescu"), shutil.which("echoscu"), shutil.which("storescp")
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
#: Orthanc's DICOMweb plugin (Debian orthanc-dicomweb installs it here).
DICOMWEB_PLUGIN = next((str(p) for p in (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                                         *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")))
                        if p.exists()), None)

#: Type 2 elements of the CT image IOD's modules that the RSNA files lack: present, empty.
TYPE2_EMPTY = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
               "AccessionNumber", "StudyID", "SeriesNumber", "InstanceNumber", "Laterality", "PatientOrientation",
               "KVP", "AcquisitionNumber", "Manufacturer", "ContentDate", "ContentTime", "PositionReferenceIndicator")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_uid(old: str, salt: str = "") -> str:
    """The valid UID an ``ID_...`` value maps to: the same old value (and salt) always gives the same UID."""
    return str(generate_uid(entropy_srcs=[salt, old]))


def make_valid(src: Path, dst: Path, salt: str = "", size: int | None = None) -> Dataset:
    """Write ``src`` (an RSNA file) to ``dst`` as valid CT Image Storage: new UIDs mapped consistently, the
    SOP class, ImageType, and the missing type 2 elements empty; ``size`` crops the pixels (quicker tests)."""
    ds = pydicom.dcmread(src)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, new_uid(str(ds.data_element(keyword).value), salt))
    ds.FrameOfReferenceUID = new_uid("for-" + str(ds.data_element("StudyInstanceUID").value), salt)
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    for keyword in TYPE2_EMPTY:
        if keyword not in ds:
            setattr(ds, keyword, "" if keyword not in ("SeriesNumber", "InstanceNumber") else None)
    if size is not None:
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:size, :size]).tobytes()
        ds.Rows = ds.Columns = size
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return ds


def sample_studies(rsna: Path) -> dict[str, list[Path]]:
    """The RSNA sample's files grouped by (old) Study Instance UID, sorted by name."""
    studies: dict[str, list[Path]] = {}
    for folder in ("stage_2_train_images", "stage_2_test_images"):
        for path in sorted((rsna / folder).glob("*.dcm")):
            uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                      .data_element("StudyInstanceUID").value)
            studies.setdefault(uid, []).append(path)
    return dict(sorted(studies.items()))


def make_studies(rsna: Path, out: Path, n: int, slices: int, size: int | None = 64) -> dict[str, list[Path]]:
    """``n`` valid studies of ``slices`` instances each (copies of the sample's studies under new UIDs)."""
    sources = list(sample_studies(rsna).values())
    made: dict[str, list[Path]] = {}
    for k in range(n):
        files = []
        for src in sources[k % len(sources)][:slices]:
            ds = make_valid(src, out / f"s{k:02d}" / src.name, salt=f"copy{k}", size=size)
            files.append(out / f"s{k:02d}" / src.name)
        made[str(ds.StudyInstanceUID)] = files
    return made


# -- the stand-in analyser (the real one is ichdet.serve.analyse_study, exercised in test_serve_e2e.py) --

def _derived(ref: Dataset, sop_class: str, modality: str, series_uid: str) -> Dataset:
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName", "AccessionNumber", "StudyID"):
        setattr(ds, keyword, ref.get(keyword, ""))
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = series_uid, modality, 900, 1
    ds.SeriesDescription = "ichdet stand-in result, not for diagnostic use"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


#: The study summary every stand-in analysis reports (docs/study-result.md): subdural called, so the study is flagged.
STAND_IN_SUMMARY = {
    "analysed": True, "hemorrhage": True,
    "probability": {"epidural": 0.01, "intraparenchymal": 0.02, "intraventricular": 0.03, "subarachnoid": 0.04,
                    "subdural": 0.91, "any": 0.93},
    "thresholds": {"epidural": 0.2, "intraparenchymal": 0.2, "intraventricular": 0.2, "subarachnoid": 0.2,
                   "subdural": 0.3, "any": 0.5},
    "called": {"epidural": False, "intraparenchymal": False, "intraventricular": False, "subarachnoid": False,
               "subdural": True, "any": True},
}


def stand_in_analyser(log: Path | None = None, seconds: float = 0.0) -> Callable[[Path, Path], AnalysisResult]:
    """Writes a JSON result, a text SR and an 8x8 secondary capture per study; appends one line per call to
    ``log`` (study UID, instance count) so tests can count analyses; takes ``seconds`` (to be killed in)."""
    def analyse(study_dir: Path, out_dir: Path) -> AnalysisResult:
        files = sorted(study_dir.iterdir())
        ref = pydicom.dcmread(files[0], stop_before_pixels=True)
        if log is not None:
            with log.open("a") as fh:
                fh.write(f"start {ref.StudyInstanceUID} {len(files)}\n")
        time.sleep(seconds)
        sr = _derived(ref, BASIC_TEXT_SR, "SR", generate_uid())
        sr.ValueType, sr.CompletionFlag, sr.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
        sr.ContentDate = sr.ContentTime = ""
        sc = _derived(ref, SecondaryCaptureImageStorage, "OT", generate_uid())
        sc.ConversionType, sc.SamplesPerPixel, sc.PhotometricInterpretation = "WSD", 1, "MONOCHROME2"
        sc.Rows = sc.Columns = 8
        sc.BitsAllocated, sc.BitsStored, sc.HighBit, sc.PixelRepresentation = 8, 8, 7, 0
        sc.PixelData = bytes(range(64))
        (out_dir / "dicom").mkdir()
        paths = [out_dir / "dicom" / "sr.dcm", out_dir / "dicom" / "sc.dcm"]
        sr.save_as(paths[0], enforce_file_format=True)
        sc.save_as(paths[1], enforce_file_format=True)
        result = {"studies": [{"study_uid": str(ref.StudyInstanceUID), "n_instances": len(files),
                               "study_instance_uid": str(ref.StudyInstanceUID), "series": [],
                               "summary": STAND_IN_SUMMARY}]}
        (out_dir / "result.json").write_text(json.dumps(result))
        if log is not None:
            with log.open("a") as fh:
                fh.write(f"done {ref.StudyInstanceUID} {len(files)}\n")
        return AnalysisResult(out_dir / "result.json", paths)
    return analyse


def analyses(log: Path) -> list[tuple[str, int]]:
    """The finished analyses a stand-in logged: (study UID, instances)."""
    if not log.exists():
        return []
    return [(p[1], int(p[2])) for p in (line.split() for line in log.read_text().splitlines()) if p[0] == "done"]


# -- processes ---------------------------------------------------------------------------------------------

def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_port(port: int, timeout: float = 30) -> None:
    """Wait until something listens on ``127.0.0.1:port``."""
    def up() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0
    wait_for(up, timeout, f"a listener on port {port}", 0.1)


class NodeProcess:
    """``ichdet serve`` with the stand-in analyser as a child process (so that tests can SIGKILL it)."""

    def __init__(self, spool: Path, port: int, allow: list[str], send_to: str | None = None,
                 log: Path | None = None, seconds: float = 0.0, quiet: float = 1.0,
                 status_port: int | None = None, file_size_limit: int | None = None,
                 tls: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.spool, self.port, self.status_port, self.env = spool, port, status_port, env or {}
        self.config = spool.parent / f"{spool.name}.serve.yaml"
        settings = {"bundle": "unused-by-the-stand-in", "spool": str(spool), "port": port, "allow": allow,
                    "quiet_seconds": quiet, "host": "127.0.0.1", "retry_initial_seconds": 0.5,
                    "retry_max_seconds": 2.0, "send_to": send_to, "status_port": status_port, **(tls or {}),
                    **(extra or {})}
        self.config.write_text(yaml.safe_dump({k: v for k, v in settings.items() if v is not None}))
        self.args = [sys.executable, str(Path(__file__).with_name("serve_node.py")), str(self.config),
                     str(log or ""), str(seconds)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = spool.parent / f"{spool.name}.stderr.log"
        self.file_size_limit = file_size_limit  # RLIMIT_FSIZE: every larger write fails as on a full disk

    def start(self) -> NodeProcess:
        env = {**os.environ, **self.env,
               "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        limit = self.file_size_limit
        self.proc = subprocess.Popen(self.args, env=env, stderr=self.stderr.open("ab"), preexec_fn=None if limit is None
                                     else lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        wait_port(self.port)
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""


def make_tls(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A CA and a server certificate for ``host`` signed by it, made by openssl: (PEM of the server's key and
    certificate, PEM of the CA)."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=ichdet test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj",
            f"/CN={host}")
    (folder / "san.ext").write_text(f"subjectAltName=IP:{host}\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "server.pem", "-days", "2", "-extfile", "san.ext")
    both = (folder / "server.key").read_text() + (folder / "server.pem").read_text()
    (folder / "server-with-key.pem").write_text(both)  # Orthanc reads key and certificate from one file
    return folder / "server-with-key.pem", folder / "ca.pem"


class TlsProxy:
    """TLS in front of a plain-HTTP server on loopback (what nginx or stunnel does in a deployment), with the
    certificate of :func:`make_tls`. Debian 12's Orthanc 1.10.1 crashes (civetweb segfault) on its first HTTPS
    request with its own ``SslEnabled``, so https tests put this in front of it."""

    def __init__(self, cert_with_key: Path, target_port: int) -> None:
        self.target_port = target_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_with_key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):  # e.g. a client that does not trust the certificate
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        back = threading.Thread(target=pipe, args=(upstream, tls), daemon=True)
        back.start()
        pipe(tls, upstream)
        back.join()
        tls.close()
        upstream.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()


def storescu(port: int, files: list[Path], calling: str = "STORESCU", called: str = "ICHDET",
             check: bool = True, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu: send ``files`` in one association (``options``: e.g. ``-v``, TLS switches)."""
    assert STORESCU is not None
    cmd = [STORESCU, *options, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=300)


class Orthanc:
    """Debian's Orthanc on free loopback ports with its own storage, knowing the node as modality "ichdet".

    ``dicomweb``: load the DICOMweb plugin (root ``/dicom-web/``); ``users``: basic auth on (user -> password)
    for the REST API and DICOMweb alike.
    """

    def __init__(self, root: Path, node_port: int, aet: str = "ORTHANC", dicomweb: bool = False,
                 users: dict[str, str] | None = None) -> None:
        self.root, self.aet, self.users = root, aet, users
        self.http_port, self.dicom_port = free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {"Name": "ichdet-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
                  "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
                  "DicomModalities": {"ichdet": {"AET": "ICHDET", "Host": "127.0.0.1", "Port": node_port}},
                  "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "HttpServerEnabled": True,
                  "StableAge": 1, "ConcurrentJobs": 2}
        if dicomweb:
            assert DICOMWEB_PLUGIN is not None
            config.update(Plugins=[DICOMWEB_PLUGIN], DicomWeb={"Enable": True, "Root": "/dicom-web/"})
        if users:
            config.update(AuthenticationEnabled=True, RegisteredUsers=users)
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        assert ORTHANC is not None
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=log, stderr=log)
        wait_port(self.http_port)
        wait_port(self.dicom_port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def rest(self, method: str, path: str, body: bytes | dict[str, Any] | list[Any] | None = None) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict | list) else body
        req = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=300) as resp:
            return json.loads(resp.read() or b"null")

    @property
    def base(self) -> str:
        """The REST API's URL."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb base URL (with ``dicomweb=True``)."""
        return f"{self.base}/dicom-web"

    def upload(self, files: list[Path]) -> set[str]:
        """POST every file to /instances; return Orthanc's study ids."""
        return {self.rest("POST", "/instances", f.read_bytes())["ParentStudy"] for f in files}

    def send_to_node(self, study_ids: set[str]) -> None:
        self.rest("POST", "/modalities/ichdet/store", {"Resources": sorted(study_ids), "Synchronous": True})

    def modalities(self, study_id: str) -> list[str]:
        """The Modality of every instance Orthanc holds in the study (sorted)."""
        instances = self.rest("GET", f"/studies/{study_id}/instances?expand")
        series = {s["ID"]: s["MainDicomTags"].get("Modality", "")
                  for s in self.rest("GET", f"/studies/{study_id}/series?expand")}
        return sorted(series[i["ParentSeries"]] for i in instances)


def iter_due(spool: Path) -> Iterator[Path]:
    """Every committed generation folder in a spool."""
    yield from sorted(spool.glob("studies/*/results/gen-*"))
