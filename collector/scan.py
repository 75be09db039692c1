"""`certmon-scan`: probe TLS endpoints (MQTT brokers, cloud endpoints) and judge their chains.

Owns the command line (targets from arguments or a targets file), loading the trust
store, running probes concurrently (`scan_targets`, which the collector also calls on a
schedule) and rendering reports as a human table, JSON or Prometheus text exposition,
plus the exit code: the Nagios worst over all targets (0 OK … 3 UNKNOWN).

Must not judge certificates itself (`collector.scanverdict` and `certmon.pki` do) nor
speak TLS itself (`certmon.tlsprobe` does). Reads the wall clock once per scan, through
`certmon.clock`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from certmon import __version__, pki
from certmon.clock import utc_now
from certmon.errors import EX_CONFIG, ConfigError
from certmon.pki import LoadedCert, Policy, Severity
from certmon.tlsprobe import ProbeResult, ProbeTarget, probe

from .scanverdict import ScanReport, TrustStore, judge, trust_from_bundles

if TYPE_CHECKING:
    from prometheus_client.core import GaugeMetricFamily as Gauge

__all__ = ["load_trust", "main", "parse_endpoint", "parse_targets", "scan_targets"]

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
DEFAULT_PORT = 8883
_DEFAULTS = Policy()
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


# --------------------------------------------------------------------------- scanning


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
    """
    if not targets:
        return []
    with ThreadPoolExecutor(max(1, min(concurrency, len(targets))), "certmon-scan") as pool:
        timed = list(pool.map(_timed_probe, targets))
    known = _presented_cas(result for result, _ in timed)
    return [judge(result, trust, now, policy, known_intermediates=known, duration_s=took)
            for result, took in timed]


def _timed_probe(target: ProbeTarget) -> tuple[ProbeResult, float]:
    started = time.monotonic()
    result = probe(target)
    return result, time.monotonic() - started


def _presented_cas(results: Iterable[ProbeResult]) -> list[LoadedCert]:
    seen: dict[bytes, LoadedCert] = {}
    for result in results:
        for der in result.presented_der[1:]:
            if der in seen:
                continue
            certs = pki.parse_bundle(der, "scan").certs
            if certs and certs[0].facts.is_ca and not certs[0].facts.is_self_issued:
                seen[der] = certs[0]
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


