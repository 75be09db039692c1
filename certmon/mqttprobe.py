"""The MQTT 3.1.1 CONNECT → CONNACK → DISCONNECT exchange a probe runs on its TLS session,
and the same CONNECT without TLS, which tells a plain-MQTT port from a broken TLS one.

Three fixed packets are hand-encoded: the scanner needs exactly this exchange on the
TLS session it already holds (whose chain and timings it just recorded), which no MQTT
client library exposes; this is wire necessity, not a client. MQTT 3.1.1 §3.1
CONNECT, §3.2 CONNACK, §3.14 DISCONNECT.
Owns `encode_connect`, `DISCONNECT`, `mqtt_exchange` and `plain_connack`. Must not: subscribe,
publish, retry or keep a session (paho lives in `certmon.mqtt` only), or judge the
answer beyond recording it.
"""

from __future__ import annotations

import functools
import socket

from OpenSSL import SSL

from .probeio import (
    HANDSHAKE_FAILED,
    MQTT_NO_CONNACK,
    MQTT_REFUSED,
    MQTT_TIMEOUT,
    Failed,
    Observed,
    Steps,
    recv,
    retry,
    wait_for,
)

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


def plain_connack(sock: socket.socket, deadline: float, *, client_id: str
                  ) -> Steps[int | None]:
    """CONNECT on a plain (non-blocking, connected) socket: the CONNACK return code when
    the peer answers like an MQTT broker, else None. A broker that refused our
    ClientHello by resetting the connection is told apart from a broken TLS listener
    this way; any CONNACK, accepting or not, says "MQTT without TLS"."""
    data = b""
    try:
        sock.sendall(encode_connect(client_id))
        while len(data) < 4 and (yield from wait_for(sock, write=False, until=deadline)):
            chunk = sock.recv(4 - len(data))
            if not chunk:
                break
            data += chunk
        if data[:2] != b"\x20\x02" or len(data) < 4:
            return None
        if data[3] == 0:
            sock.sendall(DISCONNECT)  # a clean goodbye keeps the broker's log quiet
    except OSError:
        return None if len(data) < 4 or data[:2] != b"\x20\x02" else data[3]
    return data[3]


def mqtt_exchange(conn: SSL.Connection, sock: socket.socket, seen: Observed, deadline: float,
                  *, client_id: str, refusal_kind: str) -> Steps[None]:
    """CONNECT, read the CONNACK into `seen`, DISCONNECT; raise `Failed` on the way.

    `refusal_kind` is the kind a TLS 1.3 refusal surfacing here gets once the server
    had asked for a client certificate (required, or rejected when one was sent).
    """
    packet = encode_connect(client_id)
    data = b""
    try:
        yield from retry(lambda: conn.sendall(packet), sock, deadline, MQTT_TIMEOUT,
                         "MQTT CONNECT")
        while len(data) < 4:
            read = functools.partial(recv, conn, 4 - len(data))
            chunk = yield from retry(read, sock, deadline, MQTT_TIMEOUT, "CONNACK")
            if not chunk:
                raise Failed(MQTT_NO_CONNACK, "connection closed before CONNACK")
            data += chunk
    except Failed as exc:
        seen.mqtt_error = exc.message
        kind = exc.kind
        if exc.is_refusal and seen.saw_cert_request and seen.tls_version == "TLSv1.3":
            # TLS 1.3: the server judges our certificate after our handshake "succeeded";
            # its refusal is the first thing the next read sees, here.
            kind = refusal_kind
        elif exc.kind == HANDSHAKE_FAILED:
            kind = MQTT_NO_CONNACK
        raise Failed(kind, exc.message) from exc
    if data[:2] != b"\x20\x02":
        seen.mqtt_error = f"expected CONNACK, got {data.hex()}"
        raise Failed(MQTT_NO_CONNACK, seen.mqtt_error)
    seen.mqtt_connack = data[3]
    if data[3] != 0:
        # The broker closes after a refusing CONNACK (§3.2.2.3); no DISCONNECT is owed.
        seen.mqtt_error = _CONNACK_REASONS.get(data[3], f"return code {data[3]}")
        raise Failed(MQTT_REFUSED, f"CONNACK {data[3]}: {seen.mqtt_error}")
    try:
        yield from retry(lambda: conn.sendall(DISCONNECT), sock, deadline, MQTT_TIMEOUT,
                         "DISCONNECT")
    except Failed as exc:
        seen.mqtt_error = exc.message  # accepted already; a failed goodbye is noted, not fatal
