"""The non-blocking plumbing under every TLS probe phase, and the probe's failure vocabulary.

Owns the stable error-kind tokens a `ProbeResult.error_kind` carries (counters and
alerts key on them), `Failed` (ends a probe phase with a kind and a message), the
`Observed` scratch record a probe fills as it advances, and how a probe waits: each
phase is a generator that yields a `Wait` (a socket to become readable or writable by
an instant) or a `Resolve` (a name lookup) where a blocking program would block.
`run_one` serves one probe's requests by blocking (poll(2), getaddrinfo); `run_all`
serves many probes' requests from one thread: one poll over every waiting socket,
name lookups on resolver threads (started only when a probe asks for one). Also the
pyOpenSSL-on-a-non-blocking-socket helpers: `retry` an operation until done or a
deadline, `recv` that reports close_notify as EOF, and `ssl_reason`.
Must not: open connections, choose TLS settings, judge anything, or let `Failed`
escape `certmon.tlsprobe.probe`, which turns it into data.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import ipaddress
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from OpenSSL import SSL

if TYPE_CHECKING:  # imported when a scan first looks a name up (a scan of IPs never does)
    from concurrent.futures import Future, ThreadPoolExecutor

_T = TypeVar("_T")

# Error kinds (stable tokens; counters and alerts key on them).
DNS = "dns"
CONNECT_REFUSED = "connect_refused"
CONNECT_TIMEOUT = "connect_timeout"
CONNECT_FAILED = "connect_failed"
HANDSHAKE_TIMEOUT = "handshake_timeout"
HANDSHAKE_FAILED = "handshake_failed"
CLIENT_CERT_REQUIRED = "client_cert_required"
CLIENT_CERT_REJECTED = "client_cert_rejected"
CLIENT_CERT_UNUSABLE = "client_cert_unusable"
MQTT_REFUSED = "mqtt_refused"
MQTT_NO_CONNACK = "mqtt_no_connack"
MQTT_TIMEOUT = "mqtt_timeout"
NOT_TLS = "not_tls"  # the port answers, but not with TLS (e.g. a plain-MQTT 1883)
BAD_TARGET = "bad_target"
PROBE_ERROR = "probe_error"


class Failed(Exception):
    """Ends a probe phase with (kind, message); never escapes `probe`.

    ``is_refusal``: the peer actively refused (TLS alert, or a TCP reset), as opposed to
    timing out or closing quietly.
    """

    def __init__(self, kind: str, message: str, *, is_refusal: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.is_refusal = is_refusal


@dataclass(slots=True)
class Observed:
    """Mutable scratch space filled while the probe advances; frozen into ProbeResult."""

    address: str | None = None
    chain: tuple[bytes, ...] = ()
    tls_version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    connect_s: float | None = None
    handshake_s: float | None = None
    mqtt_connack: int | None = None
    mqtt_error: str | None = None
    saw_cert_request: bool = False
    # The stapled OCSP response (b"": the server stapled none); None before the
    # ServerHello's extensions were seen.
    ocsp_response: bytes | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Resume me with True once `sock` is readable (writable), False once `until` passed."""

    sock: socket.socket
    write: bool
    until: float


@dataclass(frozen=True, slots=True)
class Resolve:
    """Resume me with getaddrinfo's answer for (host, port), or raise its error in me."""

    host: str
    port: int


# A probe phase: yields what it waits for, is resumed with the answer, returns its value.
Steps = Generator[Wait | Resolve, Any, _T]


def wait_for(sock: socket.socket, *, write: bool, until: float) -> Steps[bool]:
    """`yield from` me: True when `sock` is ready, False when `until` passed first."""
    ready: bool = yield Wait(sock, write, until)
    return ready


