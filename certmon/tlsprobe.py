"""Observe what a TLS endpoint presents: the full chain as sent, version, cipher, ALPN, timings.

Owns: connecting (IPv4/IPv6, SNI, ALPN, optional client certificate), the TLS handshake with
verification OFF, capturing the presented chain as DER bytes in the order the server sent it,
and an optional clean MQTT 3.1.1 CONNECT/CONNACK/DISCONNECT exchange on top (its packets are
``certmon.mqttprobe``'s; the non-blocking plumbing and the error kinds are ``certmon.probeio``'s).
When the handshake fails without a word of TLS from the server, telling "this port does not
speak TLS" (error kind ``not_tls``; a plain-MQTT 1883 answers a plain CONNECT) from a broken
TLS listener. The result types, ``ProbeTarget`` and ``ProbeResult``, are this module's.

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

Each phase is written once, as a generator that yields where it would block
(``certmon.probeio``): ``probe`` runs one endpoint's phases blocking, ``probe_many`` runs
many endpoints' phases from one thread, and the probes of one ``probe_many`` share one
``SSL.Context`` per client configuration (each connection carries its own record).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL, crypto

from .mqttprobe import DISCONNECT, encode_connect, mqtt_exchange, plain_connack
from .probeio import (
    BAD_TARGET,
    CLIENT_CERT_REJECTED,
    CLIENT_CERT_REQUIRED,
    CLIENT_CERT_UNUSABLE,
    CONNECT_FAILED,
    CONNECT_REFUSED,
    CONNECT_TIMEOUT,
    DNS,
    HANDSHAKE_FAILED,
    HANDSHAKE_TIMEOUT,
    NOT_TLS,
    PROBE_ERROR,
    Failed,
    Observed,
    Resolve,
    Steps,
    is_ip_literal,
    recv,
    retry,
    run_all,
    run_one,
    ssl_reason,
    wait_for,
)

# DISCONNECT and encode_connect stay importable from here: the probe's tests use them.
__all__ = ["DISCONNECT", "ProbeResult", "ProbeTarget", "encode_connect", "probe",
           "probe_many", "sni_for"]

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
    duration_s: float | None = None  # wall time of the whole probe, MQTT exchange included
    # The OCSP response the server stapled (b"": none); None when the handshake did
    # not get that far.
    ocsp_response: bytes | None = None


def sni_for(target: ProbeTarget) -> str | None:
    """The SNI name to send: explicit servername, else the host unless it is an IP literal."""
    if target.servername is not None:
        return target.servername or None
    host = _bare_host(target.host)
    return None if is_ip_literal(host) else host


def _bare_host(host: str) -> str:
    # "[::1]" as written in URLs and configs → "::1" for getaddrinfo and the IP check.
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def probe(target: ProbeTarget) -> ProbeResult:
    """Observe one endpoint; blocking, bounded by ``target.timeout_s`` (DNS excepted)."""
    return run_one(_probe(target, _Contexts()))


def probe_many(targets: Sequence[ProbeTarget], concurrency: int = 64) -> list[ProbeResult]:
    """Probe concurrently, at most ``concurrency`` at a time; results in input order.

    Each probe is bounded by its own deadline, so a black-holed endpoint only holds one
    of the ``concurrency`` slots for its timeout. With more targets, later ones queue.
    """
    contexts = _Contexts()
    return run_all((_probe(target, contexts) for target in targets), concurrency)


def _probe(target: ProbeTarget, contexts: _Contexts) -> Steps[ProbeResult]:
    seen = Observed()
    started = time.monotonic()
    deadline = started + target.timeout_s
    error: Failed | None = None
    try:
        if not 0 < target.port < 65536:  # getaddrinfo would silently wrap 70000 to 4464
            raise Failed(BAD_TARGET, f"port out of range: {target.port}")
        yield from _run(target, contexts, seen, deadline)
    except Failed as exc:
        error = exc
    except (OSError, SSL.Error) as exc:  # e.g. EMFILE: still data, probe_many must go on
        error = Failed(PROBE_ERROR, f"{type(exc).__name__}: {exc}")
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
        duration_s=time.monotonic() - started,
        ocsp_response=seen.ocsp_response,
    )


# --- phases -------------------------------------------------------------------------------


def _run(target: ProbeTarget, contexts: _Contexts, seen: Observed, deadline: float
         ) -> Steps[None]:
    ctx = contexts.get(target)
    sock = yield from _connect(target, seen, deadline)
    try:
        conn = SSL.Connection(ctx, sock)
        conn.set_app_data(seen)  # what the context's callbacks record into
        conn.set_connect_state()
        conn.request_ocsp()
        sni = sni_for(target)
        if sni is not None:
            try:
                conn.set_tlsext_host_name(sni.encode("idna"))
            except UnicodeError as exc:
                raise Failed(DNS, f"servername not encodable for SNI: {sni!r}") from exc
        try:
            yield from _handshake(conn, sock, target, seen, deadline)
        except Failed as exc:
            if exc.kind != HANDSHAKE_FAILED or seen.chain or seen.saw_cert_request:
                raise
            raise (yield from _not_tls(target, exc, deadline)) from exc
        if target.mqtt:
            yield from mqtt_exchange(conn, sock, seen, deadline,
                                     client_id=target.mqtt_client_id,
                                     refusal_kind=_client_cert_kind(target))
            _close_notify(conn)
        else:
            _close_notify(conn)
            if seen.saw_cert_request and seen.tls_version == "TLSv1.3":
                yield from _await_tls13_client_auth(conn, sock, target, deadline)
    finally:
        sock.close()


# OpenSSL's words for a reply that is not a TLS record at all (an HTTP or SSH banner, an
# MQTT CONNACK): the record header's version or length makes no sense.
_NOT_A_RECORD = ("wrong version number", "packet length too long")


def _not_tls(target: ProbeTarget, failed: Failed, deadline: float) -> Steps[Failed]:
    """The handshake failed before the server said anything TLS. Ask the port a plain
    MQTT CONNECT (new connection): a CONNACK means an MQTT listener without TLS — what
    Mosquitto's 1883 does with a ClientHello is reset the connection, which alone
    would read as a broken TLS listener. Else, non-TLS bytes in reply still mean "not
    TLS"; a bare reset or close stays the handshake failure it was."""
    host = _bare_host(target.host)
    where = f"[{host}]:{target.port}" if ":" in host else f"{host}:{target.port}"
    connack = None
    with contextlib.suppress(Failed):
        sock = yield from _connect(target, Observed(), deadline)
        try:
            connack = yield from plain_connack(sock, deadline, client_id=target.mqtt_client_id)
        finally:
            sock.close()
    if connack is not None:
        return Failed(NOT_TLS, f"{where} does not speak TLS: it answers MQTT without TLS "
                      f"(CONNACK {connack} to a plain CONNECT); use mqtt:// for it, or the "
                      "broker's TLS listener (usually port 8883)")
    if any(words in failed.message for words in _NOT_A_RECORD):
        return Failed(NOT_TLS, f"{where} does not speak TLS: it answered the ClientHello "
                      "with non-TLS data (a plain-text service on this port?)")
    return failed


