"""DICOMweb both ways against Orthanc with its DICOMweb plugin (Debian orthanc-dicomweb): predict-study and
report on a WADO-RS study URL, results stored back by STOW-RS (--stow), the node sending to a DICOMweb base
URL; the temporary folder of a fetched study always removed; one clean error line for a wrong URL, a server
that is down and refused credentials."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from serve_support import (
    DICOMWEB_PLUGIN,
    ORTHANC,
    REPO,
    STORESCU,
    NodeProcess,
    Orthanc,
    TlsProxy,
    free_port,
    make_studies,
    make_tls,
    make_valid,
    sample_studies,
    storescu,
    wait_for,
)
from study_support import tiny_runs
from typer.testing import CliRunner

from ichdet.cli import app
from ichdet.dicom.web import WebAuth, parse_base_url, parse_study_url
from ichdet.errors import IchdetError
from ichdet.infer.bundle import write_bundle

needs_dicomweb = pytest.mark.skipif(ORTHANC is None or DICOMWEB_PLUGIN is None,
                                    reason="Orthanc's DICOMweb plugin not installed (apt-get install orthanc "
                                           "orthanc-dicomweb)")
USERS = {"ichdet": "not-a-real-secret-42"}
CREDENTIALS = {"ICHDET_DICOMWEB_USER": "ichdet", "ICHDET_DICOMWEB_PASSWORD": USERS["ichdet"]}


# -- addresses and credentials ---------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "expected"), [
    ("http://pacs:8042/dicom-web/studies/1.2.840.5", ("http://pacs:8042/dicom-web", "1.2.840.5")),
    ("https://h.example/a/b/dicomweb/studies/1.2.3/", ("https://h.example/a/b/dicomweb", "1.2.3")),
    ("http://pacs/studies/1.2", ("http://pacs", "1.2")),
])
def test_parse_study_url(url: str, expected: tuple[str, str]) -> None:
    assert parse_study_url(url) == expected


@pytest.mark.parametrize(("url", "message"), [
    ("http://pacs:8042/dicom-web/studies/ID_1234", "study URL: expected http(s)://HOST[:PORT]/<path>/studies/"),
    ("http://pacs:8042/dicom-web/studies/1.02.3", "study URL: expected"),
    ("http://pacs:8042/dicom-web/studies/1.2/series/3.4", "study URL: expected"),
    ("http://u:secret@pacs/dicom-web/studies/1.2", "credentials in a URL are refused"),
    ("http:///dicom-web/studies/1.2", "no host"),
])
def test_parse_study_url_refuses(url: str, message: str) -> None:
    with pytest.raises(IchdetError, match=re.escape(message)) as err:
        parse_study_url(url)
    assert "secret" not in str(err.value) and "ID_1234" not in str(err.value)


@pytest.mark.parametrize(("url", "result"), [
    ("http://pacs:8042/dicom-web/", "http://pacs:8042/dicom-web"),
    ("https://pacs/dicom-web", "https://pacs/dicom-web"),
    ("ftp://pacs/dicom-web", "expected http(s)://HOST[:PORT]/path"),
    ("http://pacs/dicom-web/studies/1.2", "give the base URL (up to /dicom-web), not a study's URL"),
    ("https://bob:pw@pacs/dicom-web", "credentials in a URL are refused"),
])
def test_parse_base_url(url: str, result: str) -> None:
    if result.startswith("http"):
        assert parse_base_url(url) == result
    else:
        with pytest.raises(IchdetError) as err:
            parse_base_url(url)
        assert result in str(err.value) and "pw" not in str(err.value)


@pytest.mark.parametrize(("env", "kind", "message"), [
    ({}, None, None),
    ({"ICHDET_DICOMWEB_TOKEN": "tok"}, "bearer", None),
    ({"ICHDET_DICOMWEB_USER": "u", "ICHDET_DICOMWEB_PASSWORD": "p"}, "basic", None),
    ({"ICHDET_DICOMWEB_USER": "u"}, None, "a user needs a password"),
    ({"ICHDET_DICOMWEB_TOKEN": "tok", "ICHDET_DICOMWEB_USER": "u", "ICHDET_DICOMWEB_PASSWORD": "p"}, None,
     "a bearer token and a user/password are both set"),
])
def test_credentials_from_the_environment(env: dict[str, str], kind: str | None, message: str | None) -> None:
    if message is not None:
        with pytest.raises(IchdetError, match=message):
            WebAuth.from_env(environ=env)
        return
    auth = WebAuth.from_env(environ=env)
    session = auth.session()
    assert session.verify is True
    assert (session.headers.get("Authorization"), session.auth) == {
        None: (None, None), "bearer": ("Bearer tok", None), "basic": (None, ("u", "p"))}[kind]
    assert "tok" not in repr(auth) and "'p'" not in repr(auth)


# -- predict-study / report on a WADO-RS URL, --stow ----------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    a, _, _ = tiny_runs(tmp_path_factory)
    return write_bundle([a], tmp_path_factory.mktemp("web_bundle") / "model.ichdet")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Orthanc with DICOMweb and basic auth on, for the tests of this module."""
    if ORTHANC is None or DICOMWEB_PLUGIN is None:
        pytest.skip("Orthanc's DICOMweb plugin not installed (apt-get install orthanc orthanc-dicomweb)")
    server = Orthanc(tmp_path_factory.mktemp("web_pacs") / "orthanc", free_port(), dicomweb=True, users=USERS).start()
    yield server
    server.stop()


