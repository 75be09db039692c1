"""`certmon-agent`: the device program's command line.

Owns its commands' flags, their `--help` examples, output formatting (human table or
`--json`) and the mapping of their outcomes to exit codes: Nagios codes for `check`
(0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; a stale CA is information, see
docs/check.md), delivery for `once`, with one line saying why a status was not
delivered. The skeleton around the commands (usage errors exit 3, 78 on a config
error, one line instead of a traceback, stop signals) is `certmon.cli`'s; everything
it shows is computed elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from certmon import pki
from certmon.cli import (
    Program,
    add_examples,
    add_threshold_flags,
    add_verbose,
    new_parser,
    on_stop_signals,
    with_thresholds,
    write_json,
)
from certmon.clock import utc_now
from certmon.errors import ConfigError

from .certstore import read_material
from .report import DeviceCheck, check_device, judged_by_use, required_ca_findings

if TYPE_CHECKING:
    from .config import AgentConfig
    from .service import AgentService

# Inputs the check could not look at: UNKNOWN, not a verdict on the certificates.
UNREADABLE = {pki.FindingCode.FILE_UNREADABLE, pki.FindingCode.KEY_UNREADABLE,
              pki.FindingCode.NO_CERTIFICATE}
CONFIG = "/etc/certmon/agent.toml"
DEVICE_FLAGS = "--ca-bundle ca.pem --cert device.crt --key device.key"


def build_parser() -> argparse.ArgumentParser:
    parser = add_examples(
        new_parser("certmon-agent", __doc__.split("\n")[0]),
        "certmon-agent check --ca-bundle /etc/ssl/certs/ca-certificates.crt",
        f"certmon-agent once --config {CONFIG}",
        f"certmon-agent run --config {CONFIG}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="one-shot local check of CA bundle, cert and key")
    check.add_argument("--ca-bundle", help="CA bundle (PEM or DER, several certificates)")
    check.add_argument("--cert", help="client certificate (may carry its intermediates)")
    check.add_argument("--key", help="private key of the client certificate")
    check.add_argument("--require-ca", action="append", default=[], metavar="FILE",
                       help="a CA the device must trust (e.g. the one the broker moves "
                       "to): its expiry counts, its absence warns (repeatable)")
    check.add_argument("--broker-config", metavar="FILE",
                       help="check a broker host instead: the Mosquitto config's listeners, "
                       "bridges, their files and CRLs, and what each TLS listener serves "
                       "(docs/broker-host.md)")
    check.add_argument("--count-stale-cas", action="store_true",
                       help="count expired/expiring CAs nothing here chains through "
                       "(default: listed as information, exit code unchanged)")
    add_threshold_flags(check)
    check.add_argument("--config", help="agent TOML config (flags override it)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    add_verbose(check)
    add_examples(check, f"certmon-agent check {DEVICE_FLAGS} --warn-days 30 --crit-days 7",
                 f"certmon-agent check --config {CONFIG} --require-ca new-broker-ca.pem --json",
                 "certmon-agent check --broker-config /etc/mosquitto/mosquitto.conf --json")
    run = sub.add_parser("run", help="the service: report every interval, forever")
    add_service_flags(run)
    run.add_argument("--fork-checks", choices=["true", "false"],
                     help="agent.fork_checks: a resident MQTT process and a checker forked "
                     "per report (less memory, more CPU)")
    add_examples(run, f"certmon-agent run --config {CONFIG}",
                 f"certmon-agent run --broker mqtts://broker.example:8883 {DEVICE_FLAGS} "
                 "--state-dir /var/lib/certmon-agent")
    once = sub.add_parser("once", help="publish one status, wait for PUBACK, exit")
    add_service_flags(once)
    once.add_argument("--timeout-s", type=float, default=30.0)
    once.add_argument("--offline-after", action="store_true",
                      help="publish online=false before leaving")
    once.add_argument("--json", action="store_true")
    add_examples(once, f"certmon-agent once --config {CONFIG}",
                 f"certmon-agent once --config {CONFIG} --timeout-s 10 --json")
    show = sub.add_parser("show", help="print the unsigned status JSON; no network")
    add_service_flags(show)
    show.add_argument("--json", action="store_true", help="(always JSON)")
    add_examples(show, f"certmon-agent show --config {CONFIG}",
                 f"certmon-agent show --broker mqtts://broker.example:8883 {DEVICE_FLAGS}")
    renew = sub.add_parser("renew", help="one renewal attempt of the client certificate "
                           "now, when due (docs/renewal.md)")
    add_service_flags(renew)
    renew.add_argument("--force", action="store_true",
                       help="attempt even when not due (never while the clock is wrong)")
    renew.add_argument("--json", action="store_true", help="machine-readable output")
    add_examples(renew, f"certmon-agent renew --config {CONFIG}",
                 f"certmon-agent renew --config {CONFIG} --force --json")
    check_config = sub.add_parser("check-config", help="validate the config and flags")
    add_service_flags(check_config)
    add_examples(check_config, f"certmon-agent check-config --config {CONFIG}",
                 f"certmon-agent check-config --config {CONFIG} --interval-s 60")
    return parser


# Flags that set config keys: flag → dotted key. Everything a test or a user needs can
# be given on the command line without a config file.
FLAG_KEYS = {
    "broker": "mqtt.broker", "ca_bundle": "tls.ca_bundle", "cert": "tls.cert",
    "key": "tls.key", "device_id": "device_id", "state_dir": "agent.state_dir",
    "interval_s": "agent.interval_s", "topic_prefix": "agent.topic_prefix",
    "client_id": "mqtt.client_id", "alpn": "mqtt.alpn", "mqtt_protocol": "mqtt.protocol",
    "sntp_server": "clock.sntp_servers", "fork_checks": "agent.fork_checks",
}


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="agent TOML config (flags override it)")
    parser.add_argument("--broker", help="mqtts://HOST[:PORT] (8883 by default)")
    parser.add_argument("--ca-bundle", help="CA bundle the device trusts")
    parser.add_argument("--cert", help="client certificate (with intermediates)")
    parser.add_argument("--key", help="private key of the client certificate")
    parser.add_argument("--device-id", help="device id (default: the certificate's CN)")
    parser.add_argument("--state-dir", help="sequence numbers and spool")
    parser.add_argument("--interval-s", help="seconds between reports")
    parser.add_argument("--topic-prefix", help="topic prefix (default certmon/v2)")
    parser.add_argument("--client-id", help="MQTT client id")
    parser.add_argument("--alpn", help="ALPN protocols, comma-separated")
    parser.add_argument("--mqtt-protocol", choices=["v5", "v311"], help="MQTT version")
    parser.add_argument("--sntp-server", help="SNTP servers to measure offset against")
    add_verbose(parser)


def load_config(args: argparse.Namespace) -> AgentConfig:
    from certmon.config import load_with_flags

    from .config import AgentConfig as Schema

    return load_with_flags(Schema, args.config, vars(args), FLAG_KEYS)


def main(argv: Sequence[str] | None = None) -> int:
    return PROGRAM.main(argv)


def cmd_show(config: AgentConfig, args: argparse.Namespace) -> int:
    from certmon import wire as protocol

    from .service import AgentService

    result = AgentService(config).cycle(sign=False)
    data = result.status.to_json()
    data["v"] = protocol.SCHEMA_VERSION
    write_json(data, sys.stdout, sort_keys=True, ensure_ascii=False)
    return 0


def cmd_once(config: AgentConfig, args: argparse.Namespace) -> int:
    """Publish one status (and the cert and inventory topics), wait for PUBACK."""
    from .service import AgentService

    service = AgentService(config)
    try:
        # A broker that cannot be reached is not an error yet: the status is spooled
        # and the PUBACK wait below decides.
        service.connect(min(args.timeout_s / 2, 10.0))
        result = service.report_once()
        delivered = service.wait_delivered(args.timeout_s)
    finally:
        service.shutdown() if args.offline_after else _leave(service)
    if service.refused:
        print(f"certmon-agent: the broker refused status seq={result.status.seq} "
              f"for {result.status.device_id} (ACL: a device may only write its own topics)",
              file=sys.stderr)
        return 2
    if not delivered:
        print(f"certmon-agent: status seq={result.status.seq} not acknowledged within "
              f"{args.timeout_s:g} s ({_why_undelivered(config, service)}); it stays "
              f"spooled in {service.spool.dir} and goes out with the next `once` or `run`",
              file=sys.stderr)
        return 1
    if args.json:
        write_json({"seq": result.status.seq, "device_id": result.status.device_id,
                    "delivered": True}, sys.stdout, indent=None)
    else:
        print(f"delivered status seq={result.status.seq} for {result.status.device_id}")
    return 0


def _why_undelivered(config: AgentConfig, service: AgentService) -> str:
    """What a newcomer can act on. paho says only "connect failed" when the session
    never came up, so then a TLS probe of the broker names the cause: refused, DNS,
    a port that does not speak TLS (a plain-MQTT 1883), our certificate rejected."""
    link = service.link
    error = (link.state.last_error if link else None) or "no MQTT link"
    if link is None or link.state.connects or not config.mqtt.is_tls:
        return error
    from certmon.tlsprobe import ProbeTarget, probe

    seen = probe(ProbeTarget(
        host=config.mqtt.host, port=config.mqtt.port, servername=config.mqtt.servername,
        alpn=config.mqtt.alpn, client_cert=str(config.tls.cert),
        client_key=str(config.tls.key), timeout_s=5.0))
    if seen.error is None:
        return f"{error}; a TLS handshake with {config.mqtt.broker} works"
    return seen.error if config.mqtt.host in seen.error else f"{config.mqtt.broker}: {seen.error}"


def _leave(service: AgentService) -> None:
    # `once` is not a session end for the device: stay "online" (no offline message,
    # a clean DISCONNECT so the will does not fire either).
    if service.link is not None:
        service.link.stop()


def cmd_run(config: AgentConfig, args: argparse.Namespace) -> int:
    """The config is valid: this process becomes the resident half of the agent, a
    fresh interpreter that never imports cryptography (this one has, to check the
    config); each report is checked in a child it forks (docs/agent-footprint.md)."""
    if os.geteuid() == 0:
        logging.getLogger("certmon.agent").warning(
            "running as root: the agent needs no privileges; use the packaged unit's user")
    if not config.agent.fork_checks:  # one process: more memory, less CPU per report
        import signal

        from .service import AgentService

        service = AgentService(config, reloader=lambda: load_config(args))
        on_stop_signals(service.request_stop)
        signal.signal(signal.SIGHUP, lambda *_: service.request_reload())
        return service.run()
    flags = json.dumps({key: value for key, value in vars(args).items()
                        if isinstance(value, str | int | float | bool | list | None)})
    sys.stdout.flush()
    sys.stderr.flush()
    # -P: the working directory does not go on sys.path (the console script's rule).
    os.execv(sys.executable, [sys.executable, "-P", "-m", "agent.resident", flags])  # noqa: S606


def cmd_renew(config: AgentConfig, args: argparse.Namespace) -> int:
    """One renewal check and, when due (or --force), one attempt. Exit codes
    (docs/renewal.md): 0 renewed or not due, 1 due but not attempted (backing off,
    or the clock is known to be wrong), 2 the attempt failed, 3 nothing to renew."""
    from .renewal.attempt import renewal_exit_code, renewal_to_json
    from .service import AgentService

    if not config.renewal.command:
        raise ConfigError("renew: renewal.command is not set (docs/renewal.md)")
    run = AgentService(config).renew(force=args.force)
    if run is None:
        print(f"certmon-agent: renew: no client certificate in {config.tls.cert}",
              file=sys.stderr)
        return 3
    code = renewal_exit_code(run)
    if args.json:
        write_json({**renewal_to_json(run), "exit_code": code}, sys.stdout, indent=None)
    elif run.result is not None and not run.result.is_renewed:
        print(f"certmon-agent: renewal failed: {run.result.reason}", file=sys.stderr)
    elif run.result is not None:
        print(f"renewed: {run.result.reason}")
    elif code == 1:
        print(f"certmon-agent: renewal due since {pki.iso_utc(run.decision.due_at)} but not "
              f"attempted: {run.decision.reason}", file=sys.stderr)
    else:
        print(f"not due: renewal at {pki.iso_utc(run.decision.due_at)}")
    return code


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    if args.broker_config:
        return _check_broker_host(args, out)
    policy = pki.Policy()
    ca_bundle, cert, key = args.ca_bundle, args.cert, args.key
    signing: dict[str, Any] = {}
    if args.config:
        from .config import load_agent_config

        config = load_agent_config(Path(args.config), check_files=False)
        ca_bundle = ca_bundle or str(config.tls.ca_bundle)
        cert = cert or (str(config.tls.cert) if config.tls.cert else None)
        key = key or (str(config.tls.key) if config.tls.key else None)
        policy = pki.Policy(**dataclasses.asdict(config.policy))
        signing = config.tls.signing_args()
    if ca_bundle is None:
        raise ConfigError("check: --ca-bundle (or --config with tls.ca_bundle) is required")
    policy = with_thresholds(policy, args)
    required = [pki.read_bundle(path) for path in args.require_ca]
    result = check_device(read_material(ca_bundle, cert, key, **signing), utc_now(), policy)
    # The same rule as the status `run` publishes: a CA's expiry counts when something
    # here chains through it (the client chain, a --require-ca).
    result = judged_by_use(result, (c.facts.sha256 for b in required for c in b.certs),
                           count_stale=args.count_stale_cas)
    result = dataclasses.replace(result, findings=(
        *result.findings, *required_ca_findings(result.trust_store, required)))
    if args.json:
        write_json(check_to_json(result), out)
    else:
        render_check(result, out)
    return exit_code(result)


def _check_broker_host(args: argparse.Namespace, out: TextIO) -> int:
    from .brokerhost.render import run_check

    policy = pki.Policy()
    if args.config:
        from .config import load_agent_config

        config = load_agent_config(Path(args.config), check_files=False)
        policy = pki.Policy(**dataclasses.asdict(config.policy))
    return run_check(Path(args.broker_config), "mosquitto", utc_now(),
                     with_thresholds(policy, args), out, as_json=args.json)


def exit_code(result: DeviceCheck) -> int:
    return int(check_status(result))


def check_status(result: DeviceCheck) -> pki.Severity:
    """Worst severity; UNKNOWN when an input named on the command line was unreadable
    (the check could not look, which is not the same as having looked and found it bad)."""
    if any(f.code in UNREADABLE for f in result.findings):
        return pki.Severity.UNKNOWN
    return result.severity


def check_to_json(result: DeviceCheck) -> dict[str, object]:
    return {
        "status": check_status(result).name,
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
    counted = [f for f in findings if f.severity != pki.Severity.OK]
    info = len(findings) - len(counted)
    out.write(f"{check_status(result).name}: {len(counted)} finding(s)")
    if info:
        out.write(f"; {info} stale CA(s), for information only (--count-stale-cas "
                  "counts them)")
    out.write("\n")
    for f in findings:
        label = "INFO" if f.severity == pki.Severity.OK else f.severity.name
        out.write(f"  {label:8} {f.code.value:32} {f.message}\n")


PROGRAM = Program("certmon-agent", build_parser, load_config, checks={"check": cmd_check},
                  configured={"run": cmd_run, "once": cmd_once, "show": cmd_show,
                              "renew": cmd_renew})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
