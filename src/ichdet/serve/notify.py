"""Worklist notifications as spool state: one HL7 ORU^R01 (MLLP) and one FHIR DiagnosticReport (HTTP POST)
per analysed study generation, sent until acknowledged.

State, per committed generation folder ``results/gen-NNNN/notify/``:

- ``<channel>.pending``: the message, built before the generation is committed (it is renamed into
  place with the generation, so a crash never leaves a generation without its notification) and sent
  as it is on every try (same control ID, so a receiver recognises a resend);
- ``<channel>.acked``: the receiver acknowledged it (HL7 ACK with MSA-1 ``AA``; HTTP 2xx); never sent again;
- ``<channel>.error``: the last failed try's reason (no patient data) and the number of tries.

A ``kill -9`` between a send and its acknowledgement leaves the message pending: it is sent again after
the restart (at least once; the receiver sees the same control ID). Channels are ``hl7`` and ``fhir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import hl7
import pydicom
import requests
from hl7.mllp import open_hl7_connection

from ichdet.dicom.web import verified_session
from ichdet.io import write_json_atomic, write_text_atomic
from ichdet.serve.config import ServeConfig
from ichdet.serve.messages import diagnostic_report, finding_from_result, oru_r01
from ichdet.serve.sender import Backoff
from ichdet.serve.spool import Spool, study_key

__all__ = ["CHANNELS", "Notifier", "notification_counts", "notifier_for", "pending_notifications", "post_fhir",
           "send_hl7"]

log = logging.getLogger("ichdet.serve")

CHANNELS = ("hl7", "fhir")
#: Seconds to connect, and to wait for the acknowledgement.
TIMEOUT = 30.0


@dataclass(frozen=True)
class Pending:
    """One notification not yet acknowledged."""

    channel: str
    study_uid: str
    generation: int
    path: Path

    @property
    def acked(self) -> Path:
        return self.path.with_suffix(".acked")

    @property
    def error(self) -> Path:
        return self.path.with_suffix(".error")


# -- transports ------------------------------------------------------------------------------------------

async def _exchange(host: str, port: int, message: str, timeout: float) -> hl7.Message:
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port, encoding="utf-8"), timeout)
    try:
        writer.writemessage(message)
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the receiver closed first
            await writer.wait_closed()


def send_hl7(host: str, port: int, message: str, timeout: float = TIMEOUT) -> str | None:
    """Send one HL7 message over MLLP and read the answer; None when it is an ACK with MSA-1 ``AA`` for this
    message's control ID, otherwise why not (no message content in the reason)."""
    where = f"HL7 receiver {host}:{port}"
    try:
        ack = asyncio.run(_exchange(host, port, message, timeout))
    except TimeoutError:
        return f"{where}: no acknowledgement within {timeout:.0f} s"
    except OSError as err:  # refused, unreachable, reset
        return f"{where}: {err.strerror or type(err).__name__}"
    except asyncio.IncompleteReadError:
        return f"{where}: connection closed without an acknowledgement"
    except Exception as err:  # an answer python-hl7 cannot parse
        return f"{where}: unreadable acknowledgement ({type(err).__name__})"
    try:
        code, acked_id = str(ack.segment("MSA")[1]), str(ack.segment("MSA")[2])
    except (KeyError, IndexError):
        return f"{where}: the answer has no MSA segment"
    sent_id = str(hl7.parse(message).segment("MSH")[10])
    if code != "AA":
        return f"{where}: acknowledgement code {code} (not AA)"
    if acked_id != sent_id:
        return f"{where}: acknowledgement of another message (MSA-2 is not this message's control ID)"
    return None


def post_fhir(url: str, body: str, session: requests.Session | None = None, timeout: float = TIMEOUT) -> str | None:
    """POST a DiagnosticReport; None on HTTP 2xx, otherwise why not (status, or the connection's failure).

    ``If-None-Exist`` asks a FHIR server to create it only once (its identifier is the same on a resend).
    """
    identifier = json.loads(body)["identifier"][0]
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json",
               "If-None-Exist": f"identifier={identifier['system']}|{identifier['value']}"}
    try:
        answer = (session or requests).post(url, data=body.encode(), headers=headers, timeout=timeout)
    except requests.exceptions.SSLError:
        return f"FHIR receiver {url}: certificate not verified (ca_bundle in the serve config for a private CA)"
    except requests.exceptions.RequestException as err:
        return f"FHIR receiver {url}: {type(err).__name__}"
    if 200 <= answer.status_code < 300:
        return None
    return f"FHIR receiver {url}: HTTP {answer.status_code} {answer.reason}"


# -- state -----------------------------------------------------------------------------------------------

def _study_header(input_dir: Path) -> dict[str, str]:
    """AccessionNumber, PatientID, PatientName of the first readable instance (what a RIS matches on)."""
    for path in sorted(input_dir.iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["AccessionNumber", "PatientID", "PatientName"])
        except Exception:  # another instance may do
            continue
        return {k: str(ds.get(k, "") or "") for k in ("AccessionNumber", "PatientID", "PatientName")}
    return {}


def pending_notifications(spool: Spool, channel: str | None = None) -> list[Pending]:
    """Every notification of the spool not acknowledged, oldest first (by when it was written)."""
    found = []
    for path in spool.studies.glob("*/results/gen-*/notify/*.pending"):
        if path.stem in CHANNELS and (channel is None or path.stem == channel) and \
                not path.with_suffix(".acked").exists():
            found.append(Pending(path.stem, path.parents[3].name, int(path.parents[1].name.split("-")[1]), path))
    return sorted(found, key=lambda p: (p.path.stat().st_mtime, p.study_uid, p.generation))


