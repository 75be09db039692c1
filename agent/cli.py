"""`certmon-agent`: the device program's command line.

Owns argument parsing, output formatting (human table or `--json`) and the mapping
of outcomes to exit codes: Nagios codes for checks (0 OK, 1 WARNING, 2 CRITICAL,
3 UNKNOWN), 78 for configuration errors. Everything it shows is computed elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from certmon import __version__, pki
from certmon.clock import utc_now
from certmon.errors import EX_CONFIG, ConfigError

from .certstore import read_material
from .report import DeviceCheck, check_device

UNREADABLE = {pki.FindingCode.FILE_UNREADABLE, pki.FindingCode.KEY_UNREADABLE}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="certmon-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"certmon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="one-shot local check of CA bundle, cert and key")
    check.add_argument("--ca-bundle", help="CA bundle (PEM or DER, several certificates)")
    check.add_argument("--cert", help="client certificate (may carry its intermediates)")
    check.add_argument("--key", help="private key of the client certificate")
    check.add_argument("--warn-days", type=float, default=None)
    check.add_argument("--crit-days", type=float, default=None)
    check.add_argument("--config", help="agent TOML config (flags override it)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            return cmd_check(args, sys.stdout)
    except ConfigError as exc:
        print(f"certmon-agent: {exc}", file=sys.stderr)
        return EX_CONFIG
    return 3


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    policy = pki.Policy()
    ca_bundle, cert, key = args.ca_bundle, args.cert, args.key
    if args.config:
        from .config import load_agent_config

        config = load_agent_config(args.config, check_files=False)
        ca_bundle = ca_bundle or str(config.tls.ca_bundle)
        cert = cert or (str(config.tls.cert) if config.tls.cert else None)
        key = key or (str(config.tls.key) if config.tls.key else None)
        policy = pki.Policy(**dataclasses.asdict(config.policy))
    if ca_bundle is None:
        raise ConfigError("check: --ca-bundle (or --config with tls.ca_bundle) is required")
    if args.warn_days is not None or args.crit_days is not None:
        policy = pki.Policy(
            warn_days=args.warn_days if args.warn_days is not None else policy.warn_days,
            crit_days=args.crit_days if args.crit_days is not None else policy.crit_days,
            warn_fraction=policy.warn_fraction,
            crit_fraction=policy.crit_fraction,
            ca_horizon_days=policy.ca_horizon_days,
        )
    result = check_device(read_material(ca_bundle, cert, key), utc_now(), policy)
    if args.json:
        json.dump(check_to_json(result), out, indent=2)
        out.write("\n")
    else:
        render_check(result, out)
    return exit_code(result)


def exit_code(result: DeviceCheck) -> int:
    """Worst severity; UNKNOWN when an input named on the command line was unreadable
    (the check could not look, which is not the same as having looked and found it bad)."""
    if any(f.code in UNREADABLE for f in result.findings):
        return int(pki.Severity.UNKNOWN)
    return int(result.severity)


def check_to_json(result: DeviceCheck) -> dict[str, object]:
    return {
        "status": result.severity.name,
        "now": pki.as_json(result.now),
        "trust_store": pki.as_json(result.trust_store),
        "client": pki.as_json(result.client),
        "client_extra": pki.as_json(result.client_extra),
        "key": pki.as_json(result.key),
        "chain_now": pki.as_json(result.chain_now),
        "chain_at_warn": pki.as_json(result.chain_at_warn),
        "findings": pki.as_json(result.findings),
    }


def render_check(result: DeviceCheck, out: TextIO) -> None:
    now = result.now
    groups: dict[str, list[tuple[str, pki.CertFacts]]] = {}
    for facts in result.trust_store:
        groups.setdefault(facts.source, []).append(("ca", facts))
    if result.client is not None:
        groups.setdefault(result.client.source, []).append(("client", result.client))
        for facts in result.client_extra:
            groups[result.client.source].append(("chain", facts))
    for source, rows in groups.items():
        out.write(f"{source}  ({len(rows)} certificate{'s' if len(rows) != 1 else ''})\n")
        out.write(f"  {'not_after':20}  {'days_left':>9}  {'role':6}  {'key':10}  subject\n")
        for role, facts in sorted(rows, key=lambda r: r[1].not_after):
            key = f"{facts.key_type}-{facts.key_bits}"
            out.write(f"  {pki.as_json(facts.not_after)!s:20}  {facts.days_left(now):9.1f}  "
                      f"{role:6}  {key:10}  {facts.subject}\n")
        out.write("\n")
    if result.chain_now is not None:
        path = " -> ".join(f.common_name or f.subject for f in result.chain_now.path)
        verdict = "valid" if result.chain_now.is_valid else f"INVALID: {result.chain_now.error}"
        out.write(f"client chain ({result.chain_now.method}): {verdict}\n")
        if path:
            out.write(f"  path: {path}\n")
        out.write("\n")
    findings = sorted(result.findings, key=lambda f: -f.severity)
    out.write(f"{result.severity.name}: {len(findings)} finding(s)\n")
    for f in findings:
        out.write(f"  {f.severity.name:8} {f.code.value:32} {f.message}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
