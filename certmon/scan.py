"""One scan of TLS endpoints: probe them concurrently, then judge each.

Owns `scan_targets` (what `certmon-scan` and the collector's scheduled scans both
run), loading the trust store they judge against (`load_trust`) and turning the
config's `[[scan_targets]]` into probes (`probe_targets`). Must not speak TLS itself
(`certmon.tlsprobe` does), judge a chain itself (`certmon.scanverdict` does), read
the clock (callers pass `now`) nor render anything (the `scanner` role does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from . import pki
from .errors import ConfigError
from .pki import LoadedCert, Policy
from .scanverdict import (
    PresentedCert,
    ScanReport,
    TrustStore,
    judge,
    parse_presented,
    trust_from_bundles,
)
from .tlsprobe import ProbeResult, ProbeTarget, probe_many

if TYPE_CHECKING:  # the config schema machinery is only needed to read a config
    from .scanconfig import ScanTarget

__all__ = ["SYSTEM_BUNDLE", "distinct_client_ids", "load_trust", "probe_targets", "scan_targets"]

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def scan_targets(
    targets: Sequence[ProbeTarget],
    trust: TrustStore,
    now: datetime,
    policy: Policy,
    concurrency: int = 64,
) -> list[ScanReport]:
    """Probe every target concurrently, then judge each; reports in input order.

    Judging waits for all probes on purpose: intermediates that one endpoint sends
    correctly let the verdict of another name the exact intermediate it fails to send.
    Each distinct certificate is parsed once per scan, however many endpoints send it.
    """
    results = probe_many(targets, concurrency)
    parsed = parse_presented(der for r in results for der in r.presented_der)
    known = _presented_cas(results, parsed)
    return [judge(result, trust, now, policy, known_intermediates=known,
                  duration_s=result.duration_s, parsed=parsed) for result in results]


def _presented_cas(results: Iterable[ProbeResult],
                   parsed: Mapping[bytes, PresentedCert | None]) -> list[LoadedCert]:
    seen: dict[bytes, LoadedCert] = {}
    for result in results:
        for der in result.presented_der[1:]:
            entry = parsed[der]
            if der in seen or entry is None:
                continue
            facts = entry.loaded.facts
            if facts.is_ca and not facts.is_self_issued:
                seen[der] = entry.loaded
    return list(seen.values())


def load_trust(ca_bundle: str | None, intermediates: str | None = None) -> TrustStore:
    """The anchors (`ca_bundle`, else the system bundle) and optional known intermediates;
    an unreadable or empty file is a ConfigError (the scan could not judge anything)."""
    anchors = _read(ca_bundle or SYSTEM_BUNDLE, "--ca-bundle")
    extra = _read(intermediates, "--intermediates") if intermediates else None
    return trust_from_bundles(anchors, extra)


def _read(path: str, flag: str) -> pki.Bundle:
    bundle = pki.read_bundle(path)
    if not bundle.certs:
        problems = "; ".join(f.message for f in bundle.findings)
        raise ConfigError(f"{flag} {path}: {problems or 'no certificate'}")
    return bundle


def distinct_client_ids(targets: Sequence[ProbeTarget], prefix: str,
                        default: str = ProbeTarget(host="").mqtt_client_id
                        ) -> list[ProbeTarget]:
    """Targets left on the `default` MQTT client id get `<prefix>-<n>`: several
    listeners of one broker (or one cluster) share a session namespace, and a
    duplicate id makes the broker drop the other probe mid-exchange."""
    return [dataclasses.replace(t, mqtt_client_id=f"{prefix}-{n}")
            if t.mqtt_client_id == default else t for n, t in enumerate(targets)]


def probe_targets(configured: Iterable[ScanTarget], defaults: ProbeTarget) -> list[ProbeTarget]:
    """`[[scan_targets]]` entries as probes; what an entry leaves unset comes from
    `defaults` (timeout, client certificate, and for the scanner its flags)."""
    return [dataclasses.replace(defaults, host=t.host, port=t.port,
                                servername=t.servername or defaults.servername,
                                alpn=t.alpn or defaults.alpn, mqtt=t.mqtt or defaults.mqtt)
            for t in configured]