class _Contexts:
    """One client context per (ALPN, client certificate, key) for the probes of one call:
    creating one costs ~0.14 ms of CPU, about a fifth of a whole loopback probe's client
    side, and nothing a probe observes lives in it (no session cache on a client context,
    no tickets), so the probes stay independent."""

    def __init__(self) -> None:
        self._built: dict[tuple[object, ...], SSL.Context | Failed] = {}

    def get(self, target: ProbeTarget) -> SSL.Context:
        key = (target.alpn, target.client_cert, target.client_key)
        built = self._built.get(key)
        if built is None:
            try:
                built = _context(target)
            except Failed as exc:
                built = exc
            self._built[key] = built
        if isinstance(built, Failed):
            raise Failed(built.kind, built.message)
        return built


def _context(target: ProbeTarget) -> SSL.Context:
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
            message = f"client certificate/key: {ssl_reason(exc)}"
            raise Failed(CLIENT_CERT_UNUSABLE, message) from exc

    ctx.set_info_callback(_on_state)
    ctx.set_ocsp_client_callback(_on_ocsp)
    return ctx


def _on_state(conn: SSL.Connection, where: int, _ret: int) -> None:
    # The only way to learn whether the server sent a CertificateRequest (TLS 1.2 and 1.3
    # alike): watch the client state machine pass "read server certificate request".
    if where & SSL.SSL_CB_LOOP and b"certificate request" in conn.get_state_string():
        seen: Observed = conn.get_app_data()
        seen.saw_cert_request = True


def _on_ocsp(conn: SSL.Connection, response: bytes, _data: object) -> bool:
    # OCSP stapling is asked for on every probe (status_request): whether the server
    # staples is a fact of the endpoint. Never fails the handshake: observe, not judge.
    seen: Observed = conn.get_app_data()
    seen.ocsp_response = response
    return True


