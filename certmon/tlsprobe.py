"""Observe what a TLS endpoint presents: the full chain as sent, version, cipher, ALPN, timings.

Owns: connecting (IPv4/IPv6, SNI, ALPN, optional client certificate), the TLS handshake with
verification OFF, capturing the presented chain as DER bytes in the order the server sent it,
and an optional clean MQTT 3.1.1 CONNECT/CONNACK/DISCONNECT exchange on top.

Must not: judge anything. No expiry, chain, hostname or key-strength checks here (that is
``certmon.pki``), and never raise because of what the server presented: an expired, self-signed
or RSA-1024/SHA-1 certificate is exactly what a scan must report ("observe first, judge second").
A failed probe (refused, timeout, alert) is data too: ``probe`` returns a ``ProbeResult`` with
``error``/``error_kind`` set and keeps every fact it gathered before the failure.

Why pyOpenSSL on every Python version instead of ``ssl.SSLSocket.get_unverified_chain``
(3.13+): the stdlib wraps whichever OpenSSL the interpreter was built with (3.0 here), while
pyOpenSSL uses the one bundled with ``cryptography`` (4.0 here). Two code paths would observe
different protocol/cipher/security-level behaviour on different hosts, and the stdlib has no
info callback, which is how ``client_cert_requested`` is determined. One path, one behaviour.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from OpenSSL import SSL, crypto

__all__ = ["ProbeResult", "ProbeTarget", "probe", "probe_many", "sni_for"]

_T = TypeVar("_T")

# Security level 0, so weak endpoints complete the handshake and their certificates get
# observed and reported instead of hiding behind "handshake failed". Measured with the
# OpenSSL 4.0 that cryptography bundles: at the default level the client does not offer
# TLS 1.0/1.1 at all (an old broker answers alert "protocol version"); at level 0 an
# RSA-1024/SHA-1 server over TLS 1.0 completes (tests/test_tlsprobe.py). Level 0 also
# re-allows SHA-1 handshake signatures and small DH groups that old stacks need. ALL rather
# than DEFAULT so servers offering only CBC or RSA key exchange still talk.
_CIPHERS = b"ALL:@SECLEVEL=0"

# How long to wait, after a TLS 1.3 handshake in which the server asked for a client
# certificate, for its verdict on ours (see _await_tls13_client_auth). Servers decide as
# soon as our last flight arrives, so this is about one round trip plus their CPU time.
_TLS13_AUTH_WAIT_S = 1.0

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
BAD_TARGET = "bad_target"
PROBE_ERROR = "probe_error"


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One endpoint to observe. ``timeout_s`` bounds the whole probe (connect+TLS+MQTT)."""

    host: str
    port: int = 8883
    # None → the host when it is a name; no SNI at all for an IP literal (RFC 6066 forbids it).
    servername: str | None = None
    alpn: tuple[str, ...] = ()
    client_cert: str | None = None
    client_key: str | None = None
    mqtt: bool = False
    mqtt_client_id: str = "certmon-scan"
    timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What was observed. Facts gathered before a failure are kept (e.g. the chain)."""

    target: ProbeTarget
    address: str | None = None
    presented_der: tuple[bytes, ...] = ()
    tls_version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    error: str | None = None
    error_kind: str | None = None
    connect_s: float | None = None
    handshake_s: float | None = None
    mqtt_connack: int | None = None
    mqtt_error: str | None = None
    client_cert_requested: bool | None = None


class _Failed(Exception):
    """Internal: ends a probe phase with (kind, message); never escapes this module.

    ``is_refusal``: the peer actively refused (TLS alert, or a TCP reset), as opposed to
    timing out or closing quietly.
    """

    def __init__(self, kind: str, message: str, *, is_refusal: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.is_refusal = is_refusal


@dataclass(slots=True)
class _Observed:
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


def sni_for(target: ProbeTarget) -> str | None:
    """The SNI name to send: explicit servername, else the host unless it is an IP literal."""
    if target.servername is not None:
        return target.servername or None
    host = _bare_host(target.host)
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # "fe80::1%eth0" is an IP literal too
    except ValueError:
        return host
    return None


def _bare_host(host: str) -> str:
    # "[::1]" as written in URLs and configs → "::1" for getaddrinfo and the IP check.
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def probe(target: ProbeTarget) -> ProbeResult:
    """Observe one endpoint; blocking, bounded by ``target.timeout_s`` (DNS excepted)."""
    seen = _Observed()
    deadline = time.monotonic() + target.timeout_s
    error: _Failed | None = None
    try:
        if not 0 < target.port < 65536:  # getaddrinfo would silently wrap 70000 to 4464
            raise _Failed(BAD_TARGET, f"port out of range: {target.port}")
        _run(target, seen, deadline)
    except _Failed as exc:
        error = exc
    except (OSError, SSL.Error) as exc:  # e.g. EMFILE: still data, probe_many must go on
        error = _Failed(PROBE_ERROR, f"{type(exc).__name__}: {exc}")
    # A completed handshake without a CertificateRequest means "not requested": we never
    # offer TLS 1.3 post-handshake auth, so the server had no later chance to ask.
    requested = True if seen.saw_cert_request else (False if seen.tls_version else None)
    return ProbeResult(
        target=target,
        address=seen.address,
        presented_der=seen.chain,
        tls_version=seen.tls_version,
        cipher=seen.cipher,
        alpn=seen.alpn,
        error=error.message if error else None,
        error_kind=error.kind if error else None,
        connect_s=seen.connect_s,
        handshake_s=seen.handshake_s,
        mqtt_connack=seen.mqtt_connack,
        mqtt_error=seen.mqtt_error,
        client_cert_requested=requested,
    )


def probe_many(targets: Sequence[ProbeTarget], concurrency: int = 64) -> list[ProbeResult]:
    """Probe concurrently; results in input order.

    Each probe is bounded by its own deadline, so a black-holed endpoint only ties up one
    worker for its timeout. With more targets than ``concurrency`` later targets queue.
    """
    if not targets:
        return []
    workers = max(1, min(concurrency, len(targets)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tlsprobe") as pool:
        return list(pool.map(probe, targets))


# --- phases -------------------------------------------------------------------------------


def _run(target: ProbeTarget, seen: _Observed, deadline: float) -> None:
    ctx = _context(target, seen)
    sock = _connect(target, seen, deadline)
    try:
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        sni = sni_for(target)
        if sni is not None:
            try:
                conn.set_tlsext_host_name(sni.encode("idna"))
            except UnicodeError as exc:
                raise _Failed(DNS, f"servername not encodable for SNI: {sni!r}") from exc
        _handshake(conn, sock, target, seen, deadline)
        if target.mqtt:
            _mqtt_exchange(conn, sock, target, seen, deadline)
            _close_notify(conn)
        else:
            _close_notify(conn)
            if seen.saw_cert_request and seen.tls_version == "TLSv1.3":
                _await_tls13_client_auth(conn, sock, target, deadline)
    finally:
        sock.close()


def _context(target: ProbeTarget, seen: _Observed) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE)
    # Observation floor: TLS 1.0 (SSLv3 is gone from OpenSSL 4). Without @SECLEVEL=0 the
    # client does not even offer 1.0/1.1 and such servers answer "protocol version".
    ctx.set_min_proto_version(SSL.TLS1_VERSION)
    ctx.set_cipher_list(_CIPHERS)
    # LEGACY_SERVER_CONNECT: OpenSSL 3+ refuses servers without RFC 5746 secure renegotiation;
    # old embedded brokers lack it and must still be observed. No tickets: one-shot sessions.
    ctx.set_options(SSL.OP_LEGACY_SERVER_CONNECT | SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    if target.alpn:
        ctx.set_alpn_protos([p.encode() for p in target.alpn])
    if target.client_cert:
        try:
            ctx.use_certificate_chain_file(target.client_cert)
            ctx.use_privatekey_file(target.client_key or target.client_cert)
            ctx.check_privatekey()
        except SSL.Error as exc:
            message = f"client certificate/key: {_ssl_reason(exc)}"
            raise _Failed(CLIENT_CERT_UNUSABLE, message) from exc

    # The only way to learn whether the server sent a CertificateRequest (TLS 1.2 and 1.3
    # alike): watch the client state machine pass "read server certificate request".
    def on_state(conn: SSL.Connection, where: int, _ret: int) -> None:
        if where & SSL.SSL_CB_LOOP and b"certificate request" in conn.get_state_string():
            seen.saw_cert_request = True

    ctx.set_info_callback(on_state)
    return ctx


def _connect(target: ProbeTarget, seen: _Observed, deadline: float) -> socket.socket:
    host = _bare_host(target.host)
    try:
        infos = socket.getaddrinfo(host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _Failed(DNS, f"cannot resolve {host!r}: {exc}") from exc
    last = _Failed(CONNECT_TIMEOUT, "no time left to connect")
    for index, (family, kind, proto, _name, sockaddr) in enumerate(infos):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        # Share what is left among the addresses not yet tried, so one black-holed AAAA
        # does not starve a working A record (a poor man's happy eyeballs, RFC 8305).
        started = time.monotonic()
        sock = socket.socket(family, kind, proto)
        try:
            _connect_one(sock, sockaddr, started + remaining / (len(infos) - index))
        except _Failed as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        seen.connect_s = time.monotonic() - started
        seen.address = str(sockaddr[0])
        return sock
    raise last


def _connect_one(sock: socket.socket, sockaddr: tuple[Any, ...], until: float) -> None:
    sock.setblocking(False)
    where = f"{sockaddr[0]} port {sockaddr[1]}"
    err = sock.connect_ex(sockaddr)
    if err in (errno.EINPROGRESS, errno.EWOULDBLOCK):
        if not _wait(sock, write=True, until=until):
            raise _Failed(CONNECT_TIMEOUT, f"TCP connect to {where} timed out")
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        kind = {errno.ECONNREFUSED: CONNECT_REFUSED, errno.ETIMEDOUT: CONNECT_TIMEOUT}
        message = f"TCP connect to {where}: {os.strerror(err)}"
        raise _Failed(kind.get(err, CONNECT_FAILED), message)


def _handshake(
    conn: SSL.Connection, sock: socket.socket, target: ProbeTarget, seen: _Observed, deadline: float
) -> None:
    started = time.monotonic()
    try:
        _retry(conn.do_handshake, sock, deadline, HANDSHAKE_TIMEOUT, "TLS handshake")
    except _Failed as exc:
        # Keep what the server showed before it failed: in TLS 1.2 its chain comes before its
        # CertificateRequest, so a broker that aborts for want of our certificate still
        # shows us its own.
        seen.chain = _chain_der(conn)
        if exc.kind == HANDSHAKE_FAILED and seen.saw_cert_request:
            raise _Failed(_client_cert_kind(target), exc.message) from exc
        raise
    seen.handshake_s = time.monotonic() - started
    seen.chain = _chain_der(conn)
    seen.tls_version = conn.get_protocol_version_name()
    seen.cipher = conn.get_cipher_name()
    seen.alpn = conn.get_alpn_proto_negotiated().decode("ascii", "replace") or None


def _await_tls13_client_auth(
    conn: SSL.Connection, sock: socket.socket, target: ProbeTarget, deadline: float
) -> None:
    # TLS 1.3 quirk: the client's certificate travels in its last flight, so our handshake
    # "succeeds" before the server has judged it. A refusal (alert 116 certificate_required,
    # 42 bad_certificate, 48 unknown_ca …) comes on the next read. We have sent close_notify:
    # a server that accepted us answers close_notify or EOF; one that refused sends the alert
    # and closes without reading our close_notify, so the kernel may answer with a RST that
    # discards the alert: a reset here is a refusal too.
    until = min(deadline, time.monotonic() + _TLS13_AUTH_WAIT_S)
    try:
        _retry(lambda: _recv(conn, 1024), sock, until, HANDSHAKE_TIMEOUT, "after handshake")
    except _Failed as exc:
        if exc.is_refusal:
            raise _Failed(_client_cert_kind(target), exc.message) from exc


def _client_cert_kind(target: ProbeTarget) -> str:
    # Once the server has asked for a certificate, the only judgement left on its side is
    # of our certificate: none sent → required; one sent → rejected (untrusted, expired …).
    return CLIENT_CERT_REJECTED if target.client_cert else CLIENT_CERT_REQUIRED


def _close_notify(conn: SSL.Connection) -> None:
    # Best effort: a clean close_notify keeps brokers from logging a protocol error, but a
    # peer that already closed must not turn a success into a failure.
    with contextlib.suppress(SSL.Error, OSError):
        conn.shutdown()


# --- MQTT 3.1.1 -----------------------------------------------------------------------------
# Three fixed packets are hand-encoded: the scanner needs exactly CONNECT → CONNACK →
# DISCONNECT on the TLS session it already holds (whose chain and timings it just recorded),
# which no MQTT client library exposes; this is wire necessity, not a client. MQTT 3.1.1
# §3.1 CONNECT, §3.2 CONNACK, §3.14 DISCONNECT.

DISCONNECT = b"\xe0\x00"
_CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


def encode_connect(client_id: str, keepalive_s: int = 10) -> bytes:
    """MQTT 3.1.1 CONNECT: clean session, no will, no credentials."""
    cid = client_id.encode("utf-8")
    body = b"\x00\x04MQTT\x04\x02" + keepalive_s.to_bytes(2, "big")  # level 4, clean session
    body += len(cid).to_bytes(2, "big") + cid
    length = bytearray()
    n = len(body)
    while True:  # "remaining length" varint, §2.2.3
        n, byte = divmod(n, 128)
        length.append(byte | (0x80 if n else 0))
        if not n:
            return b"\x10" + bytes(length) + body


def _mqtt_exchange(
    conn: SSL.Connection, sock: socket.socket, target: ProbeTarget, seen: _Observed, deadline: float
) -> None:
    packet = encode_connect(target.mqtt_client_id)
    data = b""
    try:
        _retry(lambda: conn.sendall(packet), sock, deadline, MQTT_TIMEOUT, "MQTT CONNECT")
        while len(data) < 4:
            read = functools.partial(_recv, conn, 4 - len(data))
            chunk = _retry(read, sock, deadline, MQTT_TIMEOUT, "CONNACK")
            if not chunk:
                raise _Failed(MQTT_NO_CONNACK, "connection closed before CONNACK")
            data += chunk
    except _Failed as exc:
        seen.mqtt_error = exc.message
        kind = exc.kind
        if exc.is_refusal and seen.saw_cert_request and seen.tls_version == "TLSv1.3":
            kind = _client_cert_kind(target)  # the TLS 1.3 quirk above; here it surfaces
        elif exc.kind == HANDSHAKE_FAILED:
            kind = MQTT_NO_CONNACK
        raise _Failed(kind, exc.message) from exc
    if data[:2] != b"\x20\x02":
        seen.mqtt_error = f"expected CONNACK, got {data.hex()}"
        raise _Failed(MQTT_NO_CONNACK, seen.mqtt_error)
    seen.mqtt_connack = data[3]
    if data[3] != 0:
        # The broker closes after a refusing CONNACK (§3.2.2.3); no DISCONNECT is owed.
        seen.mqtt_error = _CONNACK_REASONS.get(data[3], f"return code {data[3]}")
        raise _Failed(MQTT_REFUSED, f"CONNACK {data[3]}: {seen.mqtt_error}")
    try:
        _retry(lambda: conn.sendall(DISCONNECT), sock, deadline, MQTT_TIMEOUT, "DISCONNECT")
    except _Failed as exc:
        seen.mqtt_error = exc.message  # accepted already; a failed goodbye is noted, not fatal


# --- non-blocking plumbing ----------------------------------------------------------------


def _retry(
    op: Callable[[], _T], sock: socket.socket, until: float, timeout_kind: str, what: str
) -> _T:
    """Run a pyOpenSSL operation on a non-blocking socket until done or ``until`` passes."""
    while True:
        try:
            return op()
        except SSL.WantReadError:
            ready = _wait(sock, write=False, until=until)
        except SSL.WantWriteError:
            ready = _wait(sock, write=True, until=until)
        except SSL.SysCallError as exc:
            code = exc.args[0] if exc.args else None
            if code == -1:  # EOF where OpenSSL expected a record
                raise _Failed(HANDSHAKE_FAILED, f"{what}: peer closed the connection") from exc
            reason = os.strerror(code) if isinstance(code, int) else repr(exc)
            reset = code == errno.ECONNRESET
            raise _Failed(HANDSHAKE_FAILED, f"{what}: {reason}", is_refusal=reset) from exc
        except SSL.Error as exc:
            reason = _ssl_reason(exc)
            # OpenSSL 3+ reports a socket error (here: ECONNRESET) as a bare "system library"
            # entry with the errno dropped; pyOpenSSL then has nothing better to say.
            reset = reason == "system library"
            if reset:
                reason = "connection reset by peer (socket error)"
            refused = reset or "alert" in reason
            raise _Failed(HANDSHAKE_FAILED, f"{what}: {reason}", is_refusal=refused) from exc
        if not ready:
            raise _Failed(timeout_kind, f"{what} timed out")


def _recv(conn: SSL.Connection, size: int) -> bytes:
    """recv that reports the peer's close_notify as b"" like a socket does."""
    try:
        return conn.recv(size)
    except SSL.ZeroReturnError:
        return b""


def _wait(sock: socket.socket, *, write: bool, until: float) -> bool:
    # poll, not select: a collector holding DB and HTTP sockets easily has fds >= 1024,
    # which select() cannot watch (FD_SETSIZE).
    remaining = until - time.monotonic()
    if remaining <= 0:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLOUT if write else select.POLLIN)
    return bool(poller.poll(max(1, int(remaining * 1000 + 0.999))))


def _chain_der(conn: SSL.Connection) -> tuple[bytes, ...]:
    # X509 objects, not as_cryptography: the DER comes straight from OpenSSL's cached
    # encoding, so a certificate cryptography would refuse to parse is still captured.
    chain = conn.get_peer_cert_chain() or []
    return tuple(crypto.dump_certificate(crypto.FILETYPE_ASN1, c) for c in chain)


def _ssl_reason(exc: SSL.Error) -> str:
    # pyOpenSSL's args: [[(lib, func, reason), …]], e.g. "tlsv13 alert certificate required".
    items = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [str(i[2] or i[0]) for i in items if isinstance(i, tuple) and len(i) == 3]
    return "; ".join(reasons) or repr(exc)
