"""The running node: SCP threads spool instances; a scanner queues quiet studies; one worker analyses;
one sender delivers results; an optional HTTP endpoint reports status. All state is in the spool."""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from datetime import datetime
from typing import Any

from ichdet.io import folder_lock
from ichdet.serve.analysis import Analyser
from ichdet.serve.config import ServeConfig
from ichdet.serve.notify import notifier_for
from ichdet.serve.scp import start_scp
from ichdet.serve.sender import Backoff
from ichdet.serve.spool import Spool, study_key
from ichdet.serve.status import spool_status, start_status_server
from ichdet.serve.tls import client_context, server_context
from ichdet.serve.websend import deliver

__all__ = ["Node"]

log = logging.getLogger("ichdet.serve")


class Node:
    """``ichdet serve``: construct, :meth:`start`, then :meth:`wait` (or :meth:`stop`).

    ``analyser`` does the analysis of one study (``bundle_analyser(cfg.bundle)`` in production; any
    function with the same signature in tests of the network and the spool).
    """

    def __init__(self, cfg: ServeConfig, analyser: Analyser, *, scan_interval: float | None = None) -> None:
        self.cfg = cfg
        self.analyser = analyser
        self.spool = Spool(cfg.spool)
        # built now, so that a bad certificate or key stops the start with one line, before anything listens
        self.server_tls = server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.tls_cert and cfg.tls_key \
            else None
        self.send_tls = client_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.send_tls else None
        self.scan_interval = scan_interval or min(1.0, cfg.quiet_seconds / 4)
        self.queue: queue.Queue[str] = queue.Queue()  # study UIDs due for analysis, one worker drains it
        self.in_flight: set[str] = set()                # queued or being analysed
        self.analysing: str | None = None
        self.last_send_error: str | None = None
        self.started = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._send_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._servers: list[Any] = []
        self._held: Any = None
        self._settled: dict[str, int] = {}  # study UID -> received/ mtime when it needed nothing
        self.notifier = notifier_for(self.spool, cfg)  # HL7 / FHIR worklist notifications (none when not configured)

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Take the spool's lock, clean up after a crash, start listening and the background threads."""
        self._held = folder_lock(self.cfg.spool, "ichdet serve")
        self._held.__enter__()
        removed = self.spool.recover()
        for uid in self.spool.study_uids():  # a crash between commit and outbox copy
            for gen in self.spool.state(uid).generations:
                self.spool.publish(uid, gen)
        log.info("spool %s ready (%d leftover(s) of an interrupted run removed)", self.cfg.spool, removed)
        for target in (self._scan_loop, self._work_loop, self._send_loop):
            thread = threading.Thread(target=target, name=f"ichdet-{target.__name__.strip('_')}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._threads += self.notifier.start(self._stop)
        self._servers.append(start_scp(self.spool, self.cfg.ae_title, self.cfg.host, self.cfg.port,
                                       self.cfg.allow, lambda uid: None, ssl_context=self.server_tls))
        if self.cfg.status_port is not None:
            self._servers.append(start_status_server(self, "127.0.0.1", self.cfg.status_port))
        tls = "" if self.server_tls is None else " (TLS only, callers certified by tls_ca)" if self.cfg.tls_ca \
            else " (TLS only)"
        log.info("listening as %s on port %d%s; allowed callers: %s; results to %s%s", self.cfg.ae_title,
                 self.cfg.port, tls, ", ".join(self.cfg.allow), self.cfg.send_to or "(none)",
                 " over TLS" if self.send_tls else "")
        if self.notifier.channels:
            log.info("notifications to %s", ", ".join(filter(None, (
                f"HL7 {self.cfg.notify_hl7}" if self.cfg.notify_hl7 else None,
                f"FHIR {self.cfg.notify_url}" if self.cfg.notify_url else None))))

    def stop(self) -> None:
        """Stop listening and the threads (an analysis in progress finishes first); release the lock."""
        self._stop.set()
        self._send_wake.set()
        self.notifier.wake()
        for server in self._servers:
            server.shutdown()
        for thread in self._threads:
            thread.join()
        if self._held is not None:
            self._held.__exit__(None, None, None)
            self._held = None

    def wait(self) -> None:
        """Block until interrupted (Ctrl-C or SIGTERM through the caller), then stop."""
        try:
            while not self._stop.wait(3600):
                pass
        finally:
            self.stop()

    # -- threads ---------------------------------------------------------------------------------------
    def _scan_loop(self) -> None:
        last_clean = 0.0
        while not self._stop.wait(self.scan_interval):
            try:
                self.scan()
                if self.cfg.max_age_days and time.time() - last_clean > 3600:
                    last_clean = time.time()
                    for uid in self.spool.clean(self.cfg.max_age_days):
                        self._settled.pop(uid, None)
                        log.info("study %s removed (older than %s days, results sent)", study_key(uid),
                                 self.cfg.max_age_days)
            except Exception as err:  # a service thread must outlive one bad pass (a full disk, a damaged file)
                log.error("scan of the spool failed (%s); trying again", _safe(err))

    def scan(self) -> list[str]:
        """Queue every study that needs analysis and has been quiet long enough; return the queued UIDs."""
        queued, now = [], time.time()
        for uid in self.spool.study_uids():
            with self._lock:
                if uid in self.in_flight:
                    continue
            # a settled study (analysed, nothing new) is skipped on one stat: its received/ folder's mtime
            # changes with every instance renamed into it
            try:
                stamp = (self.spool.studies / uid / "received").stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self._settled.get(uid) == stamp:
                continue
            state = self.spool.state(uid)
            if not state.needs_analysis():
                self._settled[uid] = stamp
            elif state.is_due(now, self.cfg.quiet_seconds):
                with self._lock:
                    self.in_flight.add(uid)
                self.queue.put(uid)
                queued.append(uid)
                log.info("study %s complete, queued for analysis", study_key(uid))
        return queued

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                uid = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.analyse(uid)
            except Exception as err:  # the study stays due; the worker lives on
                log.error("analysis of study %s could not be recorded (%s)", study_key(uid), _safe(err))
            finally:
                with self._lock:
                    self.in_flight.discard(uid)

    def analyse(self, uid: str) -> None:
        """Analyse the instances the study has now as its next generation; commit it or record the failure."""
        state = self.spool.state(uid)
        generation, inputs = state.next_generation, state.received
        work = self.spool.begin(uid, generation, inputs)
        self.analysing = uid
        started = time.monotonic()
        try:
            (work / "out").mkdir()
            result = self.analyser(work / "input", work / "out")
        except Exception as err:  # one bad study must not stop the node: record it, go on
            self.spool.fail(uid, generation, work, inputs, f"{type(err).__name__}: {err}")
            log.error("study %s generation %d: analysis failed (%s); the reason is in the study's "
                      "failed-gen-%04d.json in the spool", study_key(uid), generation, _safe(err), generation)
            return
        finally:
            self.analysing = None
        # the notifications are written into the work folder, so the commit's rename makes them due with it
        self.notifier.prepare(work, uid, generation, result.json_path, datetime.now().astimezone())
        try:
            self.spool.commit(uid, generation, work, inputs, result.json_path, result.dicom_files)
        except (OSError, ValueError) as err:  # e.g. a result file outside the output folder, a full disk
            self.spool.fail(uid, generation, work, inputs, f"results not stored: {type(err).__name__}: {err}")
            log.error("study %s generation %d: results not stored (%s)", study_key(uid), generation, _safe(err))
            return
        log.info("study %s generation %d analysed (%d instances, %.1f s, %d result file(s))", study_key(uid),
                 generation, len(inputs), time.monotonic() - started, len(result.dicom_files))
        self._send_wake.set()
        self.notifier.wake()

    def _send_loop(self) -> None:
        if self.cfg.send_to is None:
            return
        backoff = Backoff(self.cfg.retry_initial_seconds, self.cfg.retry_max_seconds)
        self._send_wake.set()  # first pass at once: sends a previous run left pending
        while not self._stop.is_set():
            if backoff.failures:  # the destination failed: wait out the back-off, whatever arrives meanwhile
                if self._stop.wait(backoff.delay()):
                    return
            else:  # woken by each committed analysis; a periodic pass as a safety net
                self._send_wake.wait(timeout=60)
            self._send_wake.clear()
            if not self._stop.is_set():
                try:
                    ok = self.send_pending()
                except Exception as err:  # e.g. a damaged result file: log it, back off, try again
                    log.error("sending results failed (%s)", _safe(err))
                    ok = False
                backoff.record(ok)

    def send_pending(self) -> bool:
        """Try to send every pending result file; True when nothing is left (or nothing was pending)."""
        assert self.cfg.send_to is not None
        for uid in self.spool.study_uids():
            pending = self.spool.pending_sends(uid)
            if not pending:
                continue
            try:
                _, error = deliver(pending, self.cfg, tls=self.send_tls)
            except (OSError, RuntimeError, ValueError) as err:
                error = _safe(err)
            self.last_send_error = error
            if error:
                log.warning("study %s: results not delivered yet (%s); retrying with back-off", study_key(uid),
                            error)
                return False
        return True

    def status(self) -> dict[str, Any]:
        """Health and queue status: the spool's counts plus what only the running node knows."""
        status = spool_status(self.spool, self.cfg.quiet_seconds)
        status.update(running=True, uptime_seconds=round(time.time() - self.started, 1),
                      queued=self.queue.qsize(), analysing=study_key(self.analysing) if self.analysing else None,
                      last_send_error=self.last_send_error)
        status.update(self.notifier.status())
        return status


def _safe(err: BaseException) -> str:
    """An error for a log line: its type and the system's words, never its message (messages of the
    study pipeline and of pydicom quote paths holding UIDs, and header values)."""
    strerror = err.strerror if isinstance(err, OSError) else None
    return f"{type(err).__name__}: {strerror}" if strerror else type(err).__name__


def run_node(cfg: ServeConfig, analyser: Analyser) -> None:
    """Start a node and serve until interrupted."""
    node = Node(cfg, analyser)
    node.start()
    # SIGTERM (systemd stop, docker stop) stops like Ctrl-C: the analysis in progress finishes, state is on disk
    signal.signal(signal.SIGTERM, lambda signum, frame: node._stop.set())
    node.wait()

