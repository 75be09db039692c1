"""`certmon-scan`: probe TLS endpoints (MQTT brokers, cloud endpoints) and judge their chains.

Owns the command line and its `--help` examples: targets from arguments, a targets
file or a collector config (`--config collector.toml` scans its `[[scan_targets]]`
with its `scan_timeout_s`, `tls.ca_bundle` and `[policy]`; flags override what they
name), loading the trust
store and the exit code, the Nagios worst over all targets (0 OK … 3 UNKNOWN; a usage
error is 3 too, a config error 78). Reads the wall clock once per scan.

Must not judge certificates (`certmon.scanverdict`, `certmon.pki`), speak TLS
(`certmon.tlsprobe`), lay out output (`scanner.render`) nor import another role.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from collections.abc import Sequence
from pathlib import Path

from certmon.cli import (
    EX_UNKNOWN,
    add_examples,
    add_threshold_flags,
    add_verbose,
    new_parser,
    run,
    with_thresholds,
)
from certmon.clock import utc_now
from certmon.errors import ConfigError
from certmon.pki import Policy, Severity
from certmon.scan import SYSTEM_BUNDLE, load_trust, scan_targets
from certmon.tlsprobe import ProbeTarget

from .render import render_human, render_json, render_prometheus
from .targets import DEFAULT_PORT, collect_targets

__all__ = ["build_parser", "main"]

PROG = "certmon-scan"
DEFAULT_TIMEOUT_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, __doc__.split("\n")[0])
    add = parser.add_argument
    add("endpoints", nargs="*", metavar="HOST[:PORT]", help=f"default port {DEFAULT_PORT}")
    add("--targets", metavar="FILE", help="one `host[:port] [key=value …]` per line")
    add("--config", metavar="FILE", help="collector TOML: scan its [[scan_targets]] with its "
        "scan_timeout_s, tls.ca_bundle and [policy]")
    add("--ca-bundle", metavar="F", help="trust anchors (default: the config's "
        f"tls.ca_bundle, else {SYSTEM_BUNDLE})")
    add("--intermediates", metavar="F", help="known intermediates, to name what a server "
        "fails to send (never trusted)")
    add("--cert", metavar="F", help="client certificate (mTLS listeners)")
    add("--key", metavar="F", help="client key")
    add("--servername", metavar="N", help="SNI and hostname to check (default: host)")
    add("--alpn", metavar="P", action="append", default=[], help="ALPN protocol (repeatable)")
    add("--mqtt", action="store_true", help="also do MQTT CONNECT/CONNACK/DISCONNECT")
    add("--concurrency", type=int, default=64, metavar="N")
    add("--timeout-s", type=float, default=None, metavar="N", help="per endpoint, whole "
        f"probe (default: the config's scan_timeout_s, else {DEFAULT_TIMEOUT_S:g})")
    add_threshold_flags(parser)
    add_verbose(parser)
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="full facts as JSON")
    fmt.add_argument("--prometheus", action="store_true", help="Prometheus text exposition")
    return add_examples(
        parser,
        "certmon-scan broker.example:8884 --ca-bundle broker-ca.pem --mqtt "
        "--cert collector.crt --key collector.key",
        "certmon-scan --config /etc/certmon/collector.toml --json",
        "certmon-scan --targets brokers.txt --warn-days 21 --prometheus")


def main(argv: Sequence[str] | None = None) -> int:
    """`argv` None: the program itself (console script, `python -m`), which exits next."""
    parser = build_parser()
    # Any certmon error that is not the config's is UNKNOWN: the scan could not look.
    code = run(PROG, parser, argv, lambda args: scan(parser, args),
               failure_code=lambda _args: EX_UNKNOWN)
    if argv is None:
        # The interpreter's teardown runs the cyclic collector over every object the
        # scan left (for 200 endpoints ~16 ms, docs/benchmarks.md); frozen
        # objects are left to the exit. Not when called in-process (tests, a host
        # program): that process lives on and collects its garbage as usual.
        gc.freeze()
    return code


def scan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.config:
        # Imported here: the TOML schema machinery costs 20-30 ms CPU a scan may not need.
        from certmon.scanconfig import load_scan_settings

        settings = load_scan_settings(Path(args.config))
        configured, configured_timeout_s = settings.scan_targets, settings.scan_timeout_s
        configured_bundle = str(settings.tls.ca_bundle) if settings.tls.ca_bundle else None
        configured_policy = Policy(**dataclasses.asdict(settings.policy))
    else:
        configured, configured_timeout_s, configured_bundle = (), DEFAULT_TIMEOUT_S, None
        configured_policy = Policy()
    if args.key and not args.cert:
        raise ConfigError("--key needs --cert (--cert alone may hold the key too)")
    timeout_s = configured_timeout_s if args.timeout_s is None else args.timeout_s
    defaults = ProbeTarget(
        host="", port=DEFAULT_PORT, servername=args.servername, alpn=tuple(args.alpn),
        client_cert=args.cert, client_key=args.key, mqtt=args.mqtt, timeout_s=timeout_s,
    )  # fmt: skip
    targets = collect_targets(args.endpoints, args.targets, configured, defaults)
    if not targets:
        parser.error("no targets: give HOST[:PORT] arguments, --targets FILE or --config "
                     "FILE with [[scan_targets]]")
    if args.concurrency < 1 or timeout_s <= 0:
        parser.error("--concurrency must be >= 1 and --timeout-s > 0")
    trust = load_trust(args.ca_bundle or configured_bundle, args.intermediates)
    policy = with_thresholds(configured_policy, args)
    reports = scan_targets(targets, trust, utc_now(), policy, args.concurrency)
    if args.json:
        render_json(reports, sys.stdout)
    elif args.prometheus:
        render_prometheus(reports, sys.stdout)
    else:
        render_human(reports, sys.stdout)
    return int(max((r.severity for r in reports), default=Severity.OK))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
