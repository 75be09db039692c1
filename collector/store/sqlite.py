"""The SQLite backend (stdlib sqlite3): the default store of a single collector.

Owns the SQLite dialect of the contract in `collector.store`: the connection (WAL,
synchronous=NORMAL, busy_timeout, foreign keys), the instant encoding (fixed-width
ISO-8601 text with 'Z'), and every statement. One connection is shared by the ingest
worker and the web thread behind a lock; writes run in BEGIN IMMEDIATE transactions so
that a second process on the same file waits instead of failing halfway.
It must not decide what changed (that is `plan_batch`) or read the clock.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from collector.store import (
    ALERT_COLUMNS,
    CERT_COLUMNS,
    DEVICE_COLUMNS,
    AlertRow,
    BatchPlan,
    CertHolding,
    CertLink,
    CertRole,
    CertRow,
    DeviceOrder,
    DeviceRow,
    DeviceState,
    HistoryRow,
    InventoryRecord,
    RejectSample,
    ScanRecord,
    StatusRecord,
    StoreError,
    _plan_links,
    alert_row,
    cert_row,
    clean_text,
    detail_json,
    device_row,
    findings_from_json,
    findings_to_json,
    fleet_counts_from,
    migrations,
    new_in_batch,
    plan_batch,
    utc,
)

# SQL below is assembled only from this module's constants (column lists, _ORDER),
# never from arguments: hence the `noqa: S608` on those lines.
_NEVER = datetime.min.replace(tzinfo=UTC)
_ORDER: dict[str, str] = {  # a literal map: order_by never reaches SQL as text
    "severity": "severity DESC, device_id",
    "device_id": "device_id",
    "last_received_at": "last_received_at DESC NULLS LAST, device_id",
}


def ts(when: datetime) -> str:
    """'2026-01-02T03:04:05.000000Z': fixed width, so text order is time order."""
    # isoformat is C; years < 1000 are still zero-padded to four digits by it.
    return utc(when).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_T = TypeVar("_T")


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def dt(text: str) -> datetime:
    return datetime.fromisoformat(text)  # 3.11 reads the 'Z' as UTC


def _opt(when: datetime | None) -> str | None:
    return None if when is None else ts(when)


def path_from_url(url: str) -> str:
    """sqlite:///abs/path.db → /abs/path.db; sqlite://rel.db → rel.db (relative to cwd).
    The three-slash form is always absolute, as in the collector's config docs."""
    if not url.startswith("sqlite://") or "?" in url:
        raise StoreError(f"not a SQLite URL (sqlite:///ABS/PATH.db): {url!r}")
    path = url[len("sqlite://"):]
    if not path or path.endswith("/"):
        raise StoreError(f"SQLite URL without a file name: {url!r}")
    return path


def _statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT first; migrations must run inside our transaction.
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""
    if any(ln.strip() and not ln.strip().startswith("--") for ln in buf.splitlines()):
        raise StoreError(f"incomplete SQL statement at the end of a migration: {buf[:80]!r}")


@contextlib.contextmanager
def _transaction(c: sqlite3.Connection, lock: threading.Lock,
                 begin: str) -> Iterator[sqlite3.Connection]:
    with lock:
        try:
            c.execute(begin)
            yield c
            c.execute("COMMIT")
        except sqlite3.Error as exc:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise StoreError(f"sqlite: {exc}") from exc
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise


class SqliteStore:
    """`Store` on one SQLite file. Construct with `from_url` or `open_store`."""

    def __init__(self, path: str, *, reject_sample_limit: int = 20,
                 busy_timeout_s: float = 30.0) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._sample_limit = reject_sample_limit
        self._lock = threading.Lock()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (BEGIN IMMEDIATE).
            self._conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # NORMAL in WAL mode: a power cut may lose the last commits, never corrupt.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {path}: {exc}") from exc
        if path != ":memory:" and mode != "wal":
            self._conn.close()
            raise StoreError(f"{path}: cannot switch to WAL (journal_mode is {mode})")
        # Reads get their own connection: in WAL mode readers do not block the writer,
        # so a dashboard snapshot of a 100,000-device fleet (seconds of SQL) does not
        # stall ingest. An in-memory database is one connection's, so it shares.
        self._read_lock = threading.Lock()
        self._reader = self._conn
        if path != ":memory:":
            try:
                self._reader = sqlite3.connect(path, timeout=busy_timeout_s,
                                               isolation_level=None, check_same_thread=False)
                self._reader.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            except sqlite3.Error as exc:
                self._conn.close()
                raise StoreError(f"cannot open SQLite database {path}: {exc}") from exc
        else:
            self._read_lock = self._lock

    @classmethod
    def from_url(cls, url: str, *, reject_sample_limit: int = 20) -> SqliteStore:
        return cls(path_from_url(url), reject_sample_limit=reject_sample_limit)

    def close(self) -> None:
        with self._lock:
            if self._reader is not self._conn:
                self._reader.close()
            self._conn.close()

    def _tx(self, begin: str = "BEGIN IMMEDIATE") -> contextlib.AbstractContextManager[
            sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front: a deferred
        transaction that upgrades later can fail with SQLITE_BUSY at once."""
        return _transaction(self._conn, self._lock, begin)

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One snapshot for multi-statement reads, on the read connection."""
        return _transaction(self._reader, self._read_lock, "BEGIN")

    def migrate(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                      " applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)")
            done = {v for (v,) in c.execute("SELECT version FROM schema_migrations")}
            known = migrations("sqlite")
            if done and max(done) > known[-1][0]:
                raise StoreError(f"database schema {max(done)} is newer than this certmon "
                                 f"({known[-1][0]}); upgrade certmon")
            for version, script in known:
                if version not in done:
                    for stmt in _statements(script):
                        c.execute(stmt)
                    c.execute("INSERT INTO schema_migrations (version) VALUES (?)", (version,))

    # ------------------------------------------------------------------ ingest

    def record_statuses(self, batch: Sequence[StatusRecord]) -> list[bool]:
        if not batch:
            return []
        with self._tx() as c:
            first: dict[str, datetime] = {}
            for r in batch:
                first[r.device_id] = min(first.get(r.device_id, r.received_at), r.received_at)
            # Device rows first: status_seen and device_boots reference them.
            c.executemany("INSERT INTO devices (device_id, first_seen_at, updated_at) "
                          "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                          [(d, ts(t), ts(t)) for d, t in first.items()])
            # The replay check, batched: BEGIN IMMEDIATE holds SQLite's write lock, so
            # "select what exists, insert the rest" is as atomic as insert-if-absent
            # per row, at a fraction of the statements (the ingest hot path).
            keys = list({(r.device_id, r.boot_id, r.seq) for r in batch})
            seen: set[tuple[str, str, int]] = set()
            for chunk in _chunks(keys, 300):
                rows = c.execute(
                    "SELECT device_id, boot_id, seq FROM status_seen WHERE (device_id, boot_id,"  # noqa: S608 - placeholders only
                    " seq) IN (VALUES " + ",".join(["(?, ?, ?)"] * len(chunk)) + ")",
                    [v for key in chunk for v in key]).fetchall()
                seen.update((d, b, int(q)) for d, b, q in rows)
            flags = new_in_batch(batch, lambda r: (r.device_id, r.boot_id, r.seq) not in seen)
            new = [r for r, is_fresh in zip(batch, flags, strict=True) if is_fresh]
            c.executemany(
                "INSERT INTO status_seen (device_id, boot_id, seq, received_at, device_ts)"
                " VALUES (?, ?, ?, ?, ?)",
                [(r.device_id, r.boot_id, r.seq, ts(r.received_at), ts(r.device_ts))
                 for r in new])
            if new:
                self._apply(c, new)
        return flags

    def _apply(self, c: sqlite3.Connection, new: list[StatusRecord]) -> None:
        boot_min: dict[tuple[str, str], datetime] = {}
        for r in new:
            key = (r.device_id, r.boot_id)
            boot_min[key] = min(boot_min.get(key, r.received_at), r.received_at)
        c.executemany(
            "INSERT INTO device_boots (device_id, boot_id, first_seen_at) VALUES (?, ?, ?) "
            "ON CONFLICT DO UPDATE SET first_seen_at = min(first_seen_at, "
            "excluded.first_seen_at)", [(d, b, ts(at)) for (d, b), at in boot_min.items()])
        boots: dict[tuple[str, str], datetime] = {}
        for chunk in _chunks(list(boot_min), 400):
            for d, b, first_seen in c.execute(
                    "SELECT device_id, boot_id, first_seen_at FROM device_boots WHERE"  # noqa: S608
                    " (device_id, boot_id) IN (VALUES "
                    + ",".join(["(?, ?)"] * len(chunk)) + ")",
                    [v for key in chunk for v in key]):
                boots[(d, b)] = dt(first_seen)
        states: dict[str, DeviceState] = {}
        links: dict[str, set[tuple[str, str]]] = {}
        with_certs = {r.device_id for r in new if r.certs or r.replace_roles}
        for ids in _chunks(sorted({r.device_id for r in new}), 500):
            for row in c.execute(
                    "SELECT d.device_id, d.status_json IS NOT NULL, d.boot_id, b.first_seen_at,"  # noqa: S608
                    " d.seq, d.severity, d.findings_json, d.client_sha256, d.trust_digest,"
                    " d.online, d.online_changed_at, d.last_received_at FROM devices d"
                    " LEFT JOIN device_boots b ON b.device_id = d.device_id AND"
                    " b.boot_id = d.boot_id WHERE d.device_id IN ("
                    + ",".join("?" * len(ids)) + ")", ids):
                dev = row[0]
                states[dev] = DeviceState(
                    dev, bool(row[1]), row[2], None if row[3] is None else dt(row[3]), row[4],
                    row[5], sorted({f.code for f in findings_from_json(row[6])}), row[7],
                    row[8], bool(row[9]), None if row[10] is None else dt(row[10]),
                    None if row[11] is None else dt(row[11]))
        for dev in with_certs:
            # Only a record that carries certificates changes links: most statuses
            # don't (the ingest sends them when the client certificate changes).
            links[dev] = set(c.execute(
                "SELECT role, sha256 FROM device_certs WHERE device_id = ?", (dev,)).fetchall())
        plan = plan_batch(new, states, boots, links)
        self._write_links(c, plan)
        c.executemany(
            "UPDATE devices SET last_status_ts = ?, boot_id = ?, seq = ?, interval_s = ?,"
            " severity = ?, worst_code = ?, findings_json = ?, status_json = ?,"
            " client_sha256 = ?, trust_digest = ?,"
            " clock_offset_lo_s = coalesce(?, clock_offset_lo_s),"
            " clock_offset_hi_s = coalesce(?, clock_offset_hi_s),"
            " clock_offset_at = coalesce(?, clock_offset_at) WHERE device_id = ?",
            [(ts(r.device_ts), r.boot_id, r.seq, r.interval_s, int(r.severity), r.worst_code,
              findings_to_json(r.findings), r.status_json, r.client_sha256, r.trust_digest,
              r.clock_offset_lo_s, r.clock_offset_hi_s,
              None if r.clock_offset_lo_s is None and r.clock_offset_hi_s is None
              else ts(r.received_at), dev) for dev, r in plan.applied.items()])
        c.executemany("UPDATE devices SET last_received_at = ?, updated_at = ? WHERE device_id = ?",
                      [(ts(at), ts(at), dev) for dev, at in plan.touched.items()])
        c.executemany("UPDATE devices SET online = 1, online_changed_at = ? WHERE device_id = ?",
                      [(ts(at), dev) for dev, at in plan.online_at.items()])
        c.executemany("INSERT INTO history (device_id, at, kind, detail_json) VALUES (?, ?, ?, ?)",
                      [(dev, ts(at), kind, detail) for dev, at, kind, detail in plan.history])

    def _write_links(self, c: sqlite3.Connection, plan: BatchPlan) -> None:
        c.executemany(
            "INSERT INTO certificates (sha256, subject, issuer, serial_hex, not_before, not_after,"
            " key_type, key_bits, signature_algorithm, is_ca, is_self_issued, first_seen_at,"
            " last_seen_at, der) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (sha256) DO UPDATE SET"
            # Facts of one sha256 never change; fill what an inventory-only row lacked.
            " issuer = coalesce(certificates.issuer, excluded.issuer),"
            " serial_hex = coalesce(certificates.serial_hex, excluded.serial_hex),"
            " key_type = coalesce(certificates.key_type, excluded.key_type),"
            " key_bits = coalesce(certificates.key_bits, excluded.key_bits),"
            " signature_algorithm = coalesce(certificates.signature_algorithm,"
            " excluded.signature_algorithm),"
            " is_ca = coalesce(certificates.is_ca, excluded.is_ca),"
            " is_self_issued = coalesce(certificates.is_self_issued, excluded.is_self_issued),"
            " der = coalesce(certificates.der, excluded.der),"
            " last_seen_at = max(certificates.last_seen_at, excluded.last_seen_at)",
            [(k.sha256, k.subject, k.issuer, k.serial_hex, ts(k.not_before), ts(k.not_after),
              k.key_type, k.key_bits, k.signature_algorithm, k.is_ca, k.is_self_issued,
              ts(at), ts(at), k.der) for k, at in plan.certs.values()])
        c.executemany("DELETE FROM device_certs WHERE device_id = ? AND sha256 = ? AND role = ?",
                      sorted(plan.link_deletes))
        c.executemany(
            "INSERT INTO device_certs (device_id, sha256, role, since_at, last_seen_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
            " last_seen_at = max(device_certs.last_seen_at, excluded.last_seen_at)",
            [(*key, ts(at), ts(at)) for key, at in sorted(plan.link_upserts.items())])

    def set_online(self, device_id: str, online: bool, at: datetime) -> bool:
        with self._tx() as c:
            c.execute("INSERT INTO devices (device_id, first_seen_at, updated_at) VALUES (?, ?, ?)"
                      " ON CONFLICT DO NOTHING", (device_id, ts(at), ts(at)))
            # A stale message (older than the last change) must not flip the state back.
            changed = c.execute(
                "UPDATE devices SET online = ?, online_changed_at = ?, updated_at = ?"
                " WHERE device_id = ? AND online <> ?"
                " AND (online_changed_at IS NULL OR online_changed_at <= ?)",
                (int(online), ts(at), ts(at), device_id, int(online), ts(at))).rowcount == 1
            if changed:
                c.execute("INSERT INTO history (device_id, at, kind, detail_json)"
                          " VALUES (?, ?, 'online_change', ?)",
                          (device_id, ts(at), detail_json(online=online, cause="message")))
        return changed

    def mark_silent(self, now: datetime, factor: float = 3.0) -> list[str]:
        with self._tx() as c:
            ids = sorted(dev for (dev,) in c.execute(
                "UPDATE devices SET online = 0, online_changed_at = ?1, updated_at = ?1"
                " WHERE online = 1 AND interval_s IS NOT NULL AND last_received_at IS NOT NULL"
                " AND (julianday(?1) - julianday(last_received_at)) * 86400.0 > ?2 * interval_s"
                " RETURNING device_id", (ts(now), factor)).fetchall())
            c.executemany("INSERT INTO history (device_id, at, kind, detail_json)"
                          " VALUES (?, ?, 'online_change', ?)",
                          [(dev, ts(now), detail_json(online=False, cause="silence"))
                           for dev in ids])
        return ids

    def put_inventory(self, inventory: InventoryRecord) -> None:
        inv, at = inventory, ts(inventory.updated_at)
        with self._tx() as c:
            c.execute("INSERT INTO devices (device_id, first_seen_at, updated_at) VALUES (?, ?, ?)"
                      " ON CONFLICT DO NOTHING", (inv.device_id, at, at))
            stored = c.execute(
                "INSERT INTO inventories (device_id, digest, cas_json, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET digest = excluded.digest,"
                " cas_json = excluded.cas_json, updated_at = excluded.updated_at"
                " WHERE excluded.updated_at >= inventories.updated_at",
                (inv.device_id, inv.digest, inv.cas_json, at)).rowcount == 1
            if stored:  # a reordered older inventory must not replace the trust links
                plan = BatchPlan()
                current = set(c.execute("SELECT role, sha256 FROM device_certs WHERE"
                                        " device_id = ?", (inv.device_id,)).fetchall())
                _plan_links(plan, inv.device_id, [CertLink(k, CertRole.TRUST) for k in inv.cas],
                            frozenset({CertRole.TRUST}), inv.updated_at, current)
                self._write_links(c, plan)

    def prune_seen(self, before: datetime) -> int:
        with self._tx() as c:
            return c.execute("DELETE FROM status_seen WHERE received_at < ?",
                             (ts(before),)).rowcount

    def count_rejection(self, reason: str, *, at: datetime, topic: str, detail: str,
                        sample: bytes) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO rejections (reason, count, last_at) VALUES (?, 1, ?)"
                      " ON CONFLICT DO UPDATE SET count = rejections.count + 1,"
                      " last_at = max(rejections.last_at, excluded.last_at)",
                      (clean_text(reason), ts(at)))
            c.execute("INSERT INTO reject_samples (at, reason, topic, detail, sample)"
                      " VALUES (?, ?, ?, ?, ?)",
                      (ts(at), clean_text(reason), clean_text(topic)[:512],
                       clean_text(detail)[:2048], bytes(sample[:512])))
            # Keep the newest K per reason: a flood of one kind must not grow the table.
            c.execute("DELETE FROM reject_samples WHERE reason = ?1 AND id <= (SELECT id FROM"
                      " reject_samples WHERE reason = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                      (clean_text(reason), self._sample_limit))

    def put_scan(self, scan: ScanRecord) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO scans (target, scanned_at, severity, result_json)"
                      " VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
                      " scanned_at = excluded.scanned_at, severity = excluded.severity,"
                      " result_json = excluded.result_json",
                      (scan.target, ts(scan.scanned_at), int(scan.severity), scan.result_json))

    def try_claim(self, job: str, now: datetime, every_s: float) -> bool:
        with self._tx() as c:
            return c.execute(
                "INSERT INTO job_claims (job, claimed_at) VALUES (?, ?) ON CONFLICT DO UPDATE"
                " SET claimed_at = excluded.claimed_at WHERE job_claims.claimed_at <= ?"
                " RETURNING job", (job, ts(now), ts(now - timedelta(seconds=every_s))),
            ).fetchone() is not None

    # ------------------------------------------------------------------ alerts

    def alert_fire(self, key: str, *, rule: str, device_id: str | None,
                   cert_sha256: str | None, severity: int, summary: str,
                   labels: Mapping[str, str], now: datetime,
                   renotify_interval_s: float | None) -> bool:
        labels_json = json.dumps(dict(labels), sort_keys=True, separators=(",", ":"))
        due = _NEVER if renotify_interval_s is None else now - timedelta(
            seconds=renotify_interval_s)
        with self._tx() as c:
            # One conditional upsert: a row comes back only for a new alert, a re-fire
            # after resolve, a severity change or a due re-notification.
            notify = c.execute(
                "INSERT INTO alerts (alert_key, rule, device_id, cert_sha256, severity, state,"
                " summary, labels_json, started_at, resolved_at, last_notified_at, notify_count,"
                " updated_at) VALUES"
                " (?1, ?2, ?3, ?4, ?5, 'firing', ?6, ?7, ?8, NULL, ?8, 1, ?8)"
                " ON CONFLICT DO UPDATE SET rule = excluded.rule, device_id = excluded.device_id,"
                " cert_sha256 = excluded.cert_sha256, severity = excluded.severity,"
                " summary = excluded.summary, labels_json = excluded.labels_json,"
                " started_at = CASE WHEN alerts.state = 'firing' THEN alerts.started_at"
                " ELSE excluded.started_at END,"
                " notify_count = CASE WHEN alerts.state = 'firing' THEN alerts.notify_count + 1"
                " ELSE 1 END,"
                " state = 'firing', resolved_at = NULL, last_notified_at = excluded.updated_at,"
                " updated_at = excluded.updated_at"
                " WHERE alerts.state <> 'firing' OR alerts.severity <> excluded.severity"
                " OR alerts.last_notified_at IS NULL OR alerts.last_notified_at <= ?9"
                " RETURNING alert_key",
                (key, rule, device_id, cert_sha256, int(severity), summary, labels_json,
                 ts(now), ts(due))).fetchone() is not None
            if not notify:
                c.execute("UPDATE alerts SET summary = ?, labels_json = ?, updated_at = ?"
                          " WHERE alert_key = ? AND (summary <> ? OR labels_json <> ?)",
                          (summary, labels_json, ts(now), key, summary, labels_json))
        return notify

    def alert_resolve(self, key: str, now: datetime) -> bool:
        with self._tx() as c:
            return c.execute("UPDATE alerts SET state = 'resolved', resolved_at = ?,"
                             " updated_at = ? WHERE alert_key = ? AND state = 'firing'",
                             (ts(now), ts(now), key)).rowcount == 1

    def active_alerts(self) -> list[AlertRow]:
        return self._alerts("WHERE state = 'firing' ORDER BY severity DESC, started_at, alert_key",
                            ())

    def alert_history(self, device_id: str | None = None, limit: int = 100) -> list[AlertRow]:
        where = "" if device_id is None else "WHERE device_id = ?"
        args: tuple[Any, ...] = () if device_id is None else (device_id,)
        return self._alerts(f"{where} ORDER BY updated_at DESC, alert_key LIMIT ?",
                            (*args, limit))

    def _alerts(self, tail: str, args: tuple[Any, ...]) -> list[AlertRow]:
        with self._read() as c:
            rows = c.execute(f"SELECT {ALERT_COLUMNS} FROM alerts {tail}", args).fetchall()  # noqa: S608
        return [alert_row(r, dt) for r in rows]

    # ------------------------------------------------------------------ queries

    def device(self, device_id: str) -> DeviceRow | None:
        with self._read() as c:
            row = c.execute(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?",  # noqa: S608
                            (device_id,)).fetchone()
        return None if row is None else device_row(row, dt)

    def devices(self, limit: int | None = None, offset: int = 0,
                order_by: DeviceOrder = "severity") -> list[DeviceRow]:
        order = _ORDER[order_by]
        with self._read() as c:
            rows = c.execute(f"SELECT {DEVICE_COLUMNS} FROM devices ORDER BY {order}"  # noqa: S608
                             " LIMIT ? OFFSET ?", (-1 if limit is None else limit, offset))
            return [device_row(r, dt) for r in rows.fetchall()]

    def device_certs(self, device_id: str) -> list[CertLink]:
        cols = ", ".join("c." + col for col in CERT_COLUMNS.split(", "))
        with self._read() as c:
            rows = c.execute(f"SELECT {cols}, dc.role FROM device_certs dc JOIN certificates c"  # noqa: S608
                             " ON c.sha256 = dc.sha256 WHERE dc.device_id = ?"
                             " ORDER BY dc.role, c.not_after", (device_id,)).fetchall()
        return [CertLink(cert_row(r, dt), CertRole(r[-1])) for r in rows]

    def certificate(self, sha256: str) -> CertRow | None:
        with self._read() as c:
            row = c.execute(f"SELECT {CERT_COLUMNS}, der FROM certificates WHERE sha256 = ?",  # noqa: S608
                            (sha256,)).fetchone()
        return None if row is None else cert_row(row, dt, row[-1])

    def certificates_expiring_before(self, t: datetime,
                                     role: CertRole | None = None) -> list[CertHolding]:
        cols = ", ".join("c." + col for col in CERT_COLUMNS.split(", "))
        where, args = "c.not_after < ?", [ts(t)]
        if role is not None:
            where, args = where + " AND dc.role = ?", [*args, str(role)]
        with self._read() as c:
            rows = c.execute(f"SELECT {cols}, dc.device_id, dc.role FROM certificates c"  # noqa: S608
                             " JOIN device_certs dc ON dc.sha256 = c.sha256"
                             f" WHERE {where} ORDER BY c.not_after, dc.device_id, dc.role",
                             args).fetchall()
        return [CertHolding(cert_row(r, dt), r[-2], CertRole(r[-1])) for r in rows]

    def holders(self, sha256: str) -> list[tuple[str, CertRole]]:
        with self._read() as c:
            rows = c.execute("SELECT device_id, role FROM device_certs WHERE sha256 = ?"
                             " ORDER BY device_id, role", (sha256,)).fetchall()
        return [(dev, CertRole(role)) for dev, role in rows]

    def devices_holding_count(self, sha256: str, role: CertRole | None = None) -> int:
        with self._read() as c:
            (n,) = c.execute("SELECT count(DISTINCT device_id) FROM device_certs WHERE sha256 = ?"
                             " AND (?2 IS NULL OR role = ?2)",
                             (sha256, None if role is None else str(role))).fetchone()
        return int(n)

    def fleet_counts(self) -> dict[str, int]:
        with self._read() as c:
            rows = c.execute("SELECT severity, online, count(*) FROM devices"
                             " GROUP BY severity, online").fetchall()
        return fleet_counts_from(rows)

    def history(self, device_id: str | None = None, limit: int = 100) -> list[HistoryRow]:
        with self._read() as c:
            rows = c.execute("SELECT id, device_id, at, kind, detail_json FROM history"
                             " WHERE ?1 IS NULL OR device_id = ?1 ORDER BY id DESC LIMIT ?2",
                             (device_id, limit)).fetchall()
        return [HistoryRow(i, dev, dt(at), kind, json.loads(d)) for i, dev, at, kind, d in rows]

    def inventory(self, device_id: str) -> InventoryRecord | None:
        with self._read() as c:
            row = c.execute("SELECT digest, cas_json, updated_at FROM inventories"
                            " WHERE device_id = ?", (device_id,)).fetchone()
        return None if row is None else InventoryRecord(device_id, row[0], row[1], dt(row[2]))

    def devices_with_inventory(self) -> set[str]:
        with self._read() as c:
            return {dev for (dev,) in c.execute("SELECT device_id FROM inventories")}

    def scans(self) -> list[ScanRecord]:
        with self._read() as c:
            rows = c.execute("SELECT target, scanned_at, severity, result_json FROM scans"
                             " ORDER BY target").fetchall()
        return [ScanRecord(t, dt(at), int(sev), res) for t, at, sev, res in rows]

    def seen_count(self, device_id: str) -> int:
        with self._read() as c:
            (n,) = c.execute("SELECT count(*) FROM status_seen WHERE device_id = ?",
                             (device_id,)).fetchone()
        return int(n)

    def seen_seqs(self, device_id: str) -> list[tuple[str, int]]:
        with self._read() as c:
            return [(b, int(s)) for b, s in c.execute(
                "SELECT boot_id, seq FROM status_seen WHERE device_id = ? ORDER BY received_at,"
                " boot_id, seq", (device_id,)).fetchall()]

    def rejection_counts(self) -> dict[str, int]:
        with self._read() as c:
            return {r: int(n) for r, n in c.execute("SELECT reason, count FROM rejections")}

    def rejection_samples(self, reason: str | None = None, limit: int = 50) -> list[RejectSample]:
        with self._read() as c:
            rows = c.execute("SELECT id, at, reason, topic, detail, sample FROM reject_samples"
                             " WHERE ?1 IS NULL OR reason = ?1 ORDER BY id DESC LIMIT ?2",
                             (reason, limit)).fetchall()
        return [RejectSample(i, dt(at), r, t, d, bytes(s)) for i, at, r, t, d, s in rows]

    def integrity_check(self) -> bool:
        with self._lock:
            rows = self._conn.execute("PRAGMA integrity_check").fetchall()
        return rows == [("ok",)]

