"""C-STORE of result files to the destination, one association per batch, with exponential back-off."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import dcmread
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES

from ichdet.serve.config import Destination
from ichdet.serve.spool import PendingSend, Spool

__all__ = ["Backoff", "send_files"]

log = logging.getLogger("ichdet.serve")


@dataclass
class Backoff:
    """Delays between failed attempts: ``initial``, doubling, capped at ``maximum``; reset on success."""

    initial: float
    maximum: float
    failures: int = 0

    def delay(self) -> float:
        """Seconds to wait before the next attempt (0 when the last one succeeded)."""
        return 0.0 if self.failures == 0 else min(self.maximum, self.initial * 2 ** (self.failures - 1))

    def record(self, ok: bool) -> None:
        """Count a failed attempt, or reset after a successful one."""
        self.failures = 0 if ok else self.failures + 1


def send_files(sends: Sequence[PendingSend], dest: Destination, calling_ae: str,
               tls: ssl.SSLContext | None = None) -> tuple[int, str | None]:
    """C-STORE ``sends`` in one association; mark each acknowledged one sent; return (sent, first error).

    With ``tls`` (:func:`ichdet.serve.tls.client_context`) the association runs over TLS and the
    destination's certificate must match its host name and the configured CA.

    A file is marked only after the destination answers success, so a crash in between resends it: the
    destination receives the same SOP Instance UID again, which a PACS files as the same instance.
    """
    if not sends:
        return 0, None
    datasets = [dcmread(s.path) for s in sends]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    syntaxes: dict[str, list[str]] = {}
    for ds in datasets:  # one context per result class, offering each file's own transfer syntax first
        offered = syntaxes.setdefault(str(ds.SOPClassUID), [])
        for ts in (str(ds.file_meta.TransferSyntaxUID), *DEFAULT_TRANSFER_SYNTAXES):
            if ts not in offered:
                offered.append(ts)
    for sop_class, offered in syntaxes.items():
        ae.add_requested_context(sop_class, offered)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         tls_args=(tls, dest.host) if tls is not None else None)
    if not assoc.is_established:
        return 0, f"cannot associate with {dest}"
    sent, error = 0, None
    try:
        for send, ds in zip(sends, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):
                error = f"{dest} refused a result (status {code if code is None else hex(code)})"
                break
            Spool.mark_sent(send)
            sent += 1
    finally:
        assoc.release()
    log.info("sent %d result file(s) to %s%s", sent, dest, f"; {error}" if error else "")
    return sent, error
