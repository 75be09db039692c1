"""The JSON API's views: store → JSON-able dicts, one function per route.

Owns what the dashboard and API clients see (docs/dashboard.md is the contract):
device states, expiry timeline buckets, CA readiness, broker chains as seen versus
scanned, clock-offset distribution, alerts and the running collector's store health.
Fleet-wide views read one cached `Snapshot` (collector.web.fleet: what it holds, its
TTL and memo) and are memoised on it; per-device views read the store directly.

It must not write to the store, serve HTTP (collector.web.app) or read the clock
except through the injected `now`. Instants leave as RFC 3339 'Z' strings.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from certmon import wire as p
from certmon.clock import monotonic_s
from certmon.pki import Severity
from collector import aggregate, brokers
from collector.store import SEVERITY_NAMES, AlertRow, CertRole, CertRow, Store, StoreError
from collector.storehealth import StoreHealth
from collector.trust import RequiredCA

from .fleet import (
    FAR_FUTURE,
    JSON,
    CertAgg,
    DeviceBrief,
    Snapshot,
    SnapshotCache,
    View,
    build_snapshot,
    instant,
)

T = TypeVar("T")
# Dashboard roles: what an operator acts on. A device's chain and trust-store CAs are
# both "ca" (rotated by the PKI team); a signing certificate is a device certificate.
ROLE_GROUP = {CertRole.CLIENT: "client", CertRole.SIGNING: "client", CertRole.CHAIN: "ca",
              CertRole.TRUST: "ca", CertRole.BROKER: "broker"}
GROUPS = ("client", "ca", "broker")
STATE_RANK = {"critical": 0, "clock": 1, "warning": 2, "offline": 3, "ok": 4}
# Clock histogram edges (seconds, device minus true time): ±1 s is healthy, ±5 min
# breaks nothing yet, beyond an hour TLS validity windows start to bite.
CLOCK_EDGES = (-86400.0, -3600.0, -300.0, -60.0, -5.0, -1.0, 1.0, 5.0, 60.0, 300.0, 3600.0,
               86400.0)


class BadRequest(ValueError):
    """A query parameter is invalid; the message is safe to show the client."""


def days_left(when: datetime | None, now: datetime) -> float | None:
    return None if when is None else round((when - now).total_seconds() / 86400.0, 2)


# The name tests and benches build requirements by; one type with the alert rules',
# resolved once by collector.trust.
TrustRequirementView = RequiredCA


def alert_json(a: AlertRow) -> JSON:
    return {"key": a.alert_key, "rule": a.rule, "device_id": a.device_id,
            "cert_sha256": a.cert_sha256, "severity": SEVERITY_NAMES.get(a.severity, "unknown"),
            "state": a.state, "summary": a.summary, "labels": a.labels,
            "started_at": instant(a.started_at), "resolved_at": instant(a.resolved_at),
            "last_notified_at": instant(a.last_notified_at), "notify_count": a.notify_count,
            "updated_at": instant(a.updated_at)}


def cert_json(c: CertRow, now: datetime) -> JSON:
    return {"sha256": c.sha256, "subject": c.subject, "issuer": c.issuer,
            "serial_hex": c.serial_hex, "not_before": instant(c.not_before),
            "not_after": instant(c.not_after), "days_left": days_left(c.not_after, now),
            "key_type": c.key_type, "key_bits": c.key_bits,
            "signature_algorithm": c.signature_algorithm, "is_ca": c.is_ca}


def _int_param(params: Mapping[str, str], name: str, default: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) > hi:
        raise BadRequest(f"{name} must be an integer between 0 and {hi}")
    return int(raw)


SORTS: dict[str, Callable[[DeviceBrief, datetime], tuple[Any, ...]]] = {
    "risk": lambda d, _: (STATE_RANK.get(d.state, 9), d.risk_not_after or FAR_FUTURE,
                          d.device_id),
    "device": lambda d, _: (d.device_id,),
    "state": lambda d, _: (STATE_RANK.get(d.state, 9), d.device_id),
    "days_left": lambda d, _: (d.risk_not_after or FAR_FUTURE, d.device_id),
    "last_seen": lambda d, _: (d.last_seen_at or datetime.min.replace(tzinfo=UTC), d.device_id),
    "clock": lambda d, _: (-abs(aggregate.OffsetInterval(d.clock_lo_s, d.clock_hi_s)
                                .estimate_s or 0.0), d.device_id),
}


class FleetApi:
    """The views over one store; thread-safe (waitress serves from several threads)."""

    def __init__(self, store: Store, *, now: Callable[[], datetime],
                 trust_requirements: Sequence[RequiredCA] = (),
                 snapshot_ttl_s: float = 10.0,
                 monotonic: Callable[[], float] | None = None,
                 extra_views: Mapping[str, View] | None = None) -> None:
        self.store = store
        self.now = now
        self.requirements = tuple(trust_requirements)
        # The views the background builder warms: these, and other modules' (the
        # /metrics exposition) by the key they are memoised under.
        views: dict[str, View] = {
            "summary": self._summary, "cas": self._cas, "brokers": self._brokers,
            "clock": self._clock, "timeline:26": lambda x: self._timeline(x, 26),
            **(extra_views or {})}
        self._cache = SnapshotCache(store, now=now, requirements=self.requirements,
                                    ttl_s=snapshot_ttl_s, monotonic=monotonic or monotonic_s,
                                    views=views)

    def snapshot(self) -> Snapshot:
        return self._cache.snapshot()

    def memo(self, key: str, view: Callable[[Snapshot], T]) -> T:
        """`view` of the current snapshot, computed once per snapshot."""
        return self._cache.memo(key, view)

    # ------------------------------------------------------------------ fleet views

    def summary(self) -> JSON:
        summary = self.memo("summary", self._summary)
        try:
            rejected = self.store.rejection_counts()  # cheap; counts move between snapshots
        except StoreError:  # an outage: the snapshot's views still serve, this part waits
            return {**summary, "rejected": None}
        return {**summary, "rejected": {"total": sum(rejected.values()), "by_reason": rejected}}

    def health(self, store: StoreHealth | None, backlog: int | None,
               broker_connected: bool | None) -> JSON:
        """The running collector's own state (None: a bare store is served): read from
        the process, never from the store, so it answers during a store outage."""
        now = self.now()
        store_json: JSON | None = None
        if store is not None:
            last = store.last_outage
            store_json = {
                "up": store.is_up, "since": instant(store.since_at),
                "down_s": round(store.down_s(now), 1), "error": store.error,
                "held": backlog if not store.is_up else 0, "outages": store.outages,
                "last_outage": None if last is None else {
                    "started_at": instant(last.started_at), "ended_at": instant(last.ended_at),
                    "duration_s": round(last.duration_s, 1),
                    "messages_held": last.messages_held, "error": last.error}}
        return {"generated_at": instant(now), "store": store_json, "backlog": backlog,
                "broker_connected": broker_connected}

    def _summary(self, s: Snapshot) -> JSON:
        now = s.taken_at
        states = Counter(d.state for d in s.devices)
        upcoming = sorted((a for a in s.certs.values() if a.cert.not_after >= now),
                          key=lambda a: (a.cert.not_after, a.cert.sha256))[:10]
        expired: Counter[str] = Counter()
        for a in s.certs.values():
            if a.cert.not_after < now:
                for role in a.holders:
                    expired[ROLE_GROUP[CertRole(role)]] += a.holders[role]
        soon = [d.risk_not_after for d in s.devices if d.risk_not_after is not None]
        return {
            "generated_at": instant(now), "snapshot_build_s": s.build_s,
            "devices": {"total": len(s.devices),
                        **{st: states.get(st, 0) for st in STATE_RANK}},
            "next_expiries": [_expiry_json(a, now) for a in upcoming],
            "devices_expiring": {f"{k}d": sum(1 for t in soon if now <= t < now + timedelta(days=k))
                                 for k in (3, 14, 30)},
            "expired_holdings": {g: expired.get(g, 0) for g in GROUPS},
            "alerts_active": len(s.alerts),
            "alerts_by_severity": dict(Counter(SEVERITY_NAMES.get(a.severity, "unknown")
                                               for a in s.alerts)),
            "scans": {"targets": len(s.scans),
                      "failing": sum(1 for x in s.scans if not x["success"])},
        }

    def devices(self, params: Mapping[str, str]) -> JSON:
        s = self.snapshot()
        wanted = {x for x in params.get("state", "").split(",") if x}
        if wanted - {*STATE_RANK, "at_risk"}:
            raise BadRequest(f"state must be among {', '.join([*STATE_RANK, 'at_risk'])}")
        if "at_risk" in wanted:
            wanted |= set(STATE_RANK) - {"ok"}
        q = params.get("q", "").strip().lower()
        sort = params.get("sort") or "risk"
        key = SORTS.get(sort.lstrip("-"))
        if key is None:
            raise BadRequest(f"sort must be one of {', '.join(SORTS)} (prefix - to reverse)")
        limit = _int_param(params, "limit", 100, 1000)
        offset = _int_param(params, "offset", 0, 10**9)
        rows = [d for d in s.devices if (not wanted or d.state in wanted) and (
            not q or q in d.device_id.lower() or q in (d.subject or "").lower()
            or q in (d.worst_code or "").lower())]
        rows.sort(key=lambda d: key(d, s.taken_at), reverse=sort.startswith("-"))
        return {"total": len(rows), "offset": offset, "limit": limit,
                "items": [_device_item(d, s.taken_at) for d in rows[offset:offset + limit]]}

    def timeline(self, params: Mapping[str, str]) -> JSON:
        weeks = _int_param(params, "weeks", 26, 520)
        return self.memo(f"timeline:{weeks}", lambda s: self._timeline(s, weeks))

    def _timeline(self, s: Snapshot, weeks: int) -> JSON:
        """Certificates by ISO week of not_after, per role group; expired ones apart."""
        now = s.taken_at
        start = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0,
                                                              microsecond=0)
        end = start + timedelta(weeks=weeks)
        zero = dict.fromkeys(GROUPS, 0)
        buckets = [{"week": _iso_week(start + timedelta(weeks=i)),
                    "start": instant(start + timedelta(weeks=i)), "certificates": dict(zero),
                    "holdings": dict(zero)} for i in range(weeks)]
        expired = {"certificates": dict(zero), "holdings": dict(zero)}
        later = {"certificates": dict(zero), "holdings": dict(zero)}

        def add(na: datetime, group: str, holdings: int) -> None:
            if na < now:
                bucket: JSON = expired
            elif na >= end:
                bucket = later
            else:
                bucket = buckets[(na - start) // timedelta(weeks=1)]
            bucket["certificates"][group] += 1
            bucket["holdings"][group] += holdings

        for a in s.certs.values():
            groups: Counter[str] = Counter()
            for role, n in a.holders.items():
                groups[ROLE_GROUP[CertRole(role)]] += n
            for group, n in groups.items():
                add(a.cert.not_after, group, n)
        for na in _scanned_only(s):  # scanned broker certs that no device reported
            add(na, "broker", 0)
        return {"generated_at": instant(now), "weeks": buckets, "expired": expired,
                "later": later, "groups": list(GROUPS)}

    def cas(self) -> JSON:
        return self.memo("cas", self._cas)

    def _cas(self, s: Snapshot) -> JSON:
        now = s.taken_at
        req = {r.sha256: r for r in self.requirements}
        rows = []
        for a in s.certs.values():
            trust, chain = a.holders.get("trust", 0), a.holders.get("chain", 0)
            if not (trust or chain or a.cert.sha256 in req):
                continue
            r = req.get(a.cert.sha256)
            rows.append({**_expiry_json(a, now), "trust_devices": trust, "chain_devices": chain,
                         "requirement": None if r is None else {"name": r.name,
                                                                "status": r.status}})
        rows.sort(key=lambda x: (x["not_after"] or "", x["sha256"]))
        with_trust = len(s.trust_holders)
        reqs = []
        for r in self.requirements:
            holding = s.required_holders.get(r.sha256, set())
            missing = sorted(s.trust_holders - holding)
            known = s.certs.get(r.sha256)
            reqs.append({
                "name": r.name, "sha256": r.sha256, "status": r.status,
                "subject": known.cert.subject if known else None,
                "not_after": instant(known.cert.not_after) if known else None,
                "devices_holding": len(holding), "devices_missing": len(missing),
                "share_holding": round(len(holding) / with_trust, 4) if with_trust else None,
                # required: who breaks when the old CA goes; retiring: who still needs it.
                "sample_devices": (missing if r.status == "required" else sorted(holding))[:50]})
        return {"generated_at": instant(now), "devices_with_trust_store": with_trust,
                "cas": rows, "requirements": reqs}

    def brokers(self) -> JSON:
        return self.memo("brokers", self._brokers)

    def _brokers(self, s: Snapshot) -> JSON:
        by_endpoint: dict[str, list[JSON]] = defaultdict(list)
        for scan in s.scans:
            by_endpoint[_hostport(scan["target"])].append(scan)
        seen = []
        for agg in sorted(s.brokers_seen.values(), key=lambda a: (a.host, a.port, -a.devices)):
            endpoint = _hostport(f"{agg.host}:{agg.port}")
            scans = by_endpoint.get(endpoint, [])
            leaf = agg.chain[0].get("ref") if agg.chain else None
            scanned_leafs = {x["chain"][0]["ref"] for x in scans if x["chain"]}
            seen.append({"endpoint": endpoint, "host": agg.host, "port": agg.port,
                         "chain": agg.chain, "devices": agg.devices, "sample_devices": agg.sample,
                         "scan_targets": [x["target"] for x in scans],
                         # None: nothing scanned there (or the scan saw no chain).
                         "matches_scan": (leaf in scanned_leafs) if scanned_leafs else None})
        return {"generated_at": instant(s.taken_at), "scanned": s.scans, "seen_by_devices": seen,
                "mismatched_devices": sum(x["devices"] for x in seen if x["matches_scan"] is False),
                # The broker hosts' own reports (docs/broker-host.md).
                "hosts": [brokers.host_json(h, s.taken_at) for h in s.broker_hosts]}

    def clock(self) -> JSON:
        return self.memo("clock", self._clock)

    def _clock(self, s: Snapshot) -> JSON:
        edges = (None, *CLOCK_EDGES, None)
        counts = [0] * (len(edges) - 1)
        unknown = 0
        worst: list[tuple[float, float, DeviceBrief]] = []
        for d in s.devices:
            est = aggregate.OffsetInterval(d.clock_lo_s, d.clock_hi_s).estimate_s
            if est is None:
                unknown += 1
                continue
            counts[sum(1 for e in CLOCK_EDGES if est >= e)] += 1
            worst.append((abs(est), est, d))
        worst.sort(key=lambda x: (-x[0], x[2].device_id))
        bins = [{"lo_s": lo, "hi_s": hi, "label": _clock_label(lo, hi), "devices": n}
                for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True)]
        return {"generated_at": instant(s.taken_at), "bins": bins, "no_sample": unknown,
                "worst": [{"device_id": d.device_id, "state": d.state,
                           "clock_offset_lo_s": d.clock_lo_s, "clock_offset_hi_s": d.clock_hi_s,
                           "estimate_s": round(est, 3)}
                          for _, est, d in worst[:20]]}

    def alerts(self, params: Mapping[str, str]) -> JSON:
        """Active alerts (the first `limit`, most severe first) and recent history. A
        fleet-wide outage can fire one alert per device: 26k rows are not a page."""
        limit = _int_param(params, "limit", 100, 1000)
        active = self.snapshot().alerts
        try:
            history = [alert_json(a) for a in self.store.alert_history(limit=limit)]
        except StoreError:  # an outage: active alerts from the snapshot still show
            history = []
        return {"active_total": len(active), "active": [alert_json(a) for a in active[:limit]],
                "history": history}

    # ------------------------------------------------------------------ one device

    def device(self, device_id: str) -> JSON | None:
        row = self.store.device(device_id)
        if row is None:
            return None
        now = self.now()
        # Fleet-rule alerts from the cached snapshot: listing every active alert of a
        # 100,000-device fleet for one device page would cost more than the page.
        fleet = aggregate.fleet_severities(a for a in self.snapshot().alerts
                                           if a.device_id == device_id)
        state = aggregate.device_state(row.severity, row.worst_code, online=row.is_online,
                                       fleet_severity=fleet.get(device_id, 0))
        inv = self.store.inventory(device_id)
        try:
            status = json.loads(row.status_json) if row.status_json else None
        except ValueError:
            status = None
        return {
            "device_id": row.device_id, "state": str(state),
            "severity": SEVERITY_NAMES.get(row.severity, "unknown"),
            "worst_code": row.worst_code,
            "category": aggregate.category(row.worst_code) if row.worst_code else None,
            "online": row.is_online, "online_changed_at": instant(row.online_changed_at),
            "first_seen_at": instant(row.first_seen_at),
            "last_seen_at": instant(row.last_received_at),
            "last_status_ts": instant(row.last_status_ts), "interval_s": row.interval_s,
            "boot_id": row.boot_id, "seq": row.seq,
            "clock_offset_lo_s": row.clock_offset_lo_s, "clock_offset_hi_s": row.clock_offset_hi_s,
            "clock_offset_at": instant(row.clock_offset_at),
            "findings": [{"code": f.code, "severity": SEVERITY_NAMES.get(f.severity, "unknown"),
                          "category": aggregate.category(f.code), "cert": f.cert_sha256,
                          "message": f.message} for f in row.findings],
            "status": status,
            "certificates": [{"role": str(link.role), **cert_json(link.cert, now)}
                             for link in self.store.device_certs(device_id)],
            "inventory": None if inv is None else {
                "digest": inv.digest, "updated_at": instant(inv.updated_at),
                "cas": json.loads(inv.cas_json)},
            "alerts": [alert_json(a) for a in self.store.alert_history(device_id, limit=100)],
            "history": [{"at": instant(h.at), "kind": h.kind, "detail": h.detail}
                        for h in self.store.history(device_id, limit=100)],
        }


def _device_item(d: DeviceBrief, now: datetime) -> JSON:
    na = d.risk_not_after
    return {"device_id": d.device_id, "state": d.state,
            "severity": SEVERITY_NAMES.get(d.severity, "unknown"), "worst_code": d.worst_code,
            "worst_message": d.worst_message,
            "category": aggregate.category(d.worst_code) if d.worst_code else None,
            "subject": d.subject, "not_after": instant(na), "days_left": days_left(na, now),
            "online": d.is_online, "last_seen_at": instant(d.last_seen_at),
            "clock_offset_lo_s": d.clock_lo_s, "clock_offset_hi_s": d.clock_hi_s}


def _expiry_json(a: CertAgg, now: datetime) -> JSON:
    groups = sorted({ROLE_GROUP[CertRole(r)] for r in a.holders})
    return {"sha256": a.cert.sha256, "subject": a.cert.subject,
            "not_after": instant(a.cert.not_after), "days_left": days_left(a.cert.not_after, now),
            "roles": groups, "devices": sum(a.holders.values())}


def _scanned_only(s: Snapshot) -> Iterable[datetime]:
    seen: set[str] = set()
    for scan in s.scans:
        for c in scan["chain"]:
            sha, na = c.get("sha256"), p.parse_instant(str(c.get("not_after")))
            if sha and na and sha not in s.certs and sha not in seen:
                seen.add(sha)
                yield na


def _hostport(target: str) -> str:
    # "sni@host:port" (certmon-scan's label) and "host:port" name the same endpoint.
    return target.rpartition("@")[2].lower()


def _iso_week(when: datetime) -> str:
    year, week, _ = when.isocalendar()
    return f"{year}-W{week:02d}"


def _clock_label(lo: float | None, hi: float | None) -> str:
    def fmt(x: float) -> str:
        a = abs(x)
        text = (f"{a / 86400:g} d" if a >= 86400 else f"{a / 3600:g} h" if a >= 3600
                else f"{a / 60:g} min" if a >= 60 else f"{a:g} s")
        return ("−" if x < 0 else "+") + text

    if lo is None:
        return f"< {fmt(hi or 0.0)}"
    if hi is None:
        return f"≥ {fmt(lo)}"
    return f"{fmt(lo)} … {fmt(hi)}"


__all__ = ["BadRequest", "FleetApi", "Severity", "Snapshot", "TrustRequirementView",
           "build_snapshot"]