def _connect(target: ProbeTarget, seen: Observed, deadline: float) -> Steps[socket.socket]:
    host = _bare_host(target.host)
    try:
        infos = yield Resolve(host, target.port)
    except (socket.gaierror, UnicodeError) as exc:
        raise Failed(DNS, f"cannot resolve {host!r}: {exc}") from exc
    last = Failed(CONNECT_TIMEOUT, "no time left to connect")
    for index, (family, kind, proto, _name, sockaddr) in enumerate(infos):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        # Share what is left among the addresses not yet tried, so one black-holed AAAA
        # does not starve a working A record (a poor man's happy eyeballs, RFC 8305).
        started = time.monotonic()
        sock = socket.socket(family, kind, proto)
        try:
            yield from _connect_one(sock, sockaddr, started + remaining / (len(infos) - index))
        except Failed as exc:
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


def _connect_one(sock: socket.socket, sockaddr: tuple[Any, ...], until: float) -> Steps[None]:
    sock.setblocking(False)
    where = f"{sockaddr[0]} port {sockaddr[1]}"
    err = sock.connect_ex(sockaddr)
    if err in (errno.EINPROGRESS, errno.EWOULDBLOCK):
        if not (yield from wait_for(sock, write=True, until=until)):
            raise Failed(CONNECT_TIMEOUT, f"TCP connect to {where} timed out")
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        kind = {errno.ECONNREFUSED: CONNECT_REFUSED, errno.ETIMEDOUT: CONNECT_TIMEOUT}
        message = f"TCP connect to {where}: {os.strerror(err)}"
        raise Failed(kind.get(err, CONNECT_FAILED), message)


def _handshake(
    conn: SSL.Connection, sock: socket.socket, target: ProbeTarget, seen: Observed, deadline: float
) -> Steps[None]:
    started = time.monotonic()
    try:
        yield from retry(conn.do_handshake, sock, deadline, HANDSHAKE_TIMEOUT, "TLS handshake")
    except Failed as exc:
        # Keep what the server showed before it failed: in TLS 1.2 its chain comes before its
        # CertificateRequest, so a broker that aborts for want of our certificate still
        # shows us its own.
        seen.chain = _chain_der(conn)
        if exc.kind == HANDSHAKE_FAILED and seen.saw_cert_request:
            raise Failed(_client_cert_kind(target), exc.message) from exc
        raise
    seen.handshake_s = time.monotonic() - started
    seen.chain = _chain_der(conn)
    seen.tls_version = conn.get_protocol_version_name()
    seen.cipher = conn.get_cipher_name()
    seen.alpn = conn.get_alpn_proto_negotiated().decode("ascii", "replace") or None


def _await_tls13_client_auth(
    conn: SSL.Connection, sock: socket.socket, target: ProbeTarget, deadline: float
) -> Steps[None]:
    # TLS 1.3 quirk: the client's certificate travels in its last flight, so our handshake
    # "succeeds" before the server has judged it. A refusal (alert 116 certificate_required,
    # 42 bad_certificate, 48 unknown_ca …) comes on the next read. We have sent close_notify:
    # a server that accepted us answers close_notify or EOF; one that refused sends the alert
    # and closes without reading our close_notify, so the kernel may answer with a RST that
    # discards the alert: a reset here is a refusal too.
    until = min(deadline, time.monotonic() + _TLS13_AUTH_WAIT_S)
    try:
        yield from retry(lambda: recv(conn, 1024), sock, until, HANDSHAKE_TIMEOUT,
                         "after handshake")
    except Failed as exc:
        if exc.is_refusal:
            raise Failed(_client_cert_kind(target), exc.message) from exc


def _client_cert_kind(target: ProbeTarget) -> str:
    # Once the server has asked for a certificate, the only judgement left on its side is
    # of our certificate: none sent → required; one sent → rejected (untrusted, expired …).
    return CLIENT_CERT_REJECTED if target.client_cert else CLIENT_CERT_REQUIRED


def _close_notify(conn: SSL.Connection) -> None:
    # Best effort: a clean close_notify keeps brokers from logging a protocol error, but a
    # peer that already closed must not turn a success into a failure.
    with contextlib.suppress(SSL.Error, OSError):
        conn.shutdown()


def _chain_der(conn: SSL.Connection) -> tuple[bytes, ...]:
    # X509 objects, not as_cryptography: the DER comes straight from OpenSSL's cached
    # encoding, so a certificate cryptography would refuse to parse is still captured.
    chain = conn.get_peer_cert_chain() or []
    return tuple(crypto.dump_certificate(crypto.FILETYPE_ASN1, c) for c in chain)
