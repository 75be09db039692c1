"""The collector's state: the `Store` seam, its records, and `open_store(url)`.

Owns the contract every backend honours (docs/store.md): the `Store` Protocol, the
frozen records that cross it, the backend registry and the pure parts both backends
share (ordering of statuses, the per-batch change plan, row decoding). One module per
backend (`sqlite`, `postgres`) owns its SQL, its connection and its dialect.

It must not read the clock (every instant is passed in, tz-aware UTC), verify
messages, judge certificates or evaluate alert rules: callers decide, the store
records and makes each "exactly once" transition atomic in the database.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from certmon.errors import CertmonError
from certmon.pki import CertFacts, Severity

__all__ = [
    "AlertRow", "CertHolding", "CertLink", "CertRole", "CertRow", "DeviceOrder", "DeviceRow",
    "FindingRecord", "HistoryRow", "InventoryRecord", "RejectSample", "ScanRecord",
    "StatusRecord", "Store", "StoreError", "open_store",
]


class StoreError(CertmonError):
    """The database failed or refused (sqlite3 / psycopg errors, translated here)."""


class CertRole(enum.StrEnum):
    CLIENT = "client"
    CHAIN = "chain"  # the client certificate's chain as the device holds it
    TRUST = "trust"  # a CA in the device's trust store
    BROKER = "broker"  # the broker chain as the device saw it
    SIGNING = "signing"  # a dedicated status-signing certificate


DeviceOrder = Literal["severity", "device_id", "last_received_at"]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class CertRow:
    """A certificate's facts. Only sha256, subject and the validity are required: a
    trust-store inventory names CAs by those alone; fuller facts fill the gaps later."""

    sha256: str
    subject: str
    not_before: datetime
    not_after: datetime
    issuer: str | None = None
    serial_hex: str | None = None
    key_type: str | None = None
    key_bits: int | None = None
    signature_algorithm: str | None = None
    is_ca: bool | None = None
    is_self_issued: bool | None = None
    der: bytes | None = None

    @classmethod
    def from_facts(cls, facts: CertFacts, der: bytes | None = None) -> CertRow:
        return cls(sha256=facts.sha256, subject=facts.subject, not_before=facts.not_before,
                   not_after=facts.not_after, issuer=facts.issuer, serial_hex=facts.serial_hex,
                   key_type=facts.key_type, key_bits=facts.key_bits,
                   signature_algorithm=facts.signature_algorithm, is_ca=facts.is_ca,
                   is_self_issued=facts.is_self_issued, der=der)


@dataclass(frozen=True, slots=True)
class CertLink:
    cert: CertRow
    role: CertRole


@dataclass(frozen=True, slots=True)
class FindingRecord:
    code: str
    severity: int
    cert_sha256: str | None  # as reported: may be the 16-digit cert_ref
    message: str


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """One verified status. `certs` replaces the device's set for every role it
    mentions (and for `replace_roles`, which may clear a role); other roles stay."""

    device_id: str
    boot_id: str
    seq: int
    device_ts: datetime
    received_at: datetime
    interval_s: int
    status_json: str
    severity: int
    worst_code: str | None = None
    findings: tuple[FindingRecord, ...] = ()
    client_sha256: str | None = None
    trust_digest: str | None = None
    certs: tuple[CertLink, ...] = ()
    replace_roles: frozenset[CertRole] = frozenset()
    clock_offset_lo_s: float | None = None  # None: no sample in this message
    clock_offset_hi_s: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device_id: str
    first_seen_at: datetime
    last_received_at: datetime | None
    last_status_ts: datetime | None
    boot_id: str | None
    seq: int | None
    interval_s: int | None
    is_online: bool
    online_changed_at: datetime | None
    severity: int  # UNKNOWN (3) until the first status
    worst_code: str | None
    findings: tuple[FindingRecord, ...]
    status_json: str | None
    client_sha256: str | None
    trust_digest: str | None
    clock_offset_lo_s: float | None
    clock_offset_hi_s: float | None
    clock_offset_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class CertHolding:
    cert: CertRow
    device_id: str
    role: CertRole


@dataclass(frozen=True, slots=True)
class HistoryRow:
    id: int
    device_id: str
    at: datetime
    kind: str  # first_status, status_change, cert_change, trust_change, online_change
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AlertRow:
    alert_key: str
    rule: str
    device_id: str | None
    cert_sha256: str | None
    severity: int
    state: Literal["firing", "resolved"]
    summary: str
    labels: dict[str, str]
    started_at: datetime
    resolved_at: datetime | None
    last_notified_at: datetime | None
    notify_count: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class RejectSample:
    id: int
    at: datetime
    reason: str
    topic: str
    detail: str
    sample: bytes


@dataclass(frozen=True, slots=True)
class InventoryRecord:
    """A device's whole trust store; `cas` replaces its `trust` certificate links."""

    device_id: str
    digest: str
    cas_json: str
    updated_at: datetime
    cas: tuple[CertRow, ...] = ()


