"""The non-blocking plumbing under every TLS probe phase, and the probe's failure vocabulary.

Owns the stable error-kind tokens a `ProbeResult.error_kind` carries (counters and
alerts key on them), `Failed` (ends a probe phase with a kind and a message), the
`Observed` scratch record a probe fills as it advances, and the pyOpenSSL-on-a-
non-blocking-socket helpers: `retry` an operation until done or a deadline, `wait`
with poll(2), `recv` that reports close_notify as EOF, and `ssl_reason`.
Must not: open connections, choose TLS settings, judge anything, or let `Failed`
escape `certmon.tlsprobe.probe`, which turns it into data.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from OpenSSL import SSL

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


def retry(
    op: Callable[[], _T], sock: socket.socket, until: float, timeout_kind: str, what: str
) -> _T:
    """Run a pyOpenSSL operation on a non-blocking socket until done or ``until`` passes."""
    while True:
        try:
            return op()
        except SSL.WantReadError:
            ready = wait(sock, write=False, until=until)
        except SSL.WantWriteError:
            ready = wait(sock, write=True, until=until)
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
        if not ready:
            raise Failed(timeout_kind, f"{what} timed out")


def recv(conn: SSL.Connection, size: int) -> bytes:
    """recv that reports the peer's close_notify as b"" like a socket does."""
    try:
        return conn.recv(size)
    except SSL.ZeroReturnError:
        return b""


def wait(sock: socket.socket, *, write: bool, until: float) -> bool:
    # poll, not select: a collector holding DB and HTTP sockets easily has fds >= 1024,
    # which select() cannot watch (FD_SETSIZE).
    remaining = until - time.monotonic()
    if remaining <= 0:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(max(1, int(remaining * 1000 + 0.999))))


def ssl_reason(exc: SSL.Error) -> str:
    # pyOpenSSL's args: [[(lib, func, reason), …]], e.g. "tlsv13 alert certificate required".
    items = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [str(i[2] or i[0]) for i in items if isinstance(i, tuple) and len(i) == 3]
    return "; ".join(reasons) or repr(exc)
