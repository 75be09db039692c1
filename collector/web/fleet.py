"""The fleet snapshot: every fleet-wide fact the web views need, and its cache.

Owns what a `Snapshot` holds, how it is read from the store (`build_snapshot`: four
store queries) and how long it is served: a dashboard refresh asks six endpoints at
once, and at 100k devices the queries behind a snapshot cost about a second, so
they run once per TTL, not once per request, and a stale snapshot is served while
one background thread rebuilds it. Views computed from a snapshot are memoised on it.
Must not shape JSON for a route (collector.web.api) or write to the store.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from certmon import wire as p
from collector import aggregate
from collector.brokers import BrokerHostView, broker_host_of
from collector.store import (
    SEVERITY_NAMES,
    AlertRow,
    CertRole,
    CertRow,
    DeviceRow,
    Store,
    StoreError,
)
from collector.trust import RequiredCA

log = logging.getLogger("certmon.collector.web")

JSON = dict[str, Any]
T = TypeVar("T")
FAR_FUTURE = datetime(9999, 12, 31, tzinfo=UTC)
View = Callable[["Snapshot"], object]


def instant(when: datetime | None) -> str | None:
    return None if when is None else p.format_instant(when)


@dataclass(slots=True)
class DeviceBrief:
    """One device as fleet views need it: no status JSON kept (100k × 2 KB)."""

    device_id: str
    state: str
    severity: int
    worst_code: str | None
    worst_message: str | None
    is_online: bool
    last_seen_at: datetime | None
    clock_lo_s: float | None
    clock_hi_s: float | None
    findings: tuple[tuple[str, int], ...]
    subject: str | None = None
    earliest: dict[str, datetime] = field(default_factory=dict)  # store role → not_after
    # The status's renewal part (docs/renewal.md), when the agent renews.
    renewal_due_at: datetime | None = None
    renewal_failures: int | None = None

    @property
    def risk_not_after(self) -> datetime | None:
        """Earliest expiry among what the device's own connection depends on."""
        held = [self.earliest[r] for r in ("client", "chain", "signing") if r in self.earliest]
        return min(held, default=None)


@dataclass(slots=True)
class CertAgg:
    cert: CertRow
    holders: Counter[str] = field(default_factory=Counter)  # store role → devices


@dataclass(slots=True)
class BrokerSeenAgg:
    host: str
    port: int
    chain: list[JSON]
    devices: int = 0
    sample: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Snapshot:
    taken_at: datetime
    devices: list[DeviceBrief]
    by_id: dict[str, DeviceBrief]
    certs: dict[str, CertAgg]
    trust_holders: set[str]  # devices that reported a trust store (inventory links)
    required_holders: dict[str, set[str]]  # requirement sha256 → devices holding it
    brokers_seen: dict[tuple[str, int, tuple[str, ...]], BrokerSeenAgg]
    alerts: list[AlertRow]
    scans: list[JSON]
    build_s: float = 0.0
    # Devices that report as broker hosts (docs/broker-host.md): a handful, not 100k.
    broker_hosts: list[BrokerHostView] = field(default_factory=list)
    views: dict[str, Any] = field(default_factory=dict)  # SnapshotCache.memo
    lock: threading.Lock = field(default_factory=threading.Lock)


def _broker_of(status_json: str | None) -> JSON | None:
    obj = aggregate.status_part(status_json, "broker")
    return obj if isinstance(obj, dict) and "host" in obj and "port" in obj else None


def _renewal_of(status_json: str | None) -> tuple[datetime | None, int | None]:
    """(due_at, failures) of the status's renewal part."""
    obj = aggregate.status_part(status_json, "renewal")
    if not isinstance(obj, dict):
        return None, None
    due = p.parse_instant(obj["due_at"]) if isinstance(obj.get("due_at"), str) else None
    failures = obj.get("failures")
    return due, failures if isinstance(failures, int) else None


_SEVERITY_RANK = {name: rank for rank, name in SEVERITY_NAMES.items()}