@dataclass(frozen=True, slots=True)
class ScanRecord:
    target: str
    scanned_at: datetime
    severity: int
    result_json: str


# --------------------------------------------------------------------------- the seam


class Store(Protocol):
    """Both backends implement exactly this; tests/test_store_contract.py is the judge."""

    def migrate(self) -> None: ...
    def close(self) -> None: ...

    # ingest (writes). Each call is one transaction.
    def record_statuses(self, batch: Sequence[StatusRecord]) -> list[bool]: ...
    def set_online(self, device_id: str, online: bool, at: datetime) -> bool: ...
    def mark_silent(self, now: datetime, factor: float = 3.0) -> list[str]: ...
    def put_inventory(self, inventory: InventoryRecord) -> None: ...
    def prune_seen(self, before: datetime) -> int: ...
    def count_rejection(self, reason: str, *, at: datetime, topic: str, detail: str,
                        sample: bytes) -> None: ...
    def put_scan(self, scan: ScanRecord) -> None: ...
    def try_claim(self, job: str, now: datetime, every_s: float) -> bool: ...

    # alerts: True exactly when this caller must notify
    def alert_fire(self, key: str, *, rule: str, device_id: str | None,
                   cert_sha256: str | None, severity: int, summary: str,
                   labels: Mapping[str, str], now: datetime,
                   renotify_interval_s: float | None) -> bool: ...
    def alert_resolve(self, key: str, now: datetime) -> bool: ...
    def active_alerts(self) -> list[AlertRow]: ...
    def alert_history(self, device_id: str | None = None, limit: int = 100) -> list[AlertRow]: ...

    # queries
    def device(self, device_id: str) -> DeviceRow | None: ...
    def devices(self, limit: int | None = None, offset: int = 0,
                order_by: DeviceOrder = "severity") -> list[DeviceRow]: ...
    def device_certs(self, device_id: str) -> list[CertLink]: ...
    def certificate(self, sha256: str) -> CertRow | None: ...
    def certificates_expiring_before(self, t: datetime,
                                     role: CertRole | None = None) -> list[CertHolding]: ...
    def holders(self, sha256: str) -> list[tuple[str, CertRole]]: ...
    def devices_holding_count(self, sha256: str, role: CertRole | None = None) -> int: ...
    def fleet_counts(self) -> dict[str, int]: ...
    def history(self, device_id: str | None = None, limit: int = 100) -> list[HistoryRow]: ...
    def inventory(self, device_id: str) -> InventoryRecord | None: ...
    def devices_with_inventory(self) -> set[str]: ...
    def scans(self) -> list[ScanRecord]: ...
    def seen_count(self, device_id: str) -> int: ...
    def seen_seqs(self, device_id: str) -> list[tuple[str, int]]: ...
    def rejection_counts(self) -> dict[str, int]: ...
    def rejection_samples(self, reason: str | None = None,
                          limit: int = 50) -> list[RejectSample]: ...
    def integrity_check(self) -> bool: ...


