"""`certmon-collector`: run | report | check-config.

Owns its commands' flags and `--help` examples, flags-over-config merging, the
`report` table and its Nagios exit code, and the one line `report` says instead when
there is nothing to report on (a missing, empty, locked or unreadable store: exit 3).
The skeleton around the commands (usage errors exit 3, 78 on a config error, one line
instead of a traceback for store/web/transport errors, stop signals) is
`certmon.cli`'s; computation lives in the service, the store and collector.aggregate.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

from certmon import clock as wallclock
from certmon.cli import (
    Program,
    add_examples,
    add_verbose,
    new_parser,
    on_stop_signals,
    write_json,
)
from certmon.config import load_with_flags
from certmon.errors import ConfigError
from certmon.pki import Severity

from . import aggregate, brokers
from .config import CollectorConfig, load_collector_config
from .store import AlertRow, Store, StoreError, open_store
from .store.sqlite import SqliteStore, path_from_url

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
    parser.add_argument("--topic-prefix", help="topic prefix (default certmon/v2)")
    parser.add_argument("--webhook-url", action="append", help="Alertmanager-style webhook")
    add_verbose(parser)


CONFIG = "/etc/certmon/collector.toml"
DB = "sqlite:////var/lib/certmon-collector/certmon.db"
# How long `report` waits for a SQLite lock another process holds: a check must answer
# promptly, and the collector's own write transactions last milliseconds.
REPORT_BUSY_TIMEOUT_S = 3.0


def build_parser() -> argparse.ArgumentParser:
    parser = add_examples(new_parser("certmon-collector"),
                          f"certmon-collector run --config {CONFIG}",
                          f"certmon-collector report --db {DB}",
                          f"certmon-collector check-config --config {CONFIG}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="verify, store, alert, serve")
    add_config_flags(run)
    add_examples(run, f"certmon-collector run --config {CONFIG}",
                 "certmon-collector run --broker mqtts://broker.example:8884 --ca-bundle "
                 "broker-ca.pem --cert collector.crt --key collector.key --fleet-ca "
                 f"fleet-root.pem --db {DB} --listen 127.0.0.1:9310")
    check_config = sub.add_parser("check-config", help="validate config and flags")
    add_config_flags(check_config)
    add_examples(check_config, f"certmon-collector check-config --config {CONFIG}",
                 f"certmon-collector check-config --config {CONFIG} "
                 "--db postgresql://certmon@db.example/certmon")
    report = sub.add_parser("report", help="devices and certificates at risk")
    report.add_argument("--db", help="sqlite:///PATH or postgresql://…")
    report.add_argument("--config", help="read store.url from this config")
    report.add_argument("--within-days", type=float, default=30.0)
    report.add_argument("--json", action="store_true")
    add_verbose(report)
    add_examples(report, f"certmon-collector report --db {DB}",
                 f"certmon-collector report --config {CONFIG} --within-days 60 --json")
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
    """The store to report on, opened without creating anything: a SQLite path that
    does not exist is said so (connecting would create an empty database there)."""
    url = args.db
    if url is None and args.config:
        url = load_collector_config(Path(args.config), check_files=False).store.url
    if url is None:
        raise ConfigError("report: --db (or --config with store.url) is required")
    if "://" not in url:
        hint = f"sqlite:///{url.lstrip('/')}" if url.startswith("/") else f"sqlite://{url}"
        raise StoreError(f"--db {url!r} is not a store URL: for that file write {hint} "
                         "(or postgresql://… for PostgreSQL)")
    if not url.startswith("sqlite:"):
        return open_store(url)
    # sqlite:////var/lib/x.db names //var/lib/x.db, which is /var/lib/x.db: say it so.
    path = Path("/" + path_from_url(url).lstrip("/") if url.startswith("sqlite:///")
                else path_from_url(url))
    denied = StoreError(f"{path}: permission denied (SQLite needs to write the file and "
                        "its directory even to read in WAL mode; run the report as the "
                        "collector's user)")
    try:
        is_dir = stat.S_ISDIR(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_dir = None
    except PermissionError:
        raise denied from None
    if is_dir is not False:
        what = "is a directory, not a database file" if is_dir else "does not exist"
        raise StoreError(f"no certmon database at {path}: it {what} (check --db; "
                         "`certmon-collector run` creates it on its first start)")
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK):
        raise denied
    return SqliteStore(str(path), busy_timeout_s=REPORT_BUSY_TIMEOUT_S)


def _nothing_to_report(exc: StoreError, args: argparse.Namespace) -> StoreError:
    """A store error `report` can say plainly: a database without certmon's tables, or
    one another process holds locked."""
    text = str(exc)
    where = args.db or "the configured store"
    if "no such table" in text or ("relation" in text and "does not exist" in text):
        return StoreError(f"{where} is not a certmon database (no devices table): point "
                          "--db at the collector's store; `certmon-collector run` creates "
                          "the tables on its first start")
    if "database is locked" in text:
        return StoreError(f"{where}: the database is locked by another process (waited "
                          f"{REPORT_BUSY_TIMEOUT_S:g} s); try again, or look for a process "
                          "holding a transaction open (a sqlite3 shell?)")
    return exc


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
            # An offline device leads with DEVICE_OFFLINE, as on the dashboard.
            "worst": aggregate.shown_worst(d.worst_code, None, online=d.is_online,
                                           offline_since=d.online_changed_at)[0]
            or _fleet_rule(active, d.device_id),
            "findings": [f.code for f in d.findings],
            "last_received_at": d.last_received_at.isoformat() if d.last_received_at else None,
            "clock_offset_lo_s": d.clock_offset_lo_s, "clock_offset_hi_s": d.clock_offset_hi_s,
        })
    expiring = [{"device_id": h.device_id, "role": str(h.role), "subject": h.cert.subject,
                 "sha256": h.cert.sha256, "not_after": h.cert.not_after.isoformat(),
                 "days_left": round((h.cert.not_after - now).total_seconds() / 86400, 1)}
                for h in store.certificates_expiring_before(horizon)]
    hosts = [h for d in devices if (h := brokers.broker_host_of(d.device_id, d.status_json))]
    return {"now": now.isoformat(), "devices": rows, "expiring": expiring,
            "broker_hosts": brokers.report_rows(hosts, now),
            "offline": [r["device_id"] for r in rows if r["state"] == "offline"],
            "rejections": store.rejection_counts(),
            "last_store_outage": _last_store_outage(store),
            "active_alerts": [{"rule": a.rule, "device_id": a.device_id,
                               "severity": Severity(min(a.severity, 3)).name,
                               "summary": a.summary} for a in active]}


def _last_store_outage(store: Store) -> dict[str, object] | None:
    """The newest store outage a collector recorded (docs/reliability.md)."""
    try:
        outages = store.store_outages(limit=1)
    except StoreError:  # a schema-1 database no collector of this version has migrated
        return None
    return None if not outages else {
        "collector": outages[0].collector, "started_at": outages[0].started_at.isoformat(),
        "ended_at": outages[0].ended_at.isoformat(),
        "duration_s": round(outages[0].duration_s, 1),
        "messages_held": outages[0].messages_held, "error": outages[0].error}


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
    try:
        store = _report_store(args)
        try:
            report = build_report(store, wallclock.utc_now(), args.within_days)
        finally:
            store.close()
    except StoreError as exc:
        raise _nothing_to_report(exc, args) from exc
    if not report["devices"]:
        raise StoreError(f"{args.db or 'the configured store'} holds no devices yet: no "
                         "agent status has been stored (is `certmon-collector run` "
                         "running, and do agents publish to its broker?)")
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
    broker_rows = report.get("broker_hosts")
    brokers.render_rows(broker_rows if isinstance(broker_rows, list) else [], out)
    rejections = report["rejections"]
    assert isinstance(rejections, dict)
    if rejections:
        out.write("\nrejected messages: " + ", ".join(f"{k}={v}" for k, v in
                                                      sorted(rejections.items())) + "\n")
    outage = report.get("last_store_outage")
    if isinstance(outage, dict):
        out.write(f"\nlast store outage: {outage['started_at']} ({outage['duration_s']:g} s, "
                  f"{outage['messages_held']} messages held, {outage['error']}; "
                  f"{outage['collector']})\n")
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