def retry(
    op: Callable[[], _T], sock: socket.socket, until: float, timeout_kind: str, what: str
) -> Steps[_T]:
    """Run a pyOpenSSL operation on a non-blocking socket until done or ``until`` passes."""
    while True:
        try:
            return op()
        except SSL.WantReadError:
            write = False
        except SSL.WantWriteError:
            write = True
        except SSL.SysCallError as exc:
            code = exc.args[0] if exc.args else None
            if code == -1:  # EOF where OpenSSL expected a record
                raise Failed(HANDSHAKE_FAILED, f"{what}: peer closed the connection") from exc
            reason = os.strerror(code) if isinstance(code, int) else repr(exc)
            reset = code == errno.ECONNRESET
            raise Failed(HANDSHAKE_FAILED, f"{what}: {reason}", is_refusal=reset) from exc
        except SSL.Error as exc:
            reason = ssl_reason(exc)
            # OpenSSL 3+ reports a socket error (here: ECONNRESET) as a bare "system library"
            # entry with the errno dropped; pyOpenSSL then has nothing better to say.
            reset = reason == "system library"
            if reset:
                reason = "connection reset by peer (socket error)"
            refused = reset or "alert" in reason
            raise Failed(HANDSHAKE_FAILED, f"{what}: {reason}", is_refusal=refused) from exc
        if not (yield from wait_for(sock, write=write, until=until)):
            raise Failed(timeout_kind, f"{what} timed out")


def recv(conn: SSL.Connection, size: int) -> bytes:
    """recv that reports the peer's close_notify as b"" like a socket does."""
    try:
        return conn.recv(size)
    except SSL.ZeroReturnError:
        return b""


def ssl_reason(exc: SSL.Error) -> str:
    # pyOpenSSL's args: [[(lib, func, reason), …]], e.g. "tlsv13 alert certificate required".
    items = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [str(i[2] or i[0]) for i in items if isinstance(i, tuple) and len(i) == 3]
    return "; ".join(reasons) or repr(exc)


# --- serving the requests -----------------------------------------------------------------


def poll_one(sock: socket.socket, *, write: bool, until: float) -> bool:
    # poll, not select: a collector holding DB and HTTP sockets easily has fds >= 1024,
    # which select() cannot watch (FD_SETSIZE).
    remaining = until - time.monotonic()
    if remaining <= 0:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(max(1, int(remaining * 1000 + 0.999))))


def _lookup(request: Resolve) -> list[Any]:
    return socket.getaddrinfo(request.host, request.port, type=socket.SOCK_STREAM)


def run_one(steps: Steps[_T]) -> _T:
    """Run one probe in this thread, blocking wherever it waits."""
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as stop:
            value: _T = stop.value
            return value
        answer, error = None, None
        if isinstance(request, Wait):
            answer = poll_one(request.sock, write=request.write, until=request.until)
        else:
            try:
                answer = _lookup(request)
            except Exception as exc:  # noqa: BLE001 - handed to the phase that asked
                error = exc


@functools.lru_cache(maxsize=4096)  # asked several times per probe, of few hosts
def is_ip_literal(host: str) -> bool:
    """"192.0.2.1", "::1", "fe80::1%eth0" (a scoped IPv6 literal is one too)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def run_all(probes: Iterable[Steps[_T]], limit: int) -> list[_T]:
    """Run probes with at most `limit` in flight, all in this thread; results in input
    order. Why not a thread per probe: 64 threads handing the GIL to each other between
    a handshake's steps spend two to three times the CPU per probe of one thread polling
    them all (docs/benchmarks.md), and the probes are most of a scan's CPU."""
    loop = _Loop(limit)
    try:
        return loop.run(probes)
    finally:
        loop.close()