def _open_sqlite(url: str, reject_sample_limit: int) -> Store:
    from collector.store.sqlite import SqliteStore

    return SqliteStore.from_url(url, reject_sample_limit=reject_sample_limit)


def _open_postgres(url: str, reject_sample_limit: int) -> Store:
    # Imported on use: psycopg is in the `collector` extra, needed only for this URL.
    from collector.store.postgres import PostgresStore

    return PostgresStore.from_url(url, reject_sample_limit=reject_sample_limit)


BACKENDS: dict[str, Callable[[str, int], Store]] = {
    "sqlite": _open_sqlite,
    "postgresql": _open_postgres,
}


def open_store(url: str, *, reject_sample_limit: int = 20) -> Store:
    """Connect (not migrate) by URL scheme: sqlite:///ABS/PATH.db, sqlite://rel.db,
    postgresql://user@host:port/db?options=-csearch_path%3Dschema."""
    scheme = url.partition(":")[0]
    if scheme == "postgres":  # libpq accepts both spellings
        scheme = "postgresql"
    try:
        factory = BACKENDS[scheme]
    except KeyError:
        raise StoreError(f"unsupported store URL scheme {scheme!r} "
                         f"(use {', '.join(s + '://' for s in BACKENDS)})") from None
    return factory(url, reject_sample_limit)


# --------------------------------------------------------------------------- shared, pure


def utc(when: datetime) -> datetime:
    """Refuse naive datetimes: a naive instant is a bug upstream, not a local time."""
    if when.utcoffset() is None:
        raise ValueError(f"naive datetime {when!r}: the store takes tz-aware UTC instants")
    return when.astimezone(UTC)


def clean_text(text: str) -> str:
    """Free text from the wire (rejection details, topics) as storable text: PostgreSQL
    refuses NUL and both refuse lone surrogates, and a rejection must still be counted."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def findings_to_json(findings: Sequence[FindingRecord]) -> str:
    return json.dumps([[f.code, f.severity, f.cert_sha256, f.message] for f in findings],
                      separators=(",", ":"), ensure_ascii=False)


def findings_from_json(text: str | None) -> tuple[FindingRecord, ...]:
    return tuple(FindingRecord(c, s, h, m) for c, s, h, m in json.loads(text or "[]"))


def _codes(findings: Sequence[FindingRecord]) -> list[str]:
    return sorted({f.code for f in findings})


SEVERITY_NAMES = {int(s): s.name.lower() for s in Severity}


@dataclass(slots=True)
class DeviceState:
    """What the batch planner needs of a device row, read under the device's lock."""

    device_id: str
    has_status: bool
    boot_id: str | None
    boot_first_seen_at: datetime | None
    seq: int | None
    severity: int
    codes: list[str]
    client_sha256: str | None
    trust_digest: str | None
    is_online: bool
    online_changed_at: datetime | None
    last_received_at: datetime | None


@dataclass(slots=True)
class BatchPlan:
    """Every write a batch implies, as plain values; the backend turns it into SQL,
    sorted by key so that concurrent PostgreSQL writers lock rows in one order."""

    applied: dict[str, StatusRecord] = field(default_factory=dict)  # device → newest applied
    touched: dict[str, datetime] = field(default_factory=dict)  # device → last_received_at
    online_at: dict[str, datetime] = field(default_factory=dict)  # device → came back online
    history: list[tuple[str, datetime, str, str]] = field(default_factory=list)
    certs: dict[str, tuple[CertRow, datetime]] = field(default_factory=dict)
    # (device_id, sha256, role) → seen at; deletes run before upserts.
    link_upserts: dict[tuple[str, str, str], datetime] = field(default_factory=dict)
    link_deletes: set[tuple[str, str, str]] = field(default_factory=set)


def detail_json(**kw: Any) -> str:
    return json.dumps(kw, separators=(",", ":"), sort_keys=True)


