"""Health and queue status: counted from the spool (works without a running node), served over HTTP."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from ichdet.serve.notify import notification_counts
from ichdet.serve.spool import Spool

__all__ = ["spool_status", "start_status_server"]


def spool_status(spool: Spool, quiet_seconds: float | None = None) -> dict[str, Any]:
    """Counts of studies by stage, pending sends and quarantined instances; no UIDs, no PHI.

    A study folder with no instance and no result (left by a write that failed, removed at the next start)
    is counted apart, never as a study analysed.
    """
    now = time.time()
    counts: dict[str, Any] = {"studies": 0, "receiving": 0, "waiting_analysis": 0, "analysed": 0, "failed": 0,
                              "instances": 0, "pending_sends": 0, "empty_study_folders": 0}
    for uid in spool.study_uids():
        state = spool.state(uid)
        if not state.received and not state.generations:  # e.g. the disk was full before its first instance
            counts["empty_study_folders"] += 1
            continue
        counts["studies"] += 1
        counts["instances"] += len(state.received)
        if state.needs_analysis():
            quiet = quiet_seconds is not None and state.is_due(now, quiet_seconds)
            counts["waiting_analysis" if quiet or quiet_seconds is None else "receiving"] += 1
        elif state.received and state.received == state.failed_inputs:
            counts["failed"] += 1
        else:
            counts["analysed"] += 1
        counts["pending_sends"] += len(spool.pending_sends(uid))
    counts["quarantined"] = len(list(spool.quarantine_dir.glob("*.reason.txt")))
    counts["outbox"] = len(list(spool.outbox.glob("*.json")))
    counts.update(notification_counts(spool))
    return counts


class _HasStatus(Protocol):
    def status(self) -> dict[str, Any]: ...


def start_status_server(node: _HasStatus, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``GET /status`` (JSON) and ``GET /health`` ("ok") in a background thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                body, kind = b"ok\n", "text/plain"
            elif self.path == "/status":
                body, kind = (json.dumps(node.status(), indent=2) + "\n").encode(), "application/json"
            else:
                self.send_error(404, "try /status or /health")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="ichdet-status", daemon=True).start()
    return server
