"""The fleet CAs' CRLs fetched from their distribution points (`tls.fleet_crl_urls`).

Owns one bounded HTTP GET per URL (a timeout, a size cap, http/https only, no
credentials) and `CrlSource`, the per-URL cache the fleet sweep asks: a URL is fetched
again once its copy is `every_s` old (a failed one after a tenth of that), a failed
fetch keeps the last good copy, and each failure is logged once per change and
counted by reason (`failures`). Why a cache: the sweep runs every minute, a CA
publishes its CRL every few days; a CA's CDP server must not see the whole fleet's
collectors each minute.
Must not: parse or judge CRLs (`certmon.pki.crl` and `collector.revocation` do) or
read the wall clock (a monotonic callable is passed in).
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import certmon

log = logging.getLogger("certmon.collector")

# A CRL of a large CA is a few MB (Let's Encrypt's shards are < 1 MB); more is a
# misconfigured URL (a web page, a file server index), not a CRL.
MAX_CRL_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Fetched:
    """One GET: the body, or why there is none (`reason` is the counted label)."""

    url: str
    body: bytes | None = None
    error: str | None = None
    reason: str | None = None  # timeout | http_status | too_large | unreachable


Fetcher = Callable[[str, float], Fetched]


def fetch(url: str, timeout_s: float) -> Fetched:
    """GET `url` within `timeout_s` per blocking step (connect, each read)."""
    request = urllib.request.Request(  # noqa: S310 - the schemes are checked at load
        url, headers={"User-Agent": f"certmon-collector/{certmon.__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310
            body = resp.read(MAX_CRL_BYTES + 1)
    except urllib.error.HTTPError as exc:
        return Fetched(url, error=f"HTTP {exc.code} {exc.reason}", reason="http_status")
    except TimeoutError:
        return Fetched(url, error=f"no answer within {timeout_s:g} s", reason="timeout")
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            return Fetched(url, error=f"no answer within {timeout_s:g} s", reason="timeout")
        return Fetched(url, error=str(exc.reason), reason="unreachable")
    except OSError as exc:  # a reset mid-body, a refused connection surfacing late
        return Fetched(url, error=exc.strerror or str(exc), reason="unreachable")
    if len(body) > MAX_CRL_BYTES:
        return Fetched(url, error=f"larger than {MAX_CRL_BYTES} bytes: not a CRL",
                       reason="too_large")
    return Fetched(url, body=body)


class CrlSource:
    """`bodies()` → (url, the last good body) for every URL that ever answered."""

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
                    log.info("tls.fleet_crl_urls: %s answers again", url)
            else:
                self.failures[got.reason or "unreachable"] += 1
                if self._logged.get(url) != got.error:
                    kept = "keeping the last copy" if url in self._good else "no copy yet"
                    log.warning("tls.fleet_crl_urls: %s: %s (%s)", url, got.error, kept)
            self._logged[url] = got.error
        return [(url, self._good[url]) for url in self.urls if url in self._good]