def plan_batch(new: Sequence[StatusRecord], states: Mapping[str, DeviceState],
               boots: Mapping[tuple[str, str], datetime],
               links: dict[str, set[tuple[str, str]]]) -> BatchPlan:
    """Decide, for the new (non-replayed) records of a batch, what changes.

    "Newer" orders by (first-seen-at of the boot, boot_id, seq): boot ids are random,
    so the collector's own first sighting of a boot is the only order between boots.
    A reordered older status still counts as received but changes nothing else.
    `links[device]` is the device's current {(role, sha256)}.
    """
    plan = BatchPlan()

    def order(r: StatusRecord) -> tuple[datetime, str, int]:
        return (boots[(r.device_id, r.boot_id)], r.boot_id, r.seq)

    for rec in sorted(new, key=lambda r: (r.device_id, order(r))):
        st = states[rec.device_id]
        dev = rec.device_id
        if st.last_received_at is None or rec.received_at > st.last_received_at:
            st.last_received_at = rec.received_at
        plan.touched[dev] = st.last_received_at
        if st.has_status and st.boot_id is not None and st.seq is not None:
            current = (st.boot_first_seen_at or rec.received_at, st.boot_id, st.seq)
            if order(rec) <= current:
                continue  # older than what the device row shows: seen, not applied
        codes = _codes(rec.findings)
        at = rec.received_at
        if not st.has_status:
            plan.history.append((dev, at, "first_status", detail_json(
                severity=rec.severity, codes=codes, client_sha256=rec.client_sha256,
                trust_digest=rec.trust_digest)))
        else:
            if rec.severity != st.severity or codes != st.codes:
                plan.history.append((dev, at, "status_change", detail_json(
                    severity=[st.severity, rec.severity], codes=[st.codes, codes])))
            if rec.client_sha256 != st.client_sha256:
                plan.history.append((dev, at, "cert_change", detail_json(
                    client_sha256=[st.client_sha256, rec.client_sha256])))
            if rec.trust_digest != st.trust_digest:
                plan.history.append((dev, at, "trust_change", detail_json(
                    trust_digest=[st.trust_digest, rec.trust_digest])))
        if not st.is_online and (st.online_changed_at is None or at >= st.online_changed_at):
            # A fresh status proves the device is up again (after silence or an LWT
            # that this status postdates). A first status says so itself.
            if st.has_status:
                plan.history.append((dev, at, "online_change",
                                     detail_json(online=True, cause="status")))
            plan.online_at[dev] = at
            st.is_online, st.online_changed_at = True, at
        st.has_status, st.boot_id, st.seq = True, rec.boot_id, rec.seq
        st.boot_first_seen_at = boots[(dev, rec.boot_id)]
        st.severity, st.codes = rec.severity, codes
        st.client_sha256, st.trust_digest = rec.client_sha256, rec.trust_digest
        plan.applied[dev] = rec
        _plan_links(plan, rec.device_id, rec.certs, rec.replace_roles, at,
                    links.setdefault(dev, set()))
    return plan


def _plan_links(plan: BatchPlan, device_id: str, certs: Sequence[CertLink],
                replace_roles: frozenset[CertRole], at: datetime,
                current: set[tuple[str, str]]) -> None:
    """Replace the device's set for each role mentioned; `current` is updated in place."""
    roles = {str(link.role) for link in certs} | {str(r) for r in replace_roles}
    wanted = {(str(link.role), link.cert.sha256) for link in certs}
    for role, sha in sorted(current):
        if role in roles and (role, sha) not in wanted:
            plan.link_deletes.add((device_id, sha, role))
            plan.link_upserts.pop((device_id, sha, role), None)
            current.discard((role, sha))
    for link in certs:
        sha, role = link.cert.sha256, str(link.role)
        prev = plan.certs.get(sha)
        if prev is None or at > prev[1]:
            # Keep whichever copy carries the DER; facts of one sha256 never differ.
            plan.certs[sha] = (link.cert if prev is None or link.cert.der else prev[0], at)
        plan.link_upserts[(device_id, sha, role)] = at
        plan.link_deletes.discard((device_id, sha, role))
        current.add((role, sha))


