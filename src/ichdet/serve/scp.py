"""The Storage SCP: accept CT instances and C-ECHO from allowed AE titles, spool each before acknowledging it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.transport import ThreadedAssociationServer

from ichdet.serve.spool import Spool, study_key, valid_uid

__all__ = ["CT_STORAGE", "check_instance", "start_scp"]

log = logging.getLogger("ichdet.serve")

#: The storage SOP classes the node accepts (everything else is refused at association negotiation).
CT_STORAGE = (UID(CTImageStorage), UID(EnhancedCTImageStorage))

# C-STORE statuses (PS3.4 B.2.3): success, refused (out of resources), cannot understand.
_SUCCESS, _OUT_OF_RESOURCES, _CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


def check_instance(ds: Dataset, sop_class: str) -> str | None:
    """Why ``ds`` cannot be analysed (``None`` when it can): the checks a study analysis needs up front.

    Reads only header elements; pixels are decoded later by the analysis.
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
    return None


def _write_encoded(event: Any) -> Callable[[Path], None]:
    """A writer of the instance exactly as received (file meta + the encoded data set, no re-encoding)."""
    def write(path: Path) -> None:
        with path.open("wb") as fh:
            fh.write(event.encoded_dataset())
    return write


def _handle_store(event: Any, spool: Spool, on_stored: Callable[[str], None]) -> int:
    """Spool the instance (fsync + rename) and only then answer success; quarantine what cannot be analysed."""
    try:
        ds = event.dataset
        reason = check_instance(ds, str(event.context.abstract_syntax))
    except Exception as err:  # a data set pydicom cannot parse: keep it aside, never crash the node
        reason = f"cannot parse the data set ({type(err).__name__}: {err})"
    if reason is not None:
        path = spool.quarantine(event.encoded_dataset(), reason)
        # the reason may quote header values: it stays in the spool, the log names the file only
        log.warning("quarantined an instance from %s: see quarantine/%s", event.assoc.requestor.ae_title,
                    path.with_suffix(".reason.txt").name)
        return _CANNOT_UNDERSTAND
    study_uid = str(ds.StudyInstanceUID)
    try:
        spool.store(study_uid, str(ds.SOPInstanceUID), _write_encoded(event))
    except OSError as err:  # full disk: refuse, so that the sender keeps the instance and retries
        log.error("cannot spool an instance of study %s: %s", study_key(study_uid), err)
        return _OUT_OF_RESOURCES
    on_stored(study_uid)
    return _SUCCESS


def _log_rejected(event: Any) -> None:
    req = event.assoc.requestor
    log.warning("association from %s (%s:%s) rejected: calling AE title not allowed", req.ae_title,
                req.address, req.port)


def _log_accepted(event: Any) -> None:
    req = event.assoc.requestor
    log.info("association from %s (%s:%s) accepted", req.ae_title, req.address, req.port)


def start_scp(spool: Spool, ae_title: str, host: str, port: int, allow: list[str],
              on_stored: Callable[[str], None]) -> ThreadedAssociationServer:
    """Start listening (in background threads); ``on_stored(study_uid)`` runs after each spooled instance.

    Associations from calling AE titles outside ``allow`` are rejected (reason: calling AE title not
    recognised) and logged. Every transfer syntax pynetdicom knows is accepted, so compressed CT arrives
    as sent and is decoded by the analysis.
    """
    ae = AE(ae_title=ae_title)
    ae.require_calling_aet = list(allow)
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs from senders that allow it
    ae.maximum_associations = 32  # several modalities and PACS jobs at once (pynetdicom's default is 10)
    for sop_class in CT_STORAGE:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context("1.2.840.10008.1.1")  # Verification (C-ECHO)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, _handle_store, [spool, on_stored]),
        (evt.EVT_C_ECHO, lambda event: _SUCCESS),
        (evt.EVT_REJECTED, _log_rejected),
        (evt.EVT_ACCEPTED, _log_accepted),
    ]
    server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    assert isinstance(server, ThreadedAssociationServer)
    return server
