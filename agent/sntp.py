"""One SNTP exchange (RFC 4330): measure the device clock's offset against a server.

Owns the request (a random nonce as transmit timestamp: it leaks nothing about the
device and a spoofed reply must echo it), reply validation, the offset/delay
arithmetic and NTP era handling, and `sntp_offset`, the UDP shell.
Must not: set the clock, read the wall clock other than through the injected `Clock`,
or judge the result (that is `agent.clocksync`).
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from certmon.clock import Clock, SystemClock, monotonic_s

NTP_UNIX_DELTA_S = 2_208_988_800  # 1900-01-01 → 1970-01-01


@dataclass(frozen=True, slots=True)
class SntpSample:
    server: str
    offset_s: float  # ((t2 − t1) + (t3 − t4)) / 2: + = device behind
    delay_s: float  # (t4 − t1) − (t3 − t2)
    stratum: int
    measured_at: datetime  # t4 on the device's (possibly wrong) clock


def ntp_to_unix_s(raw: bytes) -> float:
    secs, frac = int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:8], "big")
    if secs < 0x8000_0000:  # RFC 4330 §3: MSB 0 means era 1, i.e. after 2036-02-07
        secs += 1 << 32
    return secs - NTP_UNIX_DELTA_S + frac / (1 << 32)


def unix_to_ntp(unix_s: float) -> bytes:
    secs = int(unix_s // 1) + NTP_UNIX_DELTA_S
    frac = int((unix_s % 1) * (1 << 32))
    return (secs % (1 << 32)).to_bytes(4, "big") + frac.to_bytes(4, "big")


def sntp_request(nonce: bytes) -> bytes:
    """LI 0, version 4, mode 3 (client). The transmit timestamp is a random nonce, not
    our clock: it leaks nothing about the device and a spoofed reply must echo it."""
    return bytes([0x23]) + bytes(39) + nonce


def parse_sntp_reply(data: bytes, nonce: bytes, *, server: str, t1: datetime,
                     t4: datetime) -> SntpSample | None:
    """Validate a reply (RFC 4330 §5) and compute offset and delay (pure)."""
    if len(data) < 48:
        return None
    leap, mode, stratum = data[0] >> 6, data[0] & 7, data[1]
    # Mode 4 = server; stratum 0 = kiss-o'-death; leap 3 = the server itself is unsynced;
    # the origin must echo our nonce or the reply is not an answer to our request.
    if mode != 4 or not 0 < stratum < 16 or leap == 3 or data[24:32] != nonce:
        return None
    if data[40:48] == bytes(8):
        return None
    t2, t3 = ntp_to_unix_s(data[32:40]), ntp_to_unix_s(data[40:48])
    t1_s, t4_s = t1.timestamp(), t4.timestamp()
    return SntpSample(server=server, offset_s=((t2 - t1_s) + (t3 - t4_s)) / 2,
                      delay_s=(t4_s - t1_s) - (t3 - t2), stratum=stratum, measured_at=t4)


def sntp_offset(server: str, port: int = 123, timeout_s: float = 1.0, *,
                clock: Clock | None = None) -> SntpSample | None:
    """One SNTP exchange; None on timeout, network error or an invalid reply."""
    clock = clock or SystemClock()
    try:
        infos = socket.getaddrinfo(server, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    family, _, _, _, addr = infos[0]
    nonce = secrets.token_bytes(8)
    deadline = monotonic_s() + timeout_s
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(addr)  # the kernel then drops datagrams from other peers
            t1, m1 = clock.now(), clock.monotonic()
            sock.send(sntp_request(nonce))
            while (left := deadline - monotonic_s()) > 0:
                sock.settimeout(left)
                data = sock.recv(512)
                # t4 = t1 + monotonic elapsed: a clock step during the exchange (NTP
                # daemon stepping at boot) would otherwise show up as a huge delay.
                t4 = t1 + timedelta(seconds=clock.monotonic() - m1)
                if len(data) >= 48 and data[24:32] != nonce:
                    continue  # a late reply to an earlier request: keep waiting
                return parse_sntp_reply(data, nonce, server=server, t1=t1, t4=t4)
        except OSError:  # includes TimeoutError and ICMP port unreachable
            return None
    return None
