"""The fleet CAs' CRLs fetched from their distribution points (`tls.fleet_crl_urls`).

Owns one bounded HTTP GET per URL (one total deadline on a monotonic clock over
connect, headers and body, read in chunks; a size cap; http/https only; no redirects;
no credentials), `url_label` (what of a URL may be logged or shown: host and path,
never its query or userinfo) and `CrlSource`, the per-URL cache the fleet sweep asks:
a URL is fetched again once its copy is `every_s` old (a failed one after a tenth of
that), a failed fetch keeps the last copy, and each failure is logged once per change
and counted by reason (`failures`). Why a cache: the sweep runs every minute, a CA
publishes its CRL every few days; a CA's CDP server must not see the whole fleet's
collectors each minute. Whether a body is a CRL worth believing (parses, verifies,
is not older than the last one) is `collector.revocation`'s.
Must not: parse or judge CRLs (`certmon.pki.crl` and `collector.revocation` do) or
read the wall clock (a monotonic callable is passed in).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import certmon

log = logging.getLogger("certmon.collector")
# Why a fetch gave no body (the label of certmon_crl_fetch_failures_total).
FETCH_REASONS = ("timeout", "http_status", "redirect", "too_large", "unreachable")

# A CRL of a large CA is a few MB (Let's Encrypt's shards are < 1 MB); more is a
# misconfigured URL (a web page, a file server index), not a CRL.
MAX_CRL_BYTES = 32 * 1024 * 1024
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Fetched:
    """One GET: the body, or why there is none (`reason` is the counted label)."""

    url: str
    body: bytes | None = None
    error: str | None = None
    reason: str | None = None  # one of FETCH_REASONS


Fetcher = Callable[[str, float], Fetched]


def url_label(url: str) -> str:
    """`scheme://host[:port]/path` of `url`: a CDP URL may carry a signed query
    (`?X-Amz-Signature=…`) or, against the config rule, `user:password@`; neither
    belongs in a log line, a metric or an alert."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path or '/'}"


def check_crl_url(url: str) -> str | None:
    """The config rule for a `tls.fleet_crl_urls` entry (the scheme is checked apart):
    a host, and no credentials in it (they would be sent in clear over http and land
    in logs). The message never repeats the URL."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on "host:99999")
    except ValueError:
        return "invalid URL (host or port)"
    if "@" in parts.netloc:
        return ("must not carry user:password@ (a CRL is public; use a URL without "
                "credentials)")
    if not parts.hostname:
        return "has no host (e.g. http://crl.example.net/devices.crl)"
    return None


def fetch(url: str, timeout_s: float, *,
          monotonic: Callable[[], float] = time.monotonic) -> Fetched:
    """GET `url`, all of it within `timeout_s`: connect, headers and body share one
    deadline, so a server trickling a byte a second cannot hold the fleet sweep (a
    per-read timeout never fires on it). At the deadline a timer shuts the socket,
    which ends whatever read is blocked. A redirect is refused, not followed: it could
    lead from https to http or to a host the operator never named."""
    label = url_label(url)
    deadline = monotonic() + timeout_s
    timed_out = f"no complete answer within {timeout_s:g} s"
    try:
        conn = _connection(url, timeout_s)
    except ValueError as exc:
        return Fetched(url, error=f"invalid URL: {exc}", reason="unreachable")
    fired = threading.Event()
    watchdog = threading.Timer(timeout_s, _shut, (conn, fired))
    watchdog.daemon = True
    watchdog.start()
    try:
        parts = urllib.parse.urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        conn.request("GET", target, headers={
            "User-Agent": f"certmon-collector/{certmon.__version__}"})
        resp = conn.getresponse()
        if 300 <= resp.status < 400:
            return Fetched(url, error=f"HTTP {resp.status}: a redirect (not followed; "
                           f"give the CRL's final URL)", reason="redirect")
        if resp.status != 200:
            return Fetched(url, error=f"HTTP {resp.status} {resp.reason}",
                           reason="http_status")
        chunks: list[bytes] = []
        size = 0
        while True:
            if monotonic() >= deadline or fired.is_set():
                return Fetched(url, error=timed_out, reason="timeout")
            chunk = resp.read1(_CHUNK)
            if not chunk:  # the end, or the watchdog's shutdown (checked below)
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_CRL_BYTES:
                return Fetched(url, error=f"larger than {MAX_CRL_BYTES} bytes: not a CRL",
                               reason="too_large")
        if fired.is_set():
            return Fetched(url, error=timed_out, reason="timeout")
        if resp.length:  # the server closed before its Content-Length was sent
            return Fetched(url, error="the body ended early", reason="unreachable")
    except TimeoutError:
        return Fetched(url, error=timed_out, reason="timeout")
    except (OSError, http.client.HTTPException) as exc:
        if monotonic() >= deadline or fired.is_set():
            return Fetched(url, error=timed_out, reason="timeout")
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Fetched(url, error=f"{label}: {why or type(exc).__name__}",
                       reason="unreachable")
    finally:
        watchdog.cancel()
        conn.close()
    return Fetched(url, body=b"".join(chunks))


def _connection(url: str, timeout_s: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port
    if not host or parts.scheme not in ("http", "https"):
        raise ValueError("needs http(s)://host")
    if parts.scheme == "https":
        return http.client.HTTPSConnection(host, port, timeout=timeout_s,
                                           context=ssl.create_default_context())
    return http.client.HTTPConnection(host, port, timeout=timeout_s)


def _shut(conn: http.client.HTTPConnection, fired: threading.Event) -> None:
    fired.set()
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: nothing is blocked on it
            sock.shutdown(socket.SHUT_RDWR)  # the blocked recv returns at once


class CrlSource:
    """`bodies()` → (url, the last body) for every URL that ever answered 200; whether
    that body replaces the CRL believed so far is `collector.revocation`'s call."""

    def __init__(self, urls: Sequence[str], *, timeout_s: float, every_s: float,
                 monotonic: Callable[[], float], fetcher: Fetcher = fetch) -> None:
        self.urls = tuple(urls)
        self.timeout_s = timeout_s
        self.every_s = every_s
        self.monotonic = monotonic
        self.fetcher = fetcher
        self.failures: Counter[str] = Counter()
        self._good: dict[str, bytes] = {}
        self._tried_at: dict[str, tuple[float, bool]] = {}  # url → (when, succeeded)
        self._logged: dict[str, str | None] = {}

    def bodies(self) -> list[tuple[str, bytes]]:
        now = self.monotonic()
        for url in self.urls:
            tried = self._tried_at.get(url)
            if tried is not None:
                wait = self.every_s if tried[1] else self.every_s / 10
                if now - tried[0] < wait:
                    continue
            got = self.fetcher(url, self.timeout_s)
            self._tried_at[url] = (now, got.body is not None)
            if got.body is not None:
                self._good[url] = got.body
                if self._logged.get(url) is not None:
                    log.info("tls.fleet_crl_urls: %s answers again", url_label(url))
            else:
                self.failures[got.reason or "unreachable"] += 1
                if self._logged.get(url) != got.error:
                    kept = "keeping the last copy" if url in self._good else "no copy yet"
                    log.warning("tls.fleet_crl_urls: %s: %s (%s)", url_label(url),
                                got.error, kept)
            self._logged[url] = got.error
        return [(url, self._good[url]) for url in self.urls if url in self._good]
