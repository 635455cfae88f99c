"""Real notification receivers for the tests: python-hl7's asyncio MLLP server (a RIS stand-in that records
every message and answers an ACK) and an http.server FHIR endpoint (records every POST, answers 201)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
from hl7.mllp import start_hl7_server


class MLLPReceiver:
    """An MLLP listener on ``127.0.0.1:port`` in a thread of its own.

    ``code``: the MSA-1 it answers (AA, AE, AR); ``hold``: when given, each answer waits until it is set
    (a test kills the sender in between). ``messages`` are the received messages as text, in order.
    """

    def __init__(self, port: int, code: str = "AA", hold: threading.Event | None = None) -> None:
        self.port, self.code, self.hold = port, code, hold
        self.messages: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._main: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    async def _client(self, reader: Any, writer: Any) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.messages.append(str(message))
                if self.hold is not None:
                    await asyncio.get_running_loop().run_in_executor(None, self.hold.wait)
                writer.writemessage(message.create_ack(self.code))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def serve() -> None:
            self._server = await start_hl7_server(self._client, "127.0.0.1", self.port)
            self._ready.set()
            await self._server.serve_forever()
        self._main = loop.create_task(serve())
        with contextlib.suppress(asyncio.CancelledError):  # stop() cancels serve_forever
            loop.run_until_complete(self._main)
        # let the connections' handlers end (closing their transports) before the loop closes
        others = asyncio.all_tasks(loop)
        for task in others:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*others, return_exceptions=True))
        loop.close()

    def start(self) -> MLLPReceiver:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the MLLP receiver did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._main is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._main.cancel)
        if self._thread is not None:
            self._thread.join(10)

    def control_ids(self) -> list[str]:
        """MSH-10 of every message received, in order."""
        return [str(hl7.parse(m).segment("MSH")[10]) for m in self.messages]


class FhirReceiver:
    """A FHIR endpoint on ``127.0.0.1:port`` that records each POSTed body and answers ``status``."""

    def __init__(self, port: int, status: int = 201) -> None:
        self.port, self.status = port, status
        self.posts: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/DiagnosticReport"

    def start(self) -> FhirReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.posts.append(json.loads(body))
                receiver.headers.append(dict(self.headers))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def identifiers(self) -> list[str]:
        return [p["identifier"][0]["value"] for p in self.posts]
