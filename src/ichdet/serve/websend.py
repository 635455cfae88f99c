"""Results to the configured destination: C-STORE (:mod:`ichdet.serve.sender`) or STOW-RS to a DICOMweb
base URL, with the same markers: a file is marked sent only once the destination acknowledged it."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

from ichdet.dicom.web import DicomWebError, WebAuth, store_files
from ichdet.errors import IchdetError
from ichdet.serve.config import ServeConfig, WebDestination
from ichdet.serve.sender import send_files
from ichdet.serve.spool import PendingSend, Spool

__all__ = ["deliver", "send_files_web"]

log = logging.getLogger("ichdet.serve")


def send_files_web(sends: Sequence[PendingSend], dest: WebDestination, auth: WebAuth) -> tuple[int, str | None]:
    """STOW-RS ``sends`` in one request; mark each file the server lists as stored; return (sent, first error).

    A crash between the server's answer and the markers resends the files: the server receives the same
    SOP Instance UIDs again, which a DICOMweb archive files as the same instances.
    """
    if not sends:
        return 0, None
    try:
        result = store_files(dest.url, [s.path for s in sends], auth)  # one try: the node's back-off retries
    except DicomWebError as err:
        return 0, str(err)
    by_path = {s.path: s for s in sends}
    for path in result.stored:
        Spool.mark_sent(by_path[path])
    error = None
    if result.failed:
        error = f"{dest} did not store {len(result.failed)} of {len(sends)} result file(s) ({result.failed[0][1]})"
    log.info("sent %d result file(s) to %s by STOW-RS%s", len(result.stored), dest, f"; {error}" if error else "")
    return len(result.stored), error


def deliver(sends: Sequence[PendingSend], cfg: ServeConfig, tls: ssl.SSLContext | None = None,
            ) -> tuple[int, str | None]:
    """Send ``sends`` to ``cfg.send_to`` by C-STORE (over TLS with ``tls``) or STOW-RS; return (sent, first error)."""
    dest = cfg.send_to
    if isinstance(dest, WebDestination):
        try:
            auth = cfg.web_auth()
        except IchdetError as err:  # e.g. a user without a password in the environment
            return 0, str(err)
        return send_files_web(sends, dest, auth)
    assert dest is not None
    return send_files(sends, dest, cfg.ae_title, tls=tls)