@pytest.fixture
def pacs(orthanc: Orthanc, rsna_sample: Path, tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Orthanc holding a study of 10 slices of its own (new UIDs for each test); yields (orthanc, study UID)."""
    source = next(iter(sample_studies(rsna_sample).values()))[:10]
    files = [tmp_path / "study" / f"{k}.dcm" for k in range(len(source))]
    datasets = [make_valid(src, dst, salt=request.node.name) for src, dst in zip(source, files, strict=True)]
    orthanc.upload(files)
    return orthanc, str(datasets[0].StudyInstanceUID)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder the command's temporary folders go to (checked empty afterwards)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def _invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, [*args, "--device", "cpu", "--no-tta"])
    return res.exit_code, res.output


def _orthanc_study(orthanc: Orthanc, uid: str) -> str:
    (found,) = [s for s in orthanc.rest("GET", "/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] == uid]
    return str(found["ID"])


@needs_dicomweb
@pytest.mark.parametrize("command", ["predict-study", "report"])
def test_wado_url_analysed_and_results_stored_by_stow(pacs, bundle: Path, tmp_path: Path, private_tmp: Path,  # type: ignore[no-untyped-def]
                                                      monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    orthanc, uid = pacs
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    study_id = _orthanc_study(orthanc, uid)
    before = orthanc.modalities(study_id)
    assert before == ["CT"] * 10
    out = tmp_path / ("result.json" if command == "predict-study" else "report.html")
    extra = ["--dicom-out", str(tmp_path / "dicom")] if command == "report" else []
    code, output = _invoke(command, f"{orthanc.dicomweb}/studies/{uid}", "--bundle", str(bundle), "--out", str(out),
                           "--stow", orthanc.dicomweb, *extra)
    assert code == 0, output
    assert f"fetched 10 instances by WADO-RS from {orthanc.dicomweb}" in output
    assert f"stored 5 DICOM objects (KO 1, OT 3, SR 1) by STOW-RS at {orthanc.dicomweb}" in output
    after = orthanc.modalities(study_id)
    assert sorted(after) == sorted([*before, "SR", "KO", "OT", "OT", "OT"])  # SR, key images, captures
    assert list(private_tmp.iterdir()) == []  # the fetched study and the temporary --dicom-out are gone
    assert USERS["ichdet"] not in output
    if command == "predict-study":
        (study,) = json.loads(out.read_text())["studies"]
        assert study["study_instance_uid"] == uid and study["summary"]["analysed"]
    else:  # --dicom-out kept as given, and the same objects stored
        written = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "dicom").iterdir())
        assert len(written) == 5 and out.read_text().startswith("<!DOCTYPE html>")
        for sop in written:
            assert orthanc.rest("POST", "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop}})


@needs_dicomweb
@pytest.mark.parametrize(("target", "env", "code", "message"), [
    ("missing", CREDENTIALS, 1, "{base}: not found (HTTP 404); check the URL"),
    ("down", CREDENTIALS, 1, "cannot connect to {down} (Connection refused); check the URL and that the DICOMweb "
                             "server is running"),
    ("study", {}, 1, "{base} refused the credentials (HTTP 401 Unauthorized); set ICHDET_DICOMWEB_TOKEN"),
    ("study", {"ICHDET_DICOMWEB_USER": "ichdet", "ICHDET_DICOMWEB_PASSWORD": "wrong"}, 1,
     "{base} refused the credentials (HTTP 401 Unauthorized)"),
    ("study", {"ICHDET_DICOMWEB_USER": "ichdet"}, 2, "DICOMweb credentials: a user needs a password"),
    ("userinfo", CREDENTIALS, 2, "study URL: credentials in a URL are refused"),
])
def test_wado_errors_are_one_line(pacs, bundle: Path, tmp_path: Path, private_tmp: Path,  # type: ignore[no-untyped-def]
                                  monkeypatch: pytest.MonkeyPatch, target: str, env: dict[str, str], code: int,
                                  message: str) -> None:
    orthanc, uid = pacs
    for key in CREDENTIALS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    url = {"missing": f"{orthanc.dicomweb}/studies/1.2.3.4.5", "down": f"{down}/studies/{uid}",
           "study": f"{orthanc.dicomweb}/studies/{uid}",
           "userinfo": f"http://ichdet:pw@127.0.0.1:{orthanc.http_port}/dicom-web/studies/{uid}"}[target]
    (tmp_path / "result.json").write_text('{"earlier": true}')
    exit_code, output = _invoke("predict-study", url, "--bundle", str(bundle), "--out", str(tmp_path / "result.json"))
    assert exit_code == code
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(base=orthanc.dicomweb, down=down)), output
    assert uid not in output and "1.2.3.4.5" not in output and ":pw@" not in output
    assert list(private_tmp.iterdir()) == [] and (tmp_path / "result.json").read_text() == '{"earlier": true}'


@needs_dicomweb
def test_stow_to_a_server_that_is_down_keeps_the_result(pacs, bundle: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    orthanc, uid = pacs
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    code, output = _invoke("predict-study", f"{orthanc.dicomweb}/studies/{uid}", "--bundle", str(bundle), "--out",
                           str(tmp_path / "result.json"), "--stow", down)
    assert code == 1
    assert output.strip().splitlines()[-1] == (f"error: cannot connect to {down} (Connection refused); check the URL "
                                               "and that the DICOMweb server is running")
    assert json.loads((tmp_path / "result.json").read_text())["studies"][0]["study_instance_uid"] == uid
    assert list(private_tmp.iterdir()) == []


@needs_dicomweb
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed (apt-get install openssl)")
def test_https_verifies_the_certificate_ca_bundle_trusts_a_private_ca(rsna_sample: Path, bundle: Path,  # type: ignore[no-untyped-def]
                                                                     tmp_path: Path, private_tmp: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for key in CREDENTIALS:
        monkeypatch.delenv(key, raising=False)
    # as in most container images: requests would let these override the session's CA bundle
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    cert, ca = make_tls(tmp_path / "tls")
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), dicomweb=True).start()
    proxy = TlsProxy(cert, orthanc.http_port)  # https in front of Orthanc (its own TLS crashes on Debian 12)
    try:
        (uid, files), = make_studies(rsna_sample, tmp_path / "dicom", n=1, slices=6, size=None).items()
        orthanc.upload(files)
        base = f"https://127.0.0.1:{proxy.port}/dicom-web"
        url = f"{base}/studies/{uid}"
        code, output = _invoke("predict-study", url, "--bundle", str(bundle), "--out", str(tmp_path / "r.json"))
        assert (code, output.strip()) == (1, f"error: {base}: the server's certificate could not be verified; pass "
                                             "--ca-bundle (or ca_bundle in the serve config) with the PEM file of the "
                                             "CA that signed it")
        code, output = _invoke("predict-study", url, "--bundle", str(bundle), "--out", str(tmp_path / "r.json"),
                               "--ca-bundle", str(ca), "--stow", base)
        assert code == 0, output
        assert f"stored 5 DICOM objects (KO 1, OT 3, SR 1) by STOW-RS at {base}" in output
        assert sorted(orthanc.modalities(next(iter(orthanc.rest("GET", "/studies"))))) == sorted(
            ["CT"] * 6 + ["OT"] * 3 + ["KO", "SR"])
        assert list(private_tmp.iterdir()) == []
    finally:
        proxy.close()
        orthanc.stop()


# -- the temporary folder on Ctrl-C / SIGTERM -------------------------------------------------------------

class _StallingWado:
    """A WADO-RS endpoint that sends a few instances of a multipart answer and then stalls (until released)."""

    def __init__(self, files: list[Path]) -> None:
        self.release = threading.Event()
        parts = b"".join(b"--b0und\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n"
                         for f in files)
        stalling = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b0und')
                self.end_headers()
                self.wfile.write(parts)
                self.wfile.flush()
                stalling.release.wait(120)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_fetched_study_removed_on_interrupt(rsna_sample: Path, bundle: Path, tmp_path: Path, sig: int) -> None:
    (uid, files), = make_studies(rsna_sample, tmp_path / "dicom", n=1, slices=4, size=None).items()
    wado = _StallingWado(files)
    private = tmp_path / "tmp"
    private.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TMPDIR": str(private)}
    cmd = [sys.executable, "-m", "ichdet", "predict-study", f"{wado.url}/studies/{uid}", "--bundle", str(bundle),
           "--out", str(tmp_path / "result.json"), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fetched = wait_for(lambda: sorted(private.glob("ichdet-wado-*/000000.dcm")), 120,
                           "the first fetched instance in the private temporary folder")
        assert oct(fetched[0].parent.stat().st_mode & 0o777) == "0o700"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        wado.stop()
    assert proc.returncode != 0
    assert list(private.iterdir()) == []
    assert not (tmp_path / "result.json").exists()


# -- the node sending to a DICOMweb destination ------------------------------------------------------------

@needs_dicomweb
@pytest.mark.skipif(STORESCU is None, reason="dcmtk's storescu not installed (apt-get install dcmtk)")
def test_node_sends_to_dicomweb_destination_down_then_up(rsna_sample: Path, tmp_path: Path) -> None:
    """The node's results go by STOW-RS to Orthanc's DICOMweb base URL (credentials from the serve config);
    while Orthanc is down they wait, marked pending, and arrive once it is up."""
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), dicomweb=True, users=USERS)  # ports chosen, not started
    node = NodeProcess(tmp_path / "spool", free_port(), allow=["STORESCU"], send_to=orthanc.dicomweb,
                       extra={"dicomweb_user": "ichdet", "dicomweb_password": USERS["ichdet"]}).start()
    try:
        (uid, files), = make_studies(rsna_sample, tmp_path / "dicom", n=1, slices=5, size=16).items()
        storescu(node.port, files)
        wait_for(lambda: "results not delivered yet (cannot connect to " + orthanc.dicomweb in node.log_text(), 60,
                 "the first failed delivery")
        assert len(list(node.spool.glob("studies/*/results/gen-*/sent/*"))) == 0
        orthanc.start()
        wait_for(lambda: len(list(node.spool.glob("studies/*/results/gen-*/sent/*"))) == 2, 60,
                 "both result files marked sent")
        found = orthanc.rest("POST", "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": uid}})
        assert len(found) == 1 and sorted(orthanc.modalities(found[0])) == ["OT", "SR"]
        log = node.log_text()
        assert "sent 2 result file(s) to " + orthanc.dicomweb + " by STOW-RS" in log
        assert uid not in log and USERS["ichdet"] not in log
    finally:
        node.stop()
        orthanc.stop()


@pytest.mark.parametrize(("send_to", "message"), [
    ("http://u:pw@pacs/dicom-web", "send_to: credentials in a URL are refused"),
    ("pacs:104", "send_to 'pacs:104': expected AE@HOST:PORT, e.g. PACS@127.0.0.1:4242, or a DICOMweb base URL"),
])
def test_bad_send_to_refused(tmp_path: Path, send_to: str, message: str) -> None:
    run = subprocess.run([sys.executable, "-m", "ichdet", "serve", "--bundle", str(tmp_path / "b.ichdet"), "--spool",
                          str(tmp_path / "spool"), "--allow", "X", "--send-to", send_to], capture_output=True,
                         text=True, env={"PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert run.returncode == 2 and message in run.stderr and "pw" not in run.stderr.replace(message, ""), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
