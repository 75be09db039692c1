"""`certmon-scan`'s three outputs: a human table, JSON (`certmon-scan/1`) and the
Prometheus text exposition.

Owns the layout of each and the metric names, help texts and labels. Must not judge
(every fact and severity comes from `certmon.scanverdict.ScanReport`) nor choose the
exit code (`scanner.cli` does).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, TextIO

from certmon import pki
from certmon.pki import Severity
from certmon.scanverdict import ScanReport

if TYPE_CHECKING:
    from prometheus_client.core import GaugeMetricFamily as Gauge

__all__ = ["render_human", "render_json", "render_prometheus"]


def render_human(reports: Sequence[ScanReport], out: TextIO) -> None:
    for report in reports:
        now = report.checked_at
        tls = " ".join(x for x in (report.tls_version, report.cipher) if x) or "no TLS session"
        chain = {True: "chain valid", False: "chain INVALID", None: "no chain"}[report.chain_valid]
        out.write(f"{report.severity.name:8} {report.name}  {tls}  {chain}")
        if report.earliest_expiry is not None:
            first = report.earliest_expiry
            out.write(f"; earliest expiry {pki.as_json(first.not_after)} "
                      f"({first.days_left(now):.1f} d, {first.subject}, {report.path_status})")
        out.write("\n")
        if report.presented:
            out.write(f"  {'#':>2}  {'not_after':20}  {'days':>7}  {'key':9}  subject\n")
        for facts in report.presented:
            out.write(f"  {facts.index:>2}  {pki.as_json(facts.not_after)!s:20}  "
                      f"{facts.days_left(now):7.1f}  {facts.key_type}-{facts.key_bits:<5}  "
                      f"{facts.subject}\n")
        if report.ocsp_stapled is not None:
            stapled = f"stapled ({report.ocsp_status})" if report.ocsp_stapled else "not stapled"
            out.write(f"  OCSP {stapled}\n")
        for facts, rev in zip(report.presented, report.revocation, strict=False):
            for kind, urls in (("CRL", rev.crl_urls), ("OCSP", rev.ocsp_urls)):
                if urls:
                    out.write(f"  {facts.index:>2}  {kind} {' '.join(urls)}\n")
            if rev.is_must_staple:
                out.write(f"  {facts.index:>2}  must-staple\n")
        for f in sorted(report.findings, key=lambda f: -f.severity):
            out.write(f"  {f.severity.name:8} {f.code!s:24} {f.message}\n")
    worst = max((r.severity for r in reports), default=Severity.OK)
    out.write(f"{worst.name}: {len(reports)} target(s)\n")


def render_json(reports: Sequence[ScanReport], out: TextIO) -> None:
    worst = max((r.severity for r in reports), default=Severity.OK)
    head = json.dumps({"schema": "certmon-scan/1", "severity": worst.name})[:-1]
    # One target per line, each by json's C encoder, built once and written once:
    # `indent=` selects the pure-Python encoder and json.dump writes every token on
    # its own (~123,000 writes for 200 targets). Still one JSON document (jq reads it).
    encode = json.JSONEncoder(default=_Plain()).encode
    targets = ",\n".join(encode(r) for r in reports)
    out.write(f"{head}, \"targets\": [\n{targets}\n]}}\n" if reports else
              f"{head}, \"targets\": []}}\n")


class _Plain:
    """`pki.as_json`'s mapping (instants as RFC 3339 'Z' strings, Severity by name, other
    enums by value, dataclasses as dicts in field order) as the C encoder's `default`,
    one object at a time, instead of first building the whole tree of dicts: the same
    document (tests/test_scan.py compares them on every scenario) in a fraction of the
    time. One per document: a report names the same facts object several times (sent,
    on the path, earliest expiry) and the same instants, each turned into JSON once."""

    def __init__(self) -> None:
        self._done: dict[int, object] = {}  # by id(): the reports keep every object alive
        self._instants: dict[datetime, str] = {}

    def __call__(self, value: object) -> object:
        if isinstance(value, datetime):
            if (text := self._instants.get(value)) is None:
                text = self._instants[value] = pki.iso_utc(value)
            return text
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if (done := self._done.get(id(value))) is None:
                # A Severity is an int to the encoder, which would write its number.
                done = self._done[id(value)] = {
                    name: v.name if isinstance(v := getattr(value, name), Severity) else v
                    for name in value.__dataclass_fields__}
            return done
        if isinstance(value, enum.Enum):
            return value.value
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def render_prometheus(reports: Sequence[ScanReport], out: TextIO) -> None:
    """Text exposition through prometheus_client (imported here: it is in the
    `collector` extra, and the human and JSON outputs must work without it)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class _Reports(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            yield from _metric_families(reports, GaugeMetricFamily)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reports())
    out.write(generate_latest(registry).decode("utf-8"))


def _metric_families(reports: Sequence[ScanReport], gauge: type[Gauge]) -> Iterator[Gauge]:
    # Absolute instants, never "days left" (a scrape's age would skew it), and no serials
    # or fingerprints as labels: a renewal must not mint a new time series. Expired or
    # untrusted certificates keep their series; only a target with no chain has none.
    not_after = gauge("certmon_scan_cert_not_after_seconds",
                      "notAfter of each presented certificate (Unix time), by position sent",
                      labels=["target", "position"])
    earliest = gauge("certmon_scan_earliest_expiry_seconds",
                     "Earliest notAfter on the validated (else linked) chain path",
                     labels=["target"])
    valid = gauge("certmon_scan_chain_valid",
                  "1 if the presented chain validates against the trust store now",
                  labels=["target"])
    success = gauge("certmon_scan_success", "1 if the probe completed without error",
                    labels=["target"])
    severity = gauge("certmon_scan_severity",
                     "Worst finding: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN", labels=["target"])
    duration = gauge("certmon_scan_duration_seconds", "Wall time of the probe",
                     labels=["target"])
    for r in reports:
        for facts in r.presented:
            not_after.add_metric([r.name, str(facts.index)], facts.not_after.timestamp())
        if r.earliest_expiry is not None:
            earliest.add_metric([r.name], r.earliest_expiry.not_after.timestamp())
        valid.add_metric([r.name], 1.0 if r.chain_valid else 0.0)
        success.add_metric([r.name], 1.0 if r.is_success else 0.0)
        severity.add_metric([r.name], float(r.severity))
        if r.duration_s is not None:
            duration.add_metric([r.name], r.duration_s)
    yield from (not_after, earliest, valid, success, severity, duration)
