"""The Storage SCP: accept CT instances and C-ECHO from allowed AE titles, spool each before acknowledging it."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.transport import ThreadedAssociationServer

from ichdet.dicom.read import DEFAULT_MAX_PIXELS, check_pixel_header
from ichdet.errors import DicomError, IchdetError
from ichdet.serve.spool import Spool, valid_uid

__all__ = ["CT_STORAGE", "check_instance", "start_scp"]

log = logging.getLogger("ichdet.serve")

#: The storage SOP classes the node accepts (everything else is refused at association negotiation).
CT_STORAGE = (UID(CTImageStorage), UID(EnhancedCTImageStorage))

# C-STORE statuses (PS3.4 B.2.3): success, refused (out of resources), cannot understand.
_SUCCESS, _OUT_OF_RESOURCES, _CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
#: How long a caller may take for its TLS handshake (done in the association's thread, not the listener's).
_HANDSHAKE_SECONDS = 30.0


def check_instance(ds: Dataset, sop_class: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why ``ds`` cannot be analysed (``None`` when it can): the checks a study analysis needs up front.

    Reads only header elements, and refuses what the study analysis would refuse before decoding
    (:func:`ichdet.dicom.read.check_pixel_header`: a size over ``max_pixels``, several frames, colour,
    an unusable rescale), so such an instance never enters a study (where it would fail every analysis).
    """
    if sop_class not in CT_STORAGE:
        return f"SOP class {sop_class} is not CT image storage"
    study_uid = str(ds.get("StudyInstanceUID", ""))
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    if not valid_uid(study_uid):
        return f"Study Instance UID {study_uid!r} is not a valid UID"
    if not valid_uid(sop_uid):
        return f"SOP Instance UID {sop_uid!r} is not a valid UID"
    if str(ds.get("Modality", "CT")) != "CT":
        return f"Modality is {ds.Modality!r}, not CT"
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return "no pixel data"
    try:
        check_pixel_header(ds, max_pixels=max_pixels)
    except DicomError as err:
        return err.reason
    return None


def _caller(event: Any) -> str:
    """The calling AE title, for a log line (an AE title names a device, not a patient)."""
    return str(event.assoc.requestor.ae_title)


def _handle_store(event: Any, spool: Spool, on_stored: Callable[[str], None], max_pixels: int) -> int:
    """Spool the instance (fsync + rename + folder fsync) and only then answer success; quarantine what
    cannot be analysed (0xC000); a full disk, or any other failure to keep the instance, is 0xA700
    (out of resources: the sender keeps the instance and retries). Log lines carry no UID, path or value."""
    try:
        return _store(event, spool, on_stored, max_pixels)
    except (OSError, IchdetError) as err:  # a full disk: RunFailed from atomic_path, or a bare OSError
        why = _os_reason(err)
        log.error("cannot keep an instance from %s (%s): answered 0xA700 (out of resources); free space on "
                  "the spool's disk", _caller(event), why)
        return _OUT_OF_RESOURCES
    except Exception as err:  # the node outlives any instance; pynetdicom would answer 0xC211 with a traceback
        log.error("an instance from %s could not be handled (%s): answered 0xA700", _caller(event),
                  type(err).__name__)
        return _OUT_OF_RESOURCES


def _os_reason(err: BaseException) -> str:
    """The operating system's words for a failed write ("No space left on device"), never the path (it
    holds the Study Instance UID)."""
    for cause in (err, err.__cause__, err.__context__):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return type(err).__name__


def _store(event: Any, spool: Spool, on_stored: Callable[[str], None], max_pixels: int) -> int:
    try:
        ds = event.dataset
        reason = check_instance(ds, str(event.context.abstract_syntax), max_pixels)
    except Exception as err:  # a data set pydicom cannot parse: keep it aside, never crash the node
        reason = f"cannot parse the data set ({type(err).__name__}: {err})"
    data = event.encoded_dataset()
    if reason is not None:
        path = spool.quarantine(data, reason)
        # the reason may quote header values: it stays in the spool, the log names the file only
        log.warning("refused an instance from %s (0xC000): it cannot be analysed; kept as %s with the reason "
                    "in %s", _caller(event), path, path.with_suffix(".reason.txt").name)
        return _CANNOT_UNDERSTAND
    study_uid = str(ds.StudyInstanceUID)
    spool.store(study_uid, str(ds.SOPInstanceUID), data)
    on_stored(study_uid)
    return _SUCCESS


