"""DICOMweb both ways with dicomweb-client: fetch a study by WADO-RS, store result files by STOW-RS.

Shared by ``ichdet predict-study`` / ``ichdet report`` (a study URL as PATH, ``--stow``) and the node's
DICOMweb destination (:mod:`ichdet.serve.websend`), so it sits below both. Credentials come from the
environment (:meth:`WebAuth.from_env`) or the serve config, never from a URL: a URL with ``user:password@``
is refused, so that no secret reaches a command line, a process list or a log. https verifies the
server's certificate (``ca_bundle`` for a private CA). Error messages name the server's base URL and
the reason, never a study's UID.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from requests.adapters import HTTPAdapter

from ichdet.errors import IchdetError, RunFailed

__all__ = ["ENV_PASSWORD", "ENV_TOKEN", "ENV_USER", "DicomWebError", "StowResult", "WebAuth", "fetch_study",
           "fetched_study", "is_web_url", "parse_base_url", "parse_study_url", "server_name", "store_files",
           "verified_session"]

#: The environment variables credentials are read from (a bearer token, or a user and password).
ENV_TOKEN, ENV_USER, ENV_PASSWORD = "ICHDET_DICOMWEB_TOKEN", "ICHDET_DICOMWEB_USER", "ICHDET_DICOMWEB_PASSWORD"

#: A study URL: ``http(s)://HOST[:PORT]/<base path>/studies/<StudyInstanceUID>``.
_STUDY_URL = re.compile(r"^(?P<base>https?://[^/?#]+(?:/[^?#]*?)?)/studies/(?P<uid>[0-9.]+)/?$")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: How the operating system words a refused or failed connection inside requests' message ("[Errno 111] ...").
_OS_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
#: (connect, read) seconds: a dead server is found quickly, a large study may take a while.
TIMEOUT = (15.0, 300.0)

# dicomweb-client logs study and instance UIDs (INFO, and ERROR for a failed instance) and at DEBUG the request
# headers, Authorization included; what went wrong reaches the user through this module's errors instead
logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL)


class DicomWebError(RunFailed):
    """A DICOMweb server that could not be reached, refused the request or the credentials."""


@dataclass(frozen=True)
class WebAuth:
    """How to authenticate to a DICOMweb server: a bearer token, or basic auth; and which CAs to trust.

    ``repr`` shows which kind of credential is set, never its value.
    """

    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None

    def __post_init__(self) -> None:
        if self.token and (self.user or self.password):
            raise IchdetError(f"DICOMweb credentials: a bearer token and a user/password are both set; set "
                              f"{ENV_TOKEN} or {ENV_USER}/{ENV_PASSWORD}, not both")
        if bool(self.user) != bool(self.password):
            raise IchdetError(f"DICOMweb credentials: a user needs a password and a password a user; set both "
                              f"{ENV_USER} and {ENV_PASSWORD}")
        if self.ca_bundle is not None and not Path(self.ca_bundle).is_file():
            raise IchdetError(f"--ca-bundle {self.ca_bundle}: no such file; give the PEM file of the CA "
                              "that signed the server's certificate")

    @classmethod
    def from_env(cls, ca_bundle: Path | None = None, environ: Mapping[str, str] | None = None) -> WebAuth:
        """The credentials in ``ICHDET_DICOMWEB_TOKEN`` or ``ICHDET_DICOMWEB_USER``/``_PASSWORD`` (none: anonymous)."""
        env = os.environ if environ is None else environ
        return cls(token=env.get(ENV_TOKEN) or None, user=env.get(ENV_USER) or None,
                   password=env.get(ENV_PASSWORD) or None, ca_bundle=ca_bundle)

    def session(self) -> requests.Session:
        """A requests session that sends these credentials and verifies certificates (with ``ca_bundle``)."""
        session = verified_session(self.ca_bundle)
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        elif self.user and self.password:
            session.auth = (self.user, self.password)
        return session


class _CaBundleAdapter(HTTPAdapter):
    """Verifies https against one CA bundle whatever the environment says.

    requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` override a session's ``verify``
    (psf/requests#3829), and dicomweb-client passes no per-request ``verify``: a ``--ca-bundle`` would be
    ignored wherever those variables are set (most container images set them).
    """

    def __init__(self, ca_bundle: Path) -> None:
        super().__init__()
        self.ca_bundle = str(ca_bundle)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["verify"] = self.ca_bundle
        return super().send(request, **kwargs)


def verified_session(ca_bundle: Path | None = None) -> requests.Session:
    """A requests session that verifies https certificates: against ``ca_bundle`` when given (a private CA),
    else the system's trust store."""
    session = requests.Session()
    session.verify = True
    if ca_bundle is not None:
        session.mount("https://", _CaBundleAdapter(Path(ca_bundle)))
    return session


def is_web_url(text: str) -> bool:
    """True for an ``http://`` or ``https://`` address (a study URL or a DICOMweb base URL)."""
    return text.lower().startswith(("http://", "https://"))


def _check_url(url: str, what: str) -> None:
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise IchdetError(f"{what}: credentials in a URL are refused (they would show in process lists and logs); "
                          f"remove 'user:password@' and set {ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN}")
    if not parts.hostname:
        raise IchdetError(f"{what} {url!r}: no host; expected e.g. http://pacs:8042/dicom-web")
    if parts.query or parts.fragment:
        raise IchdetError(f"{what}: a query or fragment ('?', '#') is not part of a DICOMweb address")


def parse_study_url(url: str) -> tuple[str, str]:
    """``http(s)://HOST/.../studies/<StudyInstanceUID>`` -> (base URL, Study Instance UID).

    Raises:
        IchdetError: not a study URL (the message shows the expected form, not the given UID).
    """
    _check_url(url, "study URL")
    match = _STUDY_URL.match(url.strip())
    if match is None or len(match["uid"]) > 64 or not _UID.match(match["uid"]):
        raise IchdetError("study URL: expected http(s)://HOST[:PORT]/<path>/studies/<StudyInstanceUID>, e.g. "
                          "http://pacs:8042/dicom-web/studies/1.2.840.113619.2.55.3 (the UID: digits and dots)")
    return match["base"], match["uid"]


def parse_base_url(url: str, what: str = "DICOMweb base URL") -> str:
    """A DICOMweb base URL (``http(s)://HOST[:PORT]/path``) without a trailing slash; IchdetError otherwise."""
    if not is_web_url(url):
        raise IchdetError(f"{what} {url!r}: expected http(s)://HOST[:PORT]/path, e.g. http://pacs:8042/dicom-web")
    _check_url(url, what)
    if re.search(r"/studies(/|$)", urlsplit(url).path):
        raise IchdetError(f"{what}: give the base URL (up to /dicom-web), not a study's URL")
    return url.rstrip("/")


def server_name(base_url: str) -> str:
    """The base URL as messages show it (scheme, host, port, path; it holds no UID and no credential)."""
    return base_url.rstrip("/")


def describe(err: BaseException, base_url: str) -> str:
    """One line for a failed request to ``base_url``: what happened and the fix, without the request's URL
    (which can hold a study's UID)."""
    where = server_name(base_url)
    if isinstance(err, requests.exceptions.SSLError):
        return (f"{where}: the server's certificate could not be verified; pass --ca-bundle (or ca_bundle in "
                "the serve config) with the PEM file of the CA that signed it")
    if isinstance(err, requests.exceptions.Timeout):
        return f"{where}: no answer in time; check that the DICOMweb server is running and reachable"
    if isinstance(err, requests.exceptions.ConnectionError):
        found = _OS_REASON.search(str(err))
        reason = found[1].strip() if found else "connection failed"
        return f"cannot connect to {where} ({reason}); check the URL and that the DICOMweb server is running"
    if isinstance(err, requests.exceptions.HTTPError) and err.response is not None:
        code, reason = err.response.status_code, err.response.reason
        if code in (401, 403):
            return (f"{where} refused the credentials (HTTP {code} {reason}); set {ENV_TOKEN}, or {ENV_USER} and "
                    f"{ENV_PASSWORD}, to an account the server accepts")
        if code == 404:
            return f"{where}: not found (HTTP 404); check the URL (the study, or the base path such as /dicom-web)"
        return f"{where} answered HTTP {code} {reason}"
    return f"{where}: {type(err).__name__}"


def _client(base_url: str, auth: WebAuth) -> DICOMwebClient:
    client = DICOMwebClient(url=base_url, session=auth.session(), timeout=TIMEOUT)
    # dicomweb-client's own retries (5 tries, waits doubling from 2 s) make a server that is down answer after
    # half a minute; the command says so at once, and the node retries with its own back-off
    client.set_http_retry_params(retry=False)
    return client


# -- WADO-RS -------------------------------------------------------------------------------------------

def fetch_study(url: str, dest: Path, auth: WebAuth) -> int:
    """Retrieve every instance of the study at ``url`` by WADO-RS into ``dest``; return how many.

    Files are named by their order of arrival (no UID in a file name).

    Raises:
        DicomWebError: the server could not be reached, refused, or holds no such study.
    """
    base, uid = parse_study_url(url)
    client = _client(base, auth)
    count = 0
    try:
        for ds in client.iter_study(uid):
            ds.save_as(dest / f"{count:06d}.dcm", enforce_file_format=False)
            count += 1
    except requests.exceptions.RequestException as err:
        raise DicomWebError(describe(err, base)) from None
    except ValueError as err:  # not a multipart/related answer of DICOM parts
        raise DicomWebError(f"{server_name(base)}: the answer is not DICOM ({err}); check that the URL is a "
                            "DICOMweb (WADO-RS) study URL") from None
    if count == 0:
        raise DicomWebError(f"{server_name(base)}: the study has no instances; check the study URL")
    return count


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the block (like Ctrl-C), so that clean-up code runs; main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def fetched_study(url: str, auth: WebAuth) -> Iterator[tuple[Path, int]]:
    """Fetch the study at ``url`` into a private temporary folder (mode 0700); yield (folder, instances).

    The folder and everything in it is removed when the block ends, however it ends: an error, Ctrl-C or
    SIGTERM (which interrupts like Ctrl-C meanwhile). Only a SIGKILL leaves it, in the temporary folder
    (``$TMPDIR``), named ``ichdet-wado-*``.
    """
    parse_study_url(url)  # a malformed URL is refused before a folder exists
    with _terminate_as_interrupt():
        folder = Path(tempfile.mkdtemp(prefix="ichdet-wado-"))  # mkdtemp makes it 0700
        try:
            count = fetch_study(url, folder, auth)
            yield folder, count
        finally:
            shutil.rmtree(folder, ignore_errors=True)


# -- STOW-RS -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StowResult:
    """What a STOW-RS request stored: the files the server acknowledged, and the others with the reason."""

    stored: list[Path]
    failed: list[tuple[Path, str]]


def _sop_uids(items: Sequence[Any]) -> set[str]:
    return {str(item.ReferencedSOPInstanceUID) for item in items if "ReferencedSOPInstanceUID" in item}


def store_files(base_url: str, files: Sequence[Path], auth: WebAuth) -> StowResult:
    """STOW-RS ``files`` to ``base_url`` in one request; a file counts as stored only when the server's
    answer lists its SOP Instance UID among the referenced (stored) instances.

    Raises:
        DicomWebError: the server could not be reached or refused the whole request.
    """
    if not files:
        return StowResult([], [])
    datasets = [pydicom.dcmread(f) for f in files]
    client = _client(parse_base_url(base_url), auth)
    try:
        answer = client.store_instances(datasets)
    except requests.exceptions.RequestException as err:
        raise DicomWebError(describe(err, base_url)) from None
    except ValueError as err:  # an answer dicomweb-client cannot read
        raise DicomWebError(f"{server_name(base_url)}: unexpected STOW-RS answer ({err})") from None
    stored_uids = _sop_uids(answer.get("ReferencedSOPSequence", []))
    failed_reasons = {str(item.ReferencedSOPInstanceUID): f"failure reason {int(item.get('FailureReason', 0)):#06x}"
                      for item in answer.get("FailedSOPSequence", []) if "ReferencedSOPInstanceUID" in item}
    stored, failed = [], []
    for path, ds in zip(files, datasets, strict=True):
        uid = str(ds.SOPInstanceUID)
        if uid in stored_uids:
            stored.append(path)
        else:
            failed.append((path, failed_reasons.get(uid, "not in the server's list of stored instances")))
    return StowResult(stored, failed)
