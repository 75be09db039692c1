"""Broker hosts as the collector knows them: the `broker_host` part of each device's
latest verified status (docs/broker-host.md).

Owns reading that part back from the stored status JSON and the three shapes it is
shown in: the dashboard's rows (`host_json`: listeners, files, CRLs with their
nextUpdate, served-versus-disk drift), the /metrics families (`metric_families`) and
the `report` lines (`report_rows`, `render_rows`). No table of its own: a broker
host's report *is* its latest status, stored (and replaced, and ordered by boot_id
and seq) by the ingest like any device's, and its findings already alert as that
device's own. Must not write the store or judge anything: the agent judged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from certmon import wire as p
from certmon.errors import ProtocolError

from . import aggregate


@dataclass(frozen=True, slots=True)
class BrokerHostView:
    """One broker host: the device that reported it and what it reported."""

    device_id: str
    state: p.BrokerHostState


def broker_host_of(device_id: str, status_json: str | None) -> BrokerHostView | None:
    """The status's broker-host part, or None. Canonical JSON (sorted keys) lets the
    object be decoded alone, as `web.fleet` does for "broker"; the status was verified
    at ingest, and a part this collector cannot decode (a newer agent) is skipped."""
    obj = aggregate.status_part(status_json, "broker_host")
    if obj is None:
        return None
    try:
        return BrokerHostView(device_id, p.BrokerHostState.from_json(obj, "broker_host"))
    except (ValueError, ProtocolError):
        return None


def _days(when: datetime | None, now: datetime) -> float | None:
    return None if when is None else round((when - now).total_seconds() / 86400, 2)


def host_json(view: BrokerHostView, now: datetime) -> dict[str, object]:
    state = view.state
    endpoints = []
    for e in state.endpoints:
        files = [{"directive": f.directive, "path": f.path, "at": f.at,
                  "severity": f.severity.name, "cert_count": f.cert_count,
                  "certs": [{"ref": c.ref, "subject": c.subject,
                             "not_after": p.format_instant(c.not_after),
                             "days_left": _days(c.not_after, now)} for c in f.certs],
                  "crls": [{"issuer": c.issuer, "this_update": p.format_instant(c.this_update),
                            "next_update": (p.format_instant(c.next_update)
                                            if c.next_update else None),
                            "days_left": _days(c.next_update, now), "crl_number": c.crl_number,
                            "revoked_count": c.revoked_count, "signed_by": c.signed_by}
                           for c in f.crls]} for f in e.files]
        endpoints.append({
            "kind": e.kind, "name": e.name, "at": e.at, "port": e.port, "is_tls": e.is_tls,
            "require_certificate": e.require_certificate, "files": files,
            "served": None if e.served is None else {
                "ref": e.served.ref, "subject": e.served.subject,
                "not_after": p.format_instant(e.served.not_after),
                "days_left": _days(e.served.not_after, now)},
            "served_error": e.served_error, "is_reloaded": e.is_reloaded})
    return {"device_id": view.device_id, "kind": state.kind, "config": state.config,
            "checked_at": p.format_instant(state.checked_at), "severity": state.severity.name,
            "files_read": state.files_read, "endpoints": endpoints,
            "not_reloaded": [e.name for e in state.endpoints if e.is_reloaded is False]}


def _crls(views: Iterable[BrokerHostView]) -> Iterator[tuple[str, str, p.CrlBrief]]:
    for v in views:
        for e in v.state.endpoints:
            for f in e.files:
                for crl in f.crls:
                    yield v.device_id, f.path, crl


def metric_families(views: Iterable[BrokerHostView]) -> Iterator[Metric]:
    views = list(views)
    next_update = GaugeMetricFamily(
        "certmon_broker_crl_next_update_seconds",
        "nextUpdate (Unix time) of each CRL a broker host's crlfile holds; a broker "
        "refuses every client certificate after it", labels=["device", "file"])
    earliest: dict[tuple[str, str], datetime] = {}
    for device, path, crl in _crls(views):
        # Several CRLs in one file: the earliest nextUpdate is when it breaks.
        if crl.next_update is not None:
            prev = earliest.get((device, path))
            earliest[device, path] = min(prev or crl.next_update, crl.next_update)
    for (device, path), when in earliest.items():
        next_update.add_metric([device, path], when.timestamp())
    yield next_update
    not_reloaded = GaugeMetricFamily(
        "certmon_broker_cert_not_reloaded",
        "1 when a TLS listener serves another certificate than its certfile on disk "
        "(renewed, not reloaded); 0 when it serves it", labels=["device", "listener"])
    served = GaugeMetricFamily(
        "certmon_broker_served_not_after_seconds",
        "notAfter (Unix time) of the certificate a broker host's TLS listener serves",
        labels=["device", "listener"])
    # A bridge's remote is another broker (the central one a gateway bridges to): its
    # own family, so a rule on the host's served certificate does not fire once per
    # gateway for a certificate none of them can renew.
    remote = GaugeMetricFamily(
        "certmon_broker_bridge_remote_not_after_seconds",
        "notAfter (Unix time) of the certificate a broker host's bridge remote presents "
        "to its agent's probe", labels=["device", "bridge"])
    for v in views:
        for e in v.state.endpoints:
            if e.is_reloaded is not None:
                not_reloaded.add_metric([v.device_id, e.name], 0.0 if e.is_reloaded else 1.0)
            if e.served is not None:
                (remote if e.kind == "bridge" else served).add_metric(
                    [v.device_id, e.name], e.served.not_after.timestamp())
    yield not_reloaded
    yield served
    yield remote


def report_rows(views: Iterable[BrokerHostView], now: datetime) -> list[dict[str, object]]:
    """One row per thing `report` names: a CRL with its nextUpdate, a listener whose
    served certificate is not its certfile's."""
    rows: list[dict[str, object]] = []
    for v in views:
        for e in v.state.endpoints:
            if e.is_reloaded is False and e.served is not None:
                rows.append({"device_id": v.device_id, "what": "not_reloaded",
                             "name": e.name, "at": e.at,
                             "served_not_after": p.format_instant(e.served.not_after),
                             "days_left": _days(e.served.not_after, now)})
            for f in e.files:
                for crl in f.crls:
                    rows.append({"device_id": v.device_id, "what": "crl", "name": f.path,
                                 "at": f.at, "next_update": (p.format_instant(crl.next_update)
                                                             if crl.next_update else None),
                                 "days_left": _days(crl.next_update, now)})
    return rows


def render_rows(rows: Iterable[dict[str, object]], out: TextIO) -> None:
    rows = list(rows)
    if not rows:
        return
    out.write("\nbroker hosts:\n")
    for r in rows:
        days = r["days_left"]
        left = f"{days:7.1f} d" if isinstance(days, float) else "  never  "
        if r["what"] == "crl":
            out.write(f"  {left}  {r['device_id']!s:24} crl nextUpdate {r['next_update']}"
                      f"  {r['name']} ({r['at']})\n")
        else:
            out.write(f"  {left}  {r['device_id']!s:24} {r['name']} serves a certificate "
                      f"(notAfter {r['served_not_after']}) that is not its certfile: renewed, "
                      f"not reloaded ({r['at']})\n")


__all__ = ["BrokerHostView", "broker_host_of", "host_json", "metric_families",
           "render_rows", "report_rows"]
