"""A loopback HTTP receiver for the alert sinks' tests: records every POST, answers as told.

Owns: a `ThreadingHTTPServer` on 127.0.0.1 (free port), what it received (`Received`,
with the monotonic instant), and the answer per request: `statuses` (consumed in
order, then 200), then `respond(body) -> status` to answer by content (a receiver
that refuses one bad alert), then 200.

Must not: talk to anything but loopback, or sleep a fixed time (`wait_for` polls a
condition).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HttpPeer", "Received", "serve_http"]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpPeer:
    url: str
    statuses: list[int] = field(default_factory=list)  # consumed per request; then 200
    respond: Callable[[bytes], int] | None = None  # answer by content (after statuses)
    received: list[Received] = field(default_factory=list)
    location: str | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Received]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.received) >= n, timeout), self.received
            return list(self.received)

    def answer(self, body: bytes) -> int:
        if self.statuses:
            return self.statuses.pop(0)
        return self.respond(body) if self.respond is not None else 200


@contextlib.contextmanager
def serve_http() -> Iterator[HttpPeer]:
    state = HttpPeer(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.cond:
                status = state.answer(body)
                state.received.append(Received(self.path, dict(self.headers), body,
                                               time.monotonic()))
                state.cond.notify_all()
            self.send_response(status)
            if state.location and 300 <= status < 400:
                self.send_header("Location", state.location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