def new_in_batch(batch: Sequence[StatusRecord],
                 is_new: Callable[[StatusRecord], bool]) -> list[bool]:
    """Per record, whether it is new: the first of duplicates within the batch is judged
    by `is_new` (the database's insert-if-absent), later copies are replays."""
    seen: set[tuple[str, str, int]] = set()
    out = []
    for rec in batch:
        key = (rec.device_id, rec.boot_id, rec.seq)
        out.append(key not in seen and is_new(rec))
        seen.add(key)
    return out


def alert_row(values: Sequence[Any], ts: Callable[[Any], datetime]) -> AlertRow:
    """ALERT_COLUMNS in order → AlertRow; `ts` decodes the backend's instants."""
    (key, rule, dev, sha, sev, state, summary, labels, started, resolved, notified,
     count, updated) = values
    return AlertRow(key, rule, dev, sha, int(sev), state, summary, json.loads(labels), ts(started),
                    None if resolved is None else ts(resolved),
                    None if notified is None else ts(notified), int(count), ts(updated))


ALERT_COLUMNS = ("alert_key, rule, device_id, cert_sha256, severity, state, summary, labels_json, "
                 "started_at, resolved_at, last_notified_at, notify_count, updated_at")

DEVICE_COLUMNS = (
    "device_id, first_seen_at, last_received_at, last_status_ts, boot_id, seq, interval_s, "
    "online, online_changed_at, severity, worst_code, findings_json, status_json, "
    "client_sha256, trust_digest, clock_offset_lo_s, clock_offset_hi_s, clock_offset_at, "
    "updated_at")


def device_row(v: Sequence[Any], ts: Callable[[Any], datetime]) -> DeviceRow:
    def opt(x: Any) -> datetime | None:
        return None if x is None else ts(x)

    return DeviceRow(
        device_id=v[0], first_seen_at=ts(v[1]), last_received_at=opt(v[2]),
        last_status_ts=opt(v[3]), boot_id=v[4], seq=v[5], interval_s=v[6],
        is_online=bool(v[7]), online_changed_at=opt(v[8]), severity=int(v[9]),
        worst_code=v[10], findings=findings_from_json(v[11]), status_json=v[12],
        client_sha256=v[13], trust_digest=v[14], clock_offset_lo_s=v[15],
        clock_offset_hi_s=v[16], clock_offset_at=opt(v[17]), updated_at=ts(v[18]))


CERT_COLUMNS = ("sha256, subject, not_before, not_after, issuer, serial_hex, key_type, key_bits, "
                "signature_algorithm, is_ca, is_self_issued")


def cert_row(v: Sequence[Any], ts: Callable[[Any], datetime], der: bytes | None = None) -> CertRow:
    def opt_bool(x: Any) -> bool | None:
        return None if x is None else bool(x)

    return CertRow(sha256=v[0], subject=v[1], not_before=ts(v[2]), not_after=ts(v[3]),
                   issuer=v[4], serial_hex=v[5], key_type=v[6], key_bits=v[7],
                   signature_algorithm=v[8], is_ca=opt_bool(v[9]),
                   is_self_issued=opt_bool(v[10]), der=der)


def migrations(dialect: str) -> list[tuple[int, str]]:
    """(version, SQL) of migrations/<dialect>/NNNN_name.sql, in version order."""
    from importlib.resources import files

    folder = files("collector.store").joinpath("migrations", dialect)
    out = [(int(entry.name.partition("_")[0]), entry.read_text("utf-8"))
           for entry in folder.iterdir() if entry.name.endswith(".sql")]
    return sorted(out)


def fleet_counts_from(rows: Sequence[tuple[Any, Any, Any]]) -> dict[str, int]:
    """(severity, online, count) groups → {"total", "online", "offline", "ok", …}."""
    out = dict.fromkeys(("total", "online", "offline", *SEVERITY_NAMES.values()), 0)
    for severity, online, n in rows:
        out["total"] += n
        out["online" if online else "offline"] += n
        out[SEVERITY_NAMES[int(severity)]] += n
    return out