def _scan_view(target: str, scanned_at: datetime, severity: int, result_json: str) -> JSON:
    """A stored scan (`certmon-scan --json` per-target shape), read defensively: the
    scanner's schema may grow, and a bad row must not break the dashboard."""
    try:
        raw = json.loads(result_json)
    except ValueError:
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    chain = [{"index": c.get("index", i), "sha256": c.get("sha256"),
              "ref": str(c.get("sha256") or "")[:p.CERT_REF_LEN] or None,
              "subject": c.get("subject"), "not_after": c.get("not_after")}
             for i, c in enumerate(raw.get("presented") or []) if isinstance(c, dict)]
    earliest = raw.get("earliest_expiry")
    # The verdict's reasons, worst first: what the dashboard shows next to it.
    findings = sorted(({"code": f.get("code"), "severity": str(f.get("severity")).lower(),
                        "message": f.get("message")}
                       for f in raw.get("findings") or [] if isinstance(f, dict)),
                      key=lambda f: -_SEVERITY_RANK.get(str(f["severity"]), -1))
    return {"target": target, "scanned_at": instant(scanned_at), "findings": findings,
            "severity": SEVERITY_NAMES.get(severity, "unknown"),
            # A probe the broker ended on a verdict the scanner judged OK (refused for
            # want of a client certificate: CLIENT_CERT_REQUIRED) is not a failing scan.
            "success": raw.get("error") is None or severity == 0, "error": raw.get("error"),
            "chain_valid": raw.get("chain_valid"), "chain": chain,
            "earliest_expiry": earliest.get("not_after") if isinstance(earliest, dict) else None}


def build_snapshot(store: Store, now: datetime,
                   requirements: Sequence[RequiredCA]) -> Snapshot:
    """Every fleet-wide fact the views need, from four store queries."""
    required = {r.sha256 for r in requirements}
    briefs: list[DeviceBrief] = []
    brokers: dict[tuple[str, int, tuple[str, ...]], BrokerSeenAgg] = {}
    broker_hosts: list[BrokerHostView] = []
    alerts = store.active_alerts()
    fleet = aggregate.fleet_severities(alerts)
    fleet_rule = {a.device_id: a.rule for a in alerts
                  if a.device_id and a.labels.get("scope") in aggregate.FLEET_SCOPES}
    for row in store.devices(order_by="device_id"):
        briefs.append(_brief(row, fleet.get(row.device_id, 0), fleet_rule.get(row.device_id)))
        if (host := broker_host_of(row.device_id, row.status_json)) is not None:
            broker_hosts.append(host)
        seen = _broker_of(row.status_json)
        if seen is not None:
            chain = [c for c in seen.get("chain") or [] if isinstance(c, dict)]
            key = (str(seen["host"]), int(seen["port"]), tuple(str(c.get("ref")) for c in chain))
            agg = brokers.get(key)
            if agg is None:
                agg = brokers[key] = BrokerSeenAgg(key[0], key[1], chain)
            agg.devices += 1
            if len(agg.sample) < 20:
                agg.sample.append(row.device_id)
    by_id = {b.device_id: b for b in briefs}
    certs: dict[str, CertAgg] = {}
    trust_holders: set[str] = set()
    required_holders: dict[str, set[str]] = {sha: set() for sha in required}
    for h in store.certificates_expiring_before(FAR_FUTURE):
        agg_c = certs.get(h.cert.sha256)
        if agg_c is None:
            agg_c = certs[h.cert.sha256] = CertAgg(h.cert)
        role = str(h.role)
        agg_c.holders[role] += 1
        brief = by_id.get(h.device_id)
        if brief is not None:
            prev = brief.earliest.get(role)
            if prev is None or h.cert.not_after < prev:
                brief.earliest[role] = h.cert.not_after
            if h.role == CertRole.CLIENT:
                brief.subject = h.cert.subject
        if h.role == CertRole.TRUST:
            trust_holders.add(h.device_id)
            if h.cert.sha256 in required:
                required_holders[h.cert.sha256].add(h.device_id)
    scans = [_scan_view(s.target, s.scanned_at, s.severity, s.result_json) for s in store.scans()]
    return Snapshot(now, briefs, by_id, certs, trust_holders, required_holders, brokers,
                    alerts, scans, broker_hosts=broker_hosts)


