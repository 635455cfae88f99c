"""DICOM over TLS: the node with a certificate (and a CA for its callers) against dcmtk's echoscu/storescu
with certificates made here by openssl: a caller certified by the CA is served and its study analysed;
plain TCP, a caller without a certificate and one certified by another CA are refused. The sender over
TLS against a pynetdicom destination that requires TLS."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from serve_support import (
    BASIC_TEXT_SR,
    ECHOSCU,
    STORESCU,
    NodeProcess,
    analyses,
    free_port,
    make_studies,
    storescu,
    wait_for,
)
from test_serve_dimse import _pending

from ichdet.errors import ConfigError
from ichdet.serve.config import Destination
from ichdet.serve.sender import send_files
from ichdet.serve.spool import Spool
from ichdet.serve.tls import client_context, server_context

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None or ECHOSCU is None or STORESCU is None,
                                reason="openssl and dcmtk (apt-get install openssl dcmtk) are needed")


def _openssl(*args: str) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.pem"))


def _cert(folder: Path, name: str, ca: str) -> None:
    """``name``.pem/.key signed by ``ca``, valid for 127.0.0.1 and localhost."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.csr"))
    (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(folder / f"{name}.csr"), "-CA", str(folder / f"{ca}.pem"), "-CAkey",
             str(folder / f"{ca}.key"), "-CAcreateserial", "-days", "2", "-extfile", str(folder / f"{name}.ext"),
             "-out", str(folder / f"{name}.pem"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """site-ca signs node, modality and pacs; other-ca signs intruder."""
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("site-ca", "other-ca"):
        _ca(folder, ca)
    for name, ca in (("node", "site-ca"), ("modality", "site-ca"), ("pacs", "site-ca"), ("intruder", "other-ca")):
        _cert(folder, name, ca)
    return folder


@pytest.fixture
def tls_node(pki: Path, tmp_path: Path) -> Iterator[NodeProcess]:
    tls = {"tls_cert": str(pki / "node.pem"), "tls_key": str(pki / "node.key"), "tls_ca": str(pki / "site-ca.pem")}
    node = NodeProcess(tmp_path / "spool", free_port(), ["STORESCU"], log=tmp_path / "analyses.log", tls=tls)
    yield node.start()
    node.stop()


def _tls(pki: Path, cert: str | None) -> tuple[str, ...]:
    """dcmtk's switches: TLS with ``cert`` (None: TLS without a certificate), trusting the site CA."""
    if cert is None:
        return ("+tla", "+cf", str(pki / "site-ca.pem"))
    return ("+tls", str(pki / f"{cert}.key"), str(pki / f"{cert}.pem"), "+cf", str(pki / "site-ca.pem"))


@pytest.mark.parametrize(("client", "accepted", "logged"), [
    ("modality", True, "accepted over TLSv1."),
    ("intruder", False, "TLS handshake failed (CERTIFICATE_VERIFY_FAILED)"),  # certified by another CA
    (None, False, "TLS handshake failed (PEER_DID_NOT_RETURN_A_CERTIFICATE)"),  # TLS, no certificate
    ("plain", False, "TLS handshake failed (WRONG_VERSION_NUMBER)"),  # plain TCP
])
def test_echo_over_tls(tls_node: NodeProcess, pki: Path, client: str | None, accepted: bool, logged: str) -> None:
    assert ECHOSCU is not None
    options = () if client == "plain" else _tls(pki, client)
    run = subprocess.run([ECHOSCU, *options, "-aet", "STORESCU", "-aec", "ICHDET", "127.0.0.1", str(tls_node.port)],
                         capture_output=True, text=True, timeout=60)
    assert (run.returncode == 0) is accepted, run.stderr
    wait_for(lambda: logged in tls_node.log_text(), 10, f"{logged!r} in the node's log")
    if accepted:
        assert "client certificate CN=modality" in tls_node.log_text()


def test_a_caller_that_stalls_its_handshake_blocks_no_one(tls_node: NodeProcess, pki: Path) -> None:
    """The handshake runs in the association's thread: a connection that sends nothing does not stop the
    listener (pynetdicom alone shakes hands in the listening thread, and waits there)."""
    assert ECHOSCU is not None
    with socket.create_connection(("127.0.0.1", tls_node.port)):  # connected, silent
        run = subprocess.run([ECHOSCU, *_tls(pki, "modality"), "-to", "20", "-ta", "20", "-aet", "STORESCU",
                              "-aec", "ICHDET", "127.0.0.1", str(tls_node.port)], capture_output=True, text=True,
                             timeout=60)
    assert run.returncode == 0, run.stderr


def test_study_over_tls_is_analysed(tls_node: NodeProcess, pki: Path, rsna_sample: Path, tmp_path: Path) -> None:
    (uid, files), = make_studies(rsna_sample, tmp_path / "dicom", n=1, slices=4, size=16).items()
    storescu(tls_node.port, files, options=_tls(pki, "modality"))
    wait_for(lambda: analyses(tmp_path / "analyses.log"), 60, "the analysis")
    assert analyses(tmp_path / "analyses.log") == [(uid, 4)]


@pytest.fixture
def tls_destination(pki: Path) -> Iterator[tuple[Destination, list[str]]]:
    """A pynetdicom Storage SCP that speaks TLS only and requires a client certificate of the site CA."""
    got: list[str] = []

    def handle(event: Any) -> int:
        got.append(str(event.dataset.SOPClassUID))
        return 0x0000
    ae = AE(ae_title="PACS")
    for sop_class in (BASIC_TEXT_SR, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class)
    port = free_port()
    context = server_context(pki / "pacs.pem", pki / "pacs.key", pki / "site-ca.pem")
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=context,
                             evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        yield Destination(ae_title="PACS", host="127.0.0.1", port=port), got
    finally:
        server.shutdown()


@pytest.mark.parametrize(("cert", "ca", "sent"), [
    ("node", "site-ca", 2),
    ("intruder", "site-ca", 0),  # the destination refuses our certificate
    ("node", "other-ca", 0),     # we refuse the destination's certificate
])
def test_send_over_tls(tls_destination: tuple[Destination, list[str]], pki: Path, rsna_sample: Path, tmp_path: Path,
                       cert: str, ca: str, sent: int) -> None:
    dest, got = tls_destination
    pending = _pending(Spool(tmp_path / "spool"), rsna_sample, tmp_path)
    context = client_context(pki / f"{cert}.pem", pki / f"{cert}.key", pki / f"{ca}.pem")
    assert send_files(pending, dest, "ICHDET", tls=context) == (sent, None if sent else f"cannot associate with {dest}")
    assert len(got) == sent
    assert [p.marker.exists() for p in pending] == [sent > 0] * 2


def test_unreadable_certificate_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^TLS: cannot load .*cert.pem, .*cert.pem: .*\(PEM files"):
        server_context(tmp_path / "cert.pem", tmp_path / "cert.pem", None)