def notification_counts(spool: Spool) -> dict[str, dict[str, int]]:
    """Pending (not acknowledged) and failed (pending, last try failed) notifications per channel."""
    pending = {c: 0 for c in CHANNELS}
    failed = {c: 0 for c in CHANNELS}
    for item in pending_notifications(spool):
        pending[item.channel] += 1
        failed[item.channel] += item.error.exists()
    return {"pending_notifications": pending, "failed_notifications": failed}


class Notifier:
    """Writes each generation's notifications before it is committed and sends them in one thread per
    channel, in order, with exponential back-off per channel (an HL7 outage does not hold back FHIR)."""

    def __init__(self, spool: Spool, sending_facility: str, hl7_to: tuple[str, int] | None, fhir_url: str | None,
                 backoff: tuple[float, float], session: requests.Session | None = None) -> None:
        self.spool, self.facility = spool, sending_facility
        self.hl7_to, self.fhir_url, self.backoff, self.session = hl7_to, fhir_url, backoff, session
        self.last_error: dict[str, str | None] = {c: None for c in self.channels}
        self._wake = {c: threading.Event() for c in self.channels}

    @property
    def channels(self) -> list[str]:
        """The configured channels."""
        return [c for c, on in (("hl7", self.hl7_to), ("fhir", self.fhir_url)) if on]

    def prepare(self, work: Path, study_uid: str, generation: int, result_json: Path, now: datetime) -> None:
        """Write the generation's messages into its work folder (before the commit renames it into place).

        Nothing is written for a study the analysis could not analyse; a message that cannot be built is
        logged and skipped (the analysis itself stands).
        """
        if not self.channels:
            return
        try:
            finding = finding_from_result(json.loads(result_json.read_text()), study_uid, generation,
                                          _study_header(work / "input"))
            if finding is None:
                log.info("study %s generation %d: not analysed, no notification", study_key(study_uid), generation)
                return
            for channel in self.channels:
                text = oru_r01(finding, self.facility, now) if channel == "hl7" else diagnostic_report(finding, now)
                write_text_atomic(work / "notify" / f"{channel}.pending", text)
        except Exception as err:  # a bug or an unreadable result: the analysis is kept, the cause logged
            log.error("study %s generation %d: notification not built: %s", study_key(study_uid), generation,
                      type(err).__name__)

    def wake(self) -> None:
        """A generation was committed: send its notifications now."""
        for event in self._wake.values():
            event.set()

    def start(self, stop: threading.Event) -> list[threading.Thread]:
        """One sender thread per configured channel; they end when ``stop`` is set."""
        threads = []
        for channel in self.channels:
            thread = threading.Thread(target=self._loop, args=(channel, stop), name=f"ichdet-notify-{channel}",
                                      daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    def _send(self, item: Pending) -> str | None:
        text = item.path.read_bytes().decode("utf-8")  # as written: read_text would turn HL7's \r into \n
        if item.channel == "hl7":
            assert self.hl7_to is not None
            return send_hl7(*self.hl7_to, text)
        assert self.fhir_url is not None
        return post_fhir(self.fhir_url, text, self.session)

    def send_pending(self, channel: str) -> bool:
        """Send the channel's pending notifications in order until one fails; True when none is left."""
        for item in pending_notifications(self.spool, channel):
            error = self._send(item)
            self.last_error[channel] = error
            if error is not None:
                tries = 1
                if item.error.exists():
                    tries += int(json.loads(item.error.read_text()).get("tries", 0))
                write_json_atomic(item.error, {"tries": tries, "reason": error})
                log.warning("study %s generation %d: %s notification not acknowledged (%s); retrying with "
                            "back-off", study_key(item.study_uid), item.generation, channel, error)
                return False
            write_text_atomic(item.acked, datetime.now().astimezone().isoformat(timespec="seconds") + "\n")
            item.error.unlink(missing_ok=True)
            log.info("study %s generation %d: %s notification acknowledged", study_key(item.study_uid),
                     item.generation, channel)
        return True

    def _loop(self, channel: str, stop: threading.Event) -> None:
        backoff = Backoff(*self.backoff)
        wake = self._wake[channel]
        wake.set()  # first pass at once: what a previous run left pending
        while not stop.is_set():
            if backoff.failures:
                if stop.wait(backoff.delay()):
                    return
            else:
                wake.wait(timeout=60)
            wake.clear()
            if stop.is_set():
                return
            try:
                ok = self.send_pending(channel)
            except Exception:  # e.g. a damaged file: log, back off, try again
                log.exception("%s notifications failed", channel)
                ok = False
            backoff.record(ok)

    def status(self) -> dict[str, Any]:
        """What only the running notifier knows: the last error per channel."""
        return {"notify_channels": self.channels, "last_notify_error": dict(self.last_error)}


def notifier_for(spool: Spool, cfg: ServeConfig) -> Notifier:
    """The notifier of a node's settings (no channel configured: one that does nothing); https verifies
    certificates, with the config's ``ca_bundle`` for a private CA."""
    hl7_to = (cfg.notify_hl7.host, cfg.notify_hl7.port) if cfg.notify_hl7 is not None else None
    session = verified_session(cfg.ca_bundle)
    return Notifier(spool, cfg.ae_title, hl7_to, cfg.notify_url, (cfg.retry_initial_seconds, cfg.retry_max_seconds),
                    session)