def _brief(row: DeviceRow, fleet_severity: int = 0, fleet_rule: str | None = None) -> DeviceBrief:
    state = aggregate.device_state(row.severity, row.worst_code, online=row.is_online,
                                   fleet_severity=fleet_severity)
    worst_msg = next((f.message for f in row.findings if f.code == row.worst_code), None)
    # A device at risk only through a fleet rule (e.g. a missing required CA) names it.
    worst = row.worst_code or (fleet_rule if fleet_severity else None)
    if row.status_json is not None:  # one that never reported has nothing to lead with
        worst, worst_msg = aggregate.shown_worst(worst, worst_msg, online=row.is_online,
                                                 offline_since=row.online_changed_at)
    due_at, failures = _renewal_of(row.status_json)
    return DeviceBrief(row.device_id, str(state), row.severity, worst, worst_msg,
                       row.is_online, row.last_received_at, row.clock_offset_lo_s,
                       row.clock_offset_hi_s, tuple((f.code, f.severity) for f in row.findings),
                       renewal_due_at=due_at, renewal_failures=failures)


class SnapshotCache:
    """The current snapshot of one store; thread-safe (waitress serves from several
    threads). `views` are what the background builder precomputes on a fresh snapshot
    (by the key they are memoised under) when the previous one was asked for them."""

    def __init__(self, store: Store, *, now: Callable[[], datetime],
                 requirements: Sequence[RequiredCA], ttl_s: float,
                 monotonic: Callable[[], float], views: Mapping[str, View]) -> None:
        self.store = store
        self.now = now
        self.requirements = tuple(requirements)
        self.ttl_s = ttl_s
        self._monotonic = monotonic
        self._views = dict(views)
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None
        self._snap_mono = 0.0
        self._building = False

    def snapshot(self) -> Snapshot:
        """The current snapshot. Only the very first call waits for a build; a stale one
        is served while one background thread rebuilds it (stale-while-revalidate): at
        100k devices a build takes seconds, and no request should wait for that."""
        with self._lock:
            snap = self._snap
            if snap is None:
                return self._rebuild()
            if self._monotonic() - self._snap_mono >= self.ttl_s and not self._building:
                if self.ttl_s <= 0:
                    return self._rebuild()  # tests and benches: always fresh
                self._building = True
                threading.Thread(target=self._rebuild_in_background, name="certmon-snapshot",
                                 daemon=True).start()
            return snap

    def memo(self, key: str, view: Callable[[Snapshot], T]) -> T:
        """A view computed once per snapshot: snapshots are never mutated, so the same
        snapshot always gives the same answer (summary at 100k devices: ~0.4 s)."""
        s = self.snapshot()
        with s.lock:
            if key not in s.views:
                s.views[key] = view(s)
            return cast(T, s.views[key])

    def _warm(self, snap: Snapshot, keys: Iterable[str]) -> None:
        for key in keys:
            view = self._views.get(key)
            if view is not None:
                snap.views[key] = view(snap)

    def _build(self) -> tuple[Snapshot, float]:
        mono = self._monotonic()
        snap = build_snapshot(self.store, self.now(), self.requirements)
        snap.build_s = round(self._monotonic() - mono, 4)
        return snap, mono

    def _rebuild(self) -> Snapshot:
        self._snap, self._snap_mono = self._build()
        return self._snap

    def _rebuild_in_background(self) -> None:
        try:
            snap, mono = self._build()
            # Whatever was asked of the previous snapshot is ready before the swap.
            previous = self._snap.views.keys() if self._snap is not None else ()
            self._warm(snap, list(previous) or ["summary", "timeline:26"])
            with self._lock:
                self._snap, self._snap_mono = snap, mono
        except StoreError as exc:  # an outage: one line per TTL, not a traceback
            log.warning("fleet snapshot not rebuilt (%s); serving the previous one",
                        " ".join(str(exc).split()))
            with self._lock:  # the next try after another TTL, not on the next request
                self._snap_mono = self._monotonic()
        except Exception:
            log.exception("fleet snapshot failed; serving the previous one")
        finally:
            with self._lock:
                self._building = False