def _log_rejected(event: Any, ae_title: str, allow: list[str]) -> None:
    req = event.assoc.requestor
    called = str(getattr(req.primitive, "called_ae_title", "") or "").strip()
    if req.ae_title not in allow:
        why = "calling AE title not allowed"
    elif called != ae_title:
        why = f"called AE title {called!r} is not this node's ({ae_title})"
    else:
        why = "refused by the association negotiation"
    log.warning("association from %s (%s:%s) rejected: %s", req.ae_title, req.address, req.port, why)


def _log_accepted(event: Any) -> None:
    req = event.assoc.requestor
    tls = ""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if isinstance(sock, ssl.SSLSocket):
        cert = sock.getpeercert() or {}
        names = [str(pair[1]) for rdn in cert.get("subject", ()) for pair in rdn if pair[0] == "commonName"]
        tls = f" over {sock.version()}" + (f", client certificate CN={names[0]}" if names else "")
    log.info("association from %s (%s:%s) accepted%s", req.ae_title, req.address, req.port, tls)


class _Server(ThreadedAssociationServer):
    """pynetdicom's server with the TLS handshake moved out of the listening thread.

    pynetdicom wraps each accepted socket (handshake included) in the thread that accepts connections, so
    one caller that connects and sends nothing would stop every other caller; here the handshake runs in
    the association's own thread with a time limit, and a refused one (plain TCP, a certificate of another
    CA) is logged.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            try:
                request.settimeout(_HANDSHAKE_SECONDS)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (OSError, ValueError) as err:
                reason = getattr(err, "reason", None) or type(err).__name__
                log.warning("connection from %s refused: TLS handshake failed (%s)", client_address[0], reason)
                request.close()
                return
        super().process_request_thread(request, client_address)


def start_scp(spool: Spool, ae_title: str, host: str, port: int, allow: list[str],
              on_stored: Callable[[str], None], *, ssl_context: ssl.SSLContext | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> ThreadedAssociationServer:
    """Start listening (in background threads); ``on_stored(study_uid)`` runs after each spooled instance.

    Associations from calling AE titles outside ``allow``, or to a called AE title other than
    ``ae_title``, are rejected (A-ASSOCIATE-RJ: calling / called AE title not recognised) and logged.
    With ``ssl_context`` (:func:`ichdet.serve.tls.server_context`) only TLS connections are served.
    Every transfer syntax pynetdicom knows is accepted, so compressed CT arrives as sent and is decoded
    by the analysis.
    """
    ae = AE(ae_title=ae_title)
    ae.require_calling_aet = list(allow)
    ae.require_called_aet = True
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs from senders that allow it
    ae.maximum_associations = 32  # several modalities and PACS jobs at once (pynetdicom's default is 10)
    for sop_class in CT_STORAGE:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context("1.2.840.10008.1.1")  # Verification (C-ECHO)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, _handle_store, [spool, on_stored, max_pixels]),
        (evt.EVT_C_ECHO, lambda event: _SUCCESS),
        (evt.EVT_REJECTED, _log_rejected, [ae_title, list(allow)]),
        (evt.EVT_ACCEPTED, _log_accepted),
    ]
    server = ae.make_server((host, port), ssl_context=ssl_context, evt_handlers=handlers, server_class=_Server)
    ae._servers.append(server)  # so that ae.shutdown() stops it, as start_server(block=False) does
    threading.Thread(target=server.serve_forever, name=f"ichdet-scp-{port}", daemon=True).start()
    return server