# --------------------------------------------------------------------------- targets


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """"host", "host:port", "[v6]", "[v6]:port" or a bare IPv6 literal → (host, port)."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and not text[end + 1 :].startswith(":")):
            raise ConfigError(f"bad endpoint {text!r}: expected [ipv6]:port")
        host, port_text = text[1:end], text[end + 2 :]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ConfigError(f"bad endpoint {text!r}: empty host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"bad endpoint {text!r}: port must be 1-65535")
    return host, int(port_text)


def parse_targets(lines: Iterable[str], source: str, defaults: ProbeTarget) -> list[ProbeTarget]:
    """One `host[:port] [key=value …]` per line; `#` starts a comment. Keys: servername,
    alpn (comma list), mqtt, client_id, cert, key, timeout_s. Every bad line is
    reported at once, as `file:line: problem`."""
    targets: list[ProbeTarget] = []
    errors: list[str] = []
    for number, raw in enumerate(lines, 1):
        try:
            words = shlex.split(raw, comments=True)
            if words:
                targets.append(_target_from_words(words, defaults))
        except (ConfigError, ValueError) as exc:
            errors.append(f"{source}:{number}: {exc}")
    if errors:
        raise ConfigError("\n".join(errors))
    return targets


def _target_from_words(words: list[str], defaults: ProbeTarget) -> ProbeTarget:
    host, port = parse_endpoint(words[0])
    target = dataclasses.replace(defaults, host=host, port=port)
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {word!r}")
        target = _with_option(target, key, value)
    return target


def _with_option(target: ProbeTarget, key: str, value: str) -> ProbeTarget:
    if key == "mqtt":
        if value.lower() not in _TRUE | _FALSE:
            raise ConfigError(f"mqtt={value!r}: expected true or false")
        return dataclasses.replace(target, mqtt=value.lower() in _TRUE)
    if key == "alpn":
        return dataclasses.replace(target, alpn=tuple(p for p in value.split(",") if p))
    if key == "timeout_s":
        timeout_s = float(value)  # ValueError → reported with the line number
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s={value!r}: must be > 0")
        return dataclasses.replace(target, timeout_s=timeout_s)
    if key == "servername":
        return dataclasses.replace(target, servername=value)
    if key == "client_id":
        return dataclasses.replace(target, mqtt_client_id=value)
    if key == "cert":
        return dataclasses.replace(target, client_cert=value)
    if key == "key":
        return dataclasses.replace(target, client_key=value)
    raise ConfigError(f"unknown key {key!r} (known: servername, alpn, mqtt, client_id, "
                      "cert, key, timeout_s)")


# --------------------------------------------------------------------------- output


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
        for f in sorted(report.findings, key=lambda f: -f.severity):
            out.write(f"  {f.severity.name:8} {f.code!s:24} {f.message}\n")
    worst = max((r.severity for r in reports), default=Severity.OK)
    out.write(f"{worst.name}: {len(reports)} target(s)\n")


def render_json(reports: Sequence[ScanReport], out: TextIO) -> None:
    worst = max((r.severity for r in reports), default=Severity.OK)
    document = {"schema": "certmon-scan/1", "severity": worst.name,
                "targets": [pki.as_json(r) for r in reports]}
    json.dump(document, out, indent=2)
    out.write("\n")


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


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Nagios reads exit 2 as CRITICAL; a usage error is UNKNOWN (3).
        self.print_usage(sys.stderr)
        self.exit(int(Severity.UNKNOWN), f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="certmon-scan", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--version", action="version", version=f"certmon {__version__}")
    add("endpoints", nargs="*", metavar="HOST[:PORT]", help=f"default port {DEFAULT_PORT}")
    add("--targets", metavar="FILE", help="one `host[:port] [key=value …]` per line")
    add("--ca-bundle", metavar="F", help=f"trust anchors (default {SYSTEM_BUNDLE})")
    add("--intermediates", metavar="F", help="known intermediates, to name what a server "
        "fails to send (never trusted)")
    add("--cert", metavar="F", help="client certificate (mTLS listeners)")
    add("--key", metavar="F", help="client key")
    add("--servername", metavar="N", help="SNI and hostname to check (default: host)")
    add("--alpn", metavar="P", action="append", default=[], help="ALPN protocol (repeatable)")
    add("--mqtt", action="store_true", help="also do MQTT CONNECT/CONNACK/DISCONNECT")
    add("--concurrency", type=int, default=64, metavar="N")
    add("--timeout-s", type=float, default=5.0, metavar="N", help="per endpoint, whole probe")
    add("--warn-days", type=float, default=_DEFAULTS.warn_days, metavar="N")
    add("--crit-days", type=float, default=_DEFAULTS.crit_days, metavar="N")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="full facts as JSON")
    fmt.add_argument("--prometheus", action="store_true", help="Prometheus text exposition")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        targets = list(_targets(args))
        if not targets:
            parser.error("no targets: give HOST[:PORT] arguments or --targets FILE")
        if args.concurrency < 1 or args.timeout_s <= 0:
            parser.error("--concurrency must be >= 1 and --timeout-s > 0")
        trust = load_trust(args.ca_bundle, args.intermediates)
    except ConfigError as exc:
        print(f"certmon-scan: {exc}", file=sys.stderr)
        return EX_CONFIG
    policy = Policy(warn_days=args.warn_days, crit_days=args.crit_days)
    reports = scan_targets(targets, trust, utc_now(), policy, args.concurrency)
    if args.json:
        render_json(reports, sys.stdout)
    elif args.prometheus:
        render_prometheus(reports, sys.stdout)
    else:
        render_human(reports, sys.stdout)
    return int(max((r.severity for r in reports), default=Severity.OK))


def _targets(args: argparse.Namespace) -> Iterator[ProbeTarget]:
    if args.key and not args.cert:
        raise ConfigError("--key needs --cert (--cert alone may hold the key too)")
    defaults = ProbeTarget(
        host="", port=DEFAULT_PORT, servername=args.servername, alpn=tuple(args.alpn),
        client_cert=args.cert, client_key=args.key, mqtt=args.mqtt, timeout_s=args.timeout_s,
    )  # fmt: skip
    targets = [dataclasses.replace(defaults, host=host, port=port)
               for host, port in map(parse_endpoint, args.endpoints)]
    if args.targets:
        try:
            text = Path(args.targets).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--targets {args.targets}: {exc.strerror or exc}") from exc
        targets += parse_targets(text.splitlines(), args.targets, defaults)
    for n, target in enumerate(targets):
        # Distinct MQTT client ids: several listeners of one broker (or one cluster) share
        # a session namespace, and a duplicate id makes the broker drop our other probe.
        if target.mqtt_client_id == defaults.mqtt_client_id:
            target = dataclasses.replace(target, mqtt_client_id=f"certmon-scan-{os.getpid()}-{n}")
        yield target


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
