"""`certmon-collector`: run | report | check-config.

Owns its commands' flags, flags-over-config merging, the `report` table and its
Nagios exit code. The skeleton around the commands (logging, 78 on a config error,
one line instead of a traceback for store/web/transport errors, stop signals) is
`certmon.cli`'s; computation lives in the service, the store and collector.aggregate.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

from certmon import clock as wallclock
from certmon.cli import Program, add_verbose, new_parser, on_stop_signals, write_json
from certmon.config import load_with_flags
from certmon.errors import ConfigError
from certmon.pki import Severity

from . import aggregate
from .config import CollectorConfig, load_collector_config
from .store import AlertRow, Store, open_store

FLAG_KEYS = {
    "broker": "mqtt.broker", "ca_bundle": "tls.ca_bundle", "cert": "tls.cert", "key": "tls.key",
    "fleet_ca": "tls.fleet_ca", "db": "store.url", "share_group": "mqtt.share_group",
    "listen": "web.listen", "client_id": "mqtt.client_id", "topic_prefix": "mqtt.topic_prefix",
    "webhook_url": "alerts.webhook_urls",
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="collector TOML config (flags override it)")
    parser.add_argument("--broker", help="mqtts://HOST[:PORT]")
    parser.add_argument("--ca-bundle", help="CA bundle for the broker certificate")
    parser.add_argument("--cert", help="the collector's client certificate")
    parser.add_argument("--key", help="its private key")
    parser.add_argument("--fleet-ca", action="append", help="fleet CA (repeatable)")
    parser.add_argument("--db", help="sqlite:///PATH or postgresql://…")
    parser.add_argument("--share-group", help="MQTT v5 shared-subscription group")
    parser.add_argument("--listen", help="HOST:PORT for dashboard, API and /metrics")
    parser.add_argument("--client-id", help="MQTT client id")
    parser.add_argument("--topic-prefix", help="topic prefix (default certmon/v1)")
    parser.add_argument("--webhook-url", action="append", help="Alertmanager-style webhook")
    add_verbose(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("certmon-collector")
    sub = parser.add_subparsers(dest="command", required=True)
    add_config_flags(sub.add_parser("run", help="verify, store, alert, serve"))
    add_config_flags(sub.add_parser("check-config", help="validate config and flags"))
    report = sub.add_parser("report", help="devices and certificates at risk")
    report.add_argument("--db", help="sqlite:///PATH or postgresql://…")
    report.add_argument("--config", help="read store.url from this config")
    report.add_argument("--within-days", type=float, default=30.0)
    report.add_argument("--json", action="store_true")
    add_verbose(report)
    return parser


def load_config(args: argparse.Namespace) -> CollectorConfig:
    return load_with_flags(CollectorConfig, args.config, vars(args), FLAG_KEYS)


def main(argv: Sequence[str] | None = None) -> int:
    return PROGRAM.main(argv)


def cmd_run(config: CollectorConfig, _args: argparse.Namespace) -> int:
    from .wiring import build_collector

    service = build_collector(config)
    on_stop_signals(service.stop)
    return service.run()


def _report_store(args: argparse.Namespace) -> Store:
    url = args.db
    if url is None and args.config:
        url = load_collector_config(Path(args.config), check_files=False).store.url
    if url is None:
        raise ConfigError("report: --db (or --config with store.url) is required")
    return open_store(url)


def build_report(store: Store, now: datetime, within_days: float) -> dict[str, object]:
    devices = store.devices()
    horizon = now + timedelta(days=within_days)
    active = store.active_alerts()
    fleet = aggregate.fleet_severities(active)
    rows = []
    for d in devices:
        state = aggregate.device_state(d.severity, d.worst_code, online=d.is_online,
                                       fleet_severity=fleet.get(d.device_id, 0))
        severity = max(d.severity, fleet.get(d.device_id, 0))
        rows.append({
            "device_id": d.device_id, "state": str(state),
            "severity": Severity(min(severity, 3)).name,
            "worst": d.worst_code or _fleet_rule(active, d.device_id),
            "findings": [f.code for f in d.findings],
            "last_received_at": d.last_received_at.isoformat() if d.last_received_at else None,
            "clock_offset_lo_s": d.clock_offset_lo_s, "clock_offset_hi_s": d.clock_offset_hi_s,
        })
    expiring = [{"device_id": h.device_id, "role": str(h.role), "subject": h.cert.subject,
                 "sha256": h.cert.sha256, "not_after": h.cert.not_after.isoformat(),
                 "days_left": round((h.cert.not_after - now).total_seconds() / 86400, 1)}
                for h in store.certificates_expiring_before(horizon)]
    return {"now": now.isoformat(), "devices": rows, "expiring": expiring,
            "offline": [r["device_id"] for r in rows if r["state"] == "offline"],
            "rejections": store.rejection_counts(),
            "active_alerts": [{"rule": a.rule, "device_id": a.device_id,
                               "severity": Severity(min(a.severity, 3)).name,
                               "summary": a.summary} for a in active]}


def _fleet_rule(active: list[AlertRow], device_id: str) -> str | None:
    return next((a.rule for a in active if a.device_id == device_id
                 and a.labels.get("scope") in aggregate.FLEET_SCOPES), None)


def report_exit_code(report: dict[str, object]) -> int:
    rows = report["devices"]
    assert isinstance(rows, list)
    worst = Severity.OK
    for row in rows:
        if row["state"] == "offline":
            worst = max(worst, Severity.WARNING)
        else:
            worst = max(worst, Severity[row["severity"]] if row["severity"] != "UNKNOWN"
                        else Severity.WARNING)
    return int(worst)


def cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    store = _report_store(args)
    try:
        report = build_report(store, wallclock.utc_now(), args.within_days)
    finally:
        store.close()
    if args.json:
        write_json(report, out, sort_keys=True)
    else:
        render_report(report, out)
    return report_exit_code(report)


def render_report(report: dict[str, object], out: TextIO) -> None:
    rows = report["devices"]
    assert isinstance(rows, list)
    out.write(f"{'device':24} {'state':9} {'severity':9} {'worst finding':30} clock offset\n")
    for r in sorted(rows, key=lambda r: (r["state"] == "ok", r["device_id"])):
        lo, hi = r["clock_offset_lo_s"], r["clock_offset_hi_s"]
        offset = _offset_text(lo, hi)
        out.write(f"{r['device_id']:24} {r['state']:9} {r['severity']:9} "
                  f"{(r['worst'] or '-'):30} {offset}\n")
    expiring = report["expiring"]
    assert isinstance(expiring, list)
    if expiring:
        out.write("\ncertificates expiring:\n")
        for e in sorted(expiring, key=lambda e: e["days_left"]):
            out.write(f"  {e['days_left']:7.1f} d  {e['role']:7} {e['device_id']:24} "
                      f"{e['subject']}\n")
    rejections = report["rejections"]
    assert isinstance(rejections, dict)
    if rejections:
        out.write("\nrejected messages: " + ", ".join(f"{k}={v}" for k, v in
                                                      sorted(rejections.items())) + "\n")
    alerts = report["active_alerts"]
    assert isinstance(alerts, list)
    out.write(f"\n{len(alerts)} active alert(s)\n")
    for a in alerts:
        out.write(f"  {a['severity']:8} {a['rule']:30} {a['summary']}\n")


def _offset_text(lo: float | None, hi: float | None) -> str:
    if lo is None and hi is None:
        return "-"
    def fmt(v: float | None) -> str:
        return "?" if v is None else f"{v:+.0f}s"
    return f"[{fmt(lo)}, {fmt(hi)}]"


PROGRAM = Program("certmon-collector", build_parser, load_config, checks={"report": cmd_report},
                  configured={"run": cmd_run})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