class _Loop:
    """One poll(2) over every waiting probe's socket, a timer heap for their deadlines,
    and threads for name lookups (getaddrinfo cannot be polled)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.running: dict[int, Steps[Any]] = {}
        self.ready: deque[tuple[int, Any, BaseException | None]] = deque()
        self.waiting: dict[int, tuple[int, Wait]] = {}  # fd → (probe, what it waits for)
        self.timers: list[tuple[float, int, int, Wait]] = []  # (until, seq, probe, request)
        self.seq = 0
        self.poller = select.poll()
        self.lookups: deque[tuple[int, Future[list[Any]]]] = deque()  # appended by resolvers
        self.resolver: ThreadPoolExecutor | None = None
        # A lookup finished on a resolver thread writes a byte here to wake the poll;
        # the lock keeps a lookup finishing after the scan from writing to a closed one.
        self.wake_lock = threading.Lock()
        self.is_closed = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.poller.register(self.wake_r, select.POLLIN)

    def run(self, probes: Iterable[Steps[_T]]) -> list[_T]:
        pending = enumerate(probes)
        results: dict[int, _T] = {}

        def start_next() -> None:
            while len(self.running) < self.limit:
                item = next(pending, None)
                if item is None:
                    return
                self.running[item[0]] = item[1]
                self.ready.append((item[0], None, None))

        start_next()
        while self.running:
            while self.ready:
                index, answer, error = self.ready.popleft()
                steps = self.running[index]
                try:
                    request = steps.send(answer) if error is None else steps.throw(error)
                except StopIteration as stop:
                    results[index] = stop.value
                    del self.running[index]
                    start_next()
                    continue
                self._serve(index, request)
            if self.running:
                self._poll()
        return [results[i] for i in range(len(results))]

    def _serve(self, index: int, request: Wait | Resolve) -> None:
        if isinstance(request, Wait):
            if request.until <= time.monotonic():
                self.ready.append((index, False, None))
                return
            fd = request.sock.fileno()
            self.waiting[fd] = (index, request)
            self.poller.register(fd, select.POLLOUT if request.write else select.POLLIN)
            self.seq += 1
            heapq.heappush(self.timers, (request.until, self.seq, index, request))
        elif is_ip_literal(request.host):  # nothing to wait for: answered now
            try:
                self.ready.append((index, _lookup(request), None))
            except Exception as exc:  # noqa: BLE001 - handed to the phase that asked
                self.ready.append((index, None, exc))
        else:
            if self.resolver is None:
                from concurrent.futures import ThreadPoolExecutor

                # As many lookups in flight as probes: a slow resolver then costs a
                # scan of names what it cost when each probe had its own thread.
                self.resolver = ThreadPoolExecutor(self.limit, "tlsprobe-dns")
            future = self.resolver.submit(_lookup, request)
            future.add_done_callback(lambda done: self._resolved(index, done))

    def _resolved(self, index: int, future: Future[list[Any]]) -> None:  # resolver thread
        self.lookups.append((index, future))
        with self.wake_lock, contextlib.suppress(OSError):
            if not self.is_closed:
                self.wake_w.send(b"\0")

    def _is_current(self, request: Wait) -> bool:
        return self.waiting.get(request.sock.fileno(), (0, None))[1] is request

    def _poll(self) -> None:
        while self.timers and not self._is_current(self.timers[0][3]):
            heapq.heappop(self.timers)  # answered already
        timeout_ms = -1
        if self.timers:
            left_s = self.timers[0][0] - time.monotonic()
            timeout_ms = max(0, int(left_s * 1000 + 0.999))
        for fd, _events in self.poller.poll(timeout_ms):
            if fd == self.wake_r.fileno():
                with contextlib.suppress(BlockingIOError):
                    self.wake_r.recv(4096)
                continue
            index, _request = self.waiting.pop(fd)
            self.poller.unregister(fd)
            self.ready.append((index, True, None))
        while self.lookups:
            index, future = self.lookups.popleft()
            error = future.exception()
            self.ready.append((index, None if error else future.result(), error))
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _until, _seq, index, request = heapq.heappop(self.timers)
            if self._is_current(request):
                del self.waiting[request.sock.fileno()]
                self.poller.unregister(request.sock)
                self.ready.append((index, False, None))

    def close(self) -> None:
        for steps in self.running.values():
            steps.close()  # after an unexpected error: each probe's finally closes its socket
        if self.resolver is not None:
            self.resolver.shutdown(wait=False, cancel_futures=True)
        with self.wake_lock:
            self.is_closed = True
            self.wake_r.close()
            self.wake_w.close()
