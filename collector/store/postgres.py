"""The PostgreSQL backend (psycopg 3): the store several collectors share.

Owns the PostgreSQL dialect of the contract in `collector.store`: the connection
(session time zone UTC, reconnect when broken), TIMESTAMPTZ instants, batches as
`unnest` arrays and pipelined `executemany`, and the locking discipline that makes N
collectors safe on one database: every "exactly once" transition is one conditional
statement (insert-if-absent, conditional upsert with RETURNING), device rows are
locked `FOR NO KEY UPDATE` in device_id order, and every multi-row write is sorted
by key so concurrent batches take row locks in the same order. Deadlocks and
serialization failures are retried. It must not decide what changed (`plan_batch`)
or read the clock.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
from psycopg import errors

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
_T = TypeVar("_T")
_Conn = psycopg.Connection[tuple[Any, ...]]
_NEVER = datetime.min.replace(tzinfo=UTC)
_ATTEMPTS = 3
_ORDER: dict[str, str] = {
    "severity": "severity DESC, device_id",
    "device_id": "device_id",
    "last_received_at": "last_received_at DESC NULLS LAST, device_id",
}


def _dt(value: datetime) -> datetime:
    return value.astimezone(UTC)


class PostgresStore:
    """`Store` on one PostgreSQL schema (the first of the URL's search_path)."""

    def __init__(self, url: str, *, reject_sample_limit: int = 20) -> None:
        self._url = url
        self._sample_limit = reject_sample_limit
        self._lock = threading.Lock()
        self._conn = self._connect()

    @classmethod
    def from_url(cls, url: str, *, reject_sample_limit: int = 20) -> PostgresStore:
        return cls(url, reject_sample_limit=reject_sample_limit)

    def _connect(self) -> _Conn:
        try:
            conn = psycopg.connect(self._url, autocommit=True)
            # Instants come back tz-aware in UTC whatever the server's default zone.
            conn.execute("SET TIME ZONE 'UTC'")
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _run(self, fn: Callable[[_Conn], _T]) -> _T:
        """`fn` in one transaction; retried on deadlock or serialization failure, which
        concurrent collectors can provoke and which leave nothing behind."""
        with self._lock:
            for attempt in range(1, _ATTEMPTS + 1):
                if self._conn.broken:  # server restart, network blip: one fresh connection
                    self._conn.close()
                    self._conn = self._connect()
                try:
                    with self._conn.transaction():
                        return fn(self._conn)
                except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                    if attempt == _ATTEMPTS:
                        raise StoreError(f"postgresql: {exc}") from exc
                except psycopg.Error as exc:
                    raise StoreError(f"postgresql: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def migrate(self) -> None:
        def run(c: _Conn) -> None:
            (schema,) = _one(c.execute("SELECT current_schema()"))
            if schema is None:
                raise StoreError("the search_path names no existing schema to migrate")
            # Two collectors starting at once: the second waits here, then finds the
            # versions applied. Keyed by schema so parallel test schemas do not queue.
            c.execute("SELECT pg_advisory_xact_lock(hashtext('certmon.migrate.' || %s))",
                      (schema,))
            c.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                      " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            done = {v for (v,) in c.execute("SELECT version FROM schema_migrations")}
            known = migrations("postgres")
            if done and max(done) > known[-1][0]:
                raise StoreError(f"database schema {max(done)} is newer than this certmon "
                                 f"({known[-1][0]}); upgrade certmon")
            for version, script in known:
                if version not in done:
                    c.execute(script)  # no parameters: several statements allowed
                    c.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))

        self._run(run)

    # ------------------------------------------------------------------ ingest

    def record_statuses(self, batch: Sequence[StatusRecord]) -> list[bool]:
        if not batch:
            return []
        return self._run(lambda c: self._record(c, batch))

    def _record(self, c: _Conn, batch: Sequence[StatusRecord]) -> list[bool]:
        first: dict[str, datetime] = {}
        unique: dict[tuple[str, str, int], StatusRecord] = {}
        for r in batch:
            first[r.device_id] = min(first.get(r.device_id, r.received_at), r.received_at)
            unique.setdefault((r.device_id, r.boot_id, r.seq), r)
        devs = sorted(first)
        # Device rows first: status_seen and device_boots reference them.
        c.execute("INSERT INTO devices (device_id, first_seen_at, updated_at)"
                  " SELECT d, t, t FROM unnest(%s::text[], %s::timestamptz[]) AS u(d, t)"
                  " ORDER BY d ON CONFLICT DO NOTHING", (devs, [first[d] for d in devs]))
        keys = sorted(unique)
        recs = [unique[k] for k in keys]
        inserted = {(d, b, int(s)) for d, b, s in c.execute(
            "INSERT INTO status_seen (device_id, boot_id, seq, received_at, device_ts)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::timestamptz[],"
            " %s::timestamptz[]) ORDER BY 1, 2, 3 ON CONFLICT DO NOTHING"
            " RETURNING device_id, boot_id, seq",
            ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
             [utc(r.received_at) for r in recs], [utc(r.device_ts) for r in recs])).fetchall()}
        flags = new_in_batch(batch, lambda r: (r.device_id, r.boot_id, r.seq) in inserted)
        new = [r for r, is_fresh in zip(batch, flags, strict=True) if is_fresh]
        if new:
            self._apply(c, new)
        return flags

    def _apply(self, c: _Conn, new: list[StatusRecord]) -> None:
        boot_min: dict[tuple[str, str], datetime] = {}
        for r in new:
            key = (r.device_id, r.boot_id)
            boot_min[key] = min(boot_min.get(key, r.received_at), r.received_at)
        bk = sorted(boot_min)
        # Conditional DO UPDATE: an unconditional one would write a dead tuple per boot
        # per batch. Earlier wins when two collectors' clocks disagree.
        c.execute("INSERT INTO device_boots (device_id, boot_id, first_seen_at)"
                  " SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[])"
                  " ORDER BY 1, 2 ON CONFLICT (device_id, boot_id) DO UPDATE"
                  " SET first_seen_at = excluded.first_seen_at"
                  " WHERE excluded.first_seen_at < device_boots.first_seen_at",
                  ([k[0] for k in bk], [k[1] for k in bk], [utc(boot_min[k]) for k in bk]))
        devs = sorted({r.device_id for r in new})
        states: dict[str, DeviceState] = {}
        for row in c.execute(
                "SELECT d.device_id, d.status_json IS NOT NULL, d.boot_id, b.first_seen_at,"
                " d.seq, d.severity, d.findings_json, d.client_sha256, d.trust_digest, d.online,"
                " d.online_changed_at, d.last_received_at FROM devices d LEFT JOIN device_boots"
                " b ON b.device_id = d.device_id AND b.boot_id = d.boot_id"
                " WHERE d.device_id = ANY(%s) ORDER BY d.device_id FOR NO KEY UPDATE OF d",
                (devs,)).fetchall():
            states[row[0]] = DeviceState(
                row[0], row[1], row[2], row[3], row[4], row[5],
                sorted({f.code for f in findings_from_json(row[6])}), row[7], row[8], row[9],
                row[10], row[11])
        boots = {(d, b): t for d, b, t in c.execute(
            "SELECT device_id, boot_id, first_seen_at FROM device_boots WHERE"
            " (device_id, boot_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([k[0] for k in bk], [k[1] for k in bk])).fetchall()}
        links: dict[str, set[tuple[str, str]]] = {d: set() for d in devs}
        # Only a record that carries certificates changes links: most statuses don't.
        with_certs = sorted({r.device_id for r in new if r.certs or r.replace_roles})
        if with_certs:
            for d, role, sha in c.execute("SELECT device_id, role, sha256 FROM device_certs"
                                          " WHERE device_id = ANY(%s)", (with_certs,)).fetchall():
                links[d].add((role, sha))
        plan = plan_batch(new, states, boots, links)
        self._write_links(c, plan)
        with c.cursor() as cur:
            cur.executemany(
                "UPDATE devices SET last_status_ts = %s, boot_id = %s, seq = %s,"
                " interval_s = %s, severity = %s, worst_code = %s, findings_json = %s,"
                " status_json = %s, client_sha256 = %s, trust_digest = %s,"
                " clock_offset_lo_s = coalesce(%s, clock_offset_lo_s),"
                " clock_offset_hi_s = coalesce(%s, clock_offset_hi_s),"
                " clock_offset_at = coalesce(%s, clock_offset_at) WHERE device_id = %s",
                [(utc(r.device_ts), r.boot_id, r.seq, r.interval_s, int(r.severity),
                  r.worst_code, findings_to_json(r.findings), r.status_json, r.client_sha256,
                  r.trust_digest, r.clock_offset_lo_s, r.clock_offset_hi_s,
                  None if r.clock_offset_lo_s is None and r.clock_offset_hi_s is None
                  else utc(r.received_at), dev) for dev, r in sorted(plan.applied.items())])
            # GREATEST: another collector may have stored a later receipt meanwhile.
            cur.executemany("UPDATE devices SET last_received_at = GREATEST(last_received_at, %s),"
                            " updated_at = GREATEST(updated_at, %s) WHERE device_id = %s",
                            [(utc(at), utc(at), dev) for dev, at in sorted(plan.touched.items())])
            cur.executemany("UPDATE devices SET online = TRUE, online_changed_at = %s"
                            " WHERE device_id = %s",
                            [(utc(at), dev) for dev, at in sorted(plan.online_at.items())])
            cur.executemany("INSERT INTO history (device_id, at, kind, detail_json)"
                            " VALUES (%s, %s, %s, %s)",
                            [(dev, utc(at), kind, d) for dev, at, kind, d in plan.history])

    def _write_links(self, c: _Conn, plan: BatchPlan) -> None:
        with c.cursor() as cur:
            cur.executemany(
                "INSERT INTO certificates (sha256, subject, issuer, serial_hex, not_before,"
                " not_after, key_type, key_bits, signature_algorithm, is_ca, is_self_issued,"
                " first_seen_at, last_seen_at, der) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s,"
                " %s, %s, %s, %s, %s) ON CONFLICT (sha256) DO UPDATE SET"
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
                " last_seen_at = GREATEST(certificates.last_seen_at, excluded.last_seen_at)",
                [(k.sha256, k.subject, k.issuer, k.serial_hex, utc(k.not_before),
                  utc(k.not_after), k.key_type, k.key_bits, k.signature_algorithm, k.is_ca,
                  k.is_self_issued, utc(at), utc(at), k.der)
                 for _, (k, at) in sorted(plan.certs.items())])
            cur.executemany("DELETE FROM device_certs WHERE device_id = %s AND sha256 = %s"
                            " AND role = %s", sorted(plan.link_deletes))
            cur.executemany(
                "INSERT INTO device_certs (device_id, sha256, role, since_at, last_seen_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (device_id, role, sha256) DO UPDATE"
                " SET last_seen_at = GREATEST(device_certs.last_seen_at, excluded.last_seen_at)",
                [(*key, utc(at), utc(at)) for key, at in sorted(plan.link_upserts.items())])

    def set_online(self, device_id: str, online: bool, at: datetime) -> bool:
        def run(c: _Conn) -> bool:
            c.execute("INSERT INTO devices (device_id, first_seen_at, updated_at)"
                      " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", (device_id, utc(at), utc(at)))
            # A stale message (older than the last change) must not flip the state back.
            changed = c.execute(
                "UPDATE devices SET online = %(on)s, online_changed_at = %(at)s,"
                " updated_at = %(at)s WHERE device_id = %(dev)s AND online <> %(on)s"
                " AND (online_changed_at IS NULL OR online_changed_at <= %(at)s)",
                {"on": online, "at": utc(at), "dev": device_id}).rowcount == 1
            if changed:
                c.execute("INSERT INTO history (device_id, at, kind, detail_json)"
                          " VALUES (%s, %s, 'online_change', %s)",
                          (device_id, utc(at), detail_json(online=online, cause="message")))
            return changed

        return self._run(run)

    def mark_silent(self, now: datetime, factor: float = 3.0) -> list[str]:
        def run(c: _Conn) -> list[str]:
            ids = sorted(dev for (dev,) in c.execute(
                "UPDATE devices SET online = FALSE, online_changed_at = %(now)s,"
                " updated_at = %(now)s WHERE online AND interval_s IS NOT NULL"
                " AND last_received_at + make_interval(secs => %(f)s * interval_s) < %(now)s"
                " RETURNING device_id", {"now": utc(now), "f": float(factor)}).fetchall())
            with c.cursor() as cur:
                cur.executemany("INSERT INTO history (device_id, at, kind, detail_json)"
                                " VALUES (%s, %s, 'online_change', %s)",
                                [(dev, utc(now), detail_json(online=False, cause="silence"))
                                 for dev in ids])
            return ids

        return self._run(run)

    def put_inventory(self, inventory: InventoryRecord) -> None:
        inv, at = inventory, utc(inventory.updated_at)

        def run(c: _Conn) -> None:
            c.execute("INSERT INTO devices (device_id, first_seen_at, updated_at)"
                      " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", (inv.device_id, at, at))
            c.execute("SELECT 1 FROM devices WHERE device_id = %s FOR NO KEY UPDATE",
                      (inv.device_id,))  # serialises link replacement with record_statuses
            stored = c.execute(
                "INSERT INTO inventories (device_id, digest, cas_json, updated_at)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (device_id) DO UPDATE SET"
                " digest = excluded.digest, cas_json = excluded.cas_json,"
                " updated_at = excluded.updated_at"
                " WHERE excluded.updated_at >= inventories.updated_at",
                (inv.device_id, inv.digest, inv.cas_json, at)).rowcount == 1
            if stored:  # a reordered older inventory must not replace the trust links
                plan = BatchPlan()
                current = {(r, s) for r, s in c.execute(
                    "SELECT role, sha256 FROM device_certs WHERE device_id = %s",
                    (inv.device_id,)).fetchall()}
                _plan_links(plan, inv.device_id, [CertLink(k, CertRole.TRUST) for k in inv.cas],
                            frozenset({CertRole.TRUST}), at, current)
                self._write_links(c, plan)

        self._run(run)

    def prune_seen(self, before: datetime) -> int:
        return self._run(lambda c: c.execute("DELETE FROM status_seen WHERE received_at < %s",
                                             (utc(before),)).rowcount)

    def count_rejection(self, reason: str, *, at: datetime, topic: str, detail: str,
                        sample: bytes) -> None:
        args = {"r": clean_text(reason), "at": utc(at), "topic": clean_text(topic)[:512],
                "detail": clean_text(detail)[:2048], "sample": bytes(sample[:512]),
                "k": self._sample_limit}

        def run(c: _Conn) -> None:
            c.execute("INSERT INTO rejections (reason, count, last_at) VALUES (%(r)s, 1, %(at)s)"
                      " ON CONFLICT (reason) DO UPDATE SET count = rejections.count + 1,"
                      " last_at = GREATEST(rejections.last_at, excluded.last_at)", args)
            c.execute("INSERT INTO reject_samples (at, reason, topic, detail, sample)"
                      " VALUES (%(at)s, %(r)s, %(topic)s, %(detail)s, %(sample)s)", args)
            # Keep the newest K per reason: a flood of one kind must not grow the table.
            c.execute("DELETE FROM reject_samples WHERE reason = %(r)s AND id <= (SELECT id FROM"
                      " reject_samples WHERE reason = %(r)s ORDER BY id DESC LIMIT 1"
                      " OFFSET %(k)s)", args)

        self._run(run)

    def put_scan(self, scan: ScanRecord) -> None:
        self._run(lambda c: c.execute(
            "INSERT INTO scans (target, scanned_at, severity, result_json)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (target) DO UPDATE SET"
            " scanned_at = excluded.scanned_at, severity = excluded.severity,"
            " result_json = excluded.result_json",
            (scan.target, utc(scan.scanned_at), int(scan.severity), scan.result_json)))

    def try_claim(self, job: str, now: datetime, every_s: float) -> bool:
        return self._run(lambda c: c.execute(
            "INSERT INTO job_claims (job, claimed_at) VALUES (%s, %s) ON CONFLICT (job)"
            " DO UPDATE SET claimed_at = excluded.claimed_at"
            " WHERE job_claims.claimed_at <= %s RETURNING job",
            (job, utc(now), utc(now) - timedelta(seconds=every_s))).fetchone() is not None)

    # ------------------------------------------------------------------ alerts

    def alert_fire(self, key: str, *, rule: str, device_id: str | None,
                   cert_sha256: str | None, severity: int, summary: str,
                   labels: Mapping[str, str], now: datetime,
                   renotify_interval_s: float | None) -> bool:
        args = {
            "key": key, "rule": rule, "dev": device_id, "sha": cert_sha256,
            "sev": int(severity), "summary": summary, "now": utc(now),
            "labels": json.dumps(dict(labels), sort_keys=True, separators=(",", ":")),
            "due": _NEVER if renotify_interval_s is None
            else utc(now) - timedelta(seconds=renotify_interval_s),
        }

        def run(c: _Conn) -> bool:
            # One conditional upsert: a row comes back only for a new alert, a re-fire
            # after resolve, a severity change or a due re-notification. The conflicting
            # row is locked and the WHERE re-read, so of N collectors one gets the row.
            notify = c.execute(
                "INSERT INTO alerts (alert_key, rule, device_id, cert_sha256, severity, state,"
                " summary, labels_json, started_at, resolved_at, last_notified_at, notify_count,"
                " updated_at) VALUES (%(key)s, %(rule)s,"
                " %(dev)s, %(sha)s, %(sev)s, 'firing', %(summary)s, %(labels)s, %(now)s, NULL,"
                " %(now)s, 1, %(now)s)"
                " ON CONFLICT (alert_key) DO UPDATE SET rule = excluded.rule,"
                " device_id = excluded.device_id, cert_sha256 = excluded.cert_sha256,"
                " severity = excluded.severity, summary = excluded.summary,"
                " labels_json = excluded.labels_json,"
                " started_at = CASE WHEN alerts.state = 'firing' THEN alerts.started_at"
                " ELSE excluded.started_at END,"
                " notify_count = CASE WHEN alerts.state = 'firing' THEN alerts.notify_count + 1"
                " ELSE 1 END,"
                " state = 'firing', resolved_at = NULL, last_notified_at = excluded.updated_at,"
                " updated_at = excluded.updated_at"
                " WHERE alerts.state <> 'firing' OR alerts.severity <> excluded.severity"
                " OR alerts.last_notified_at IS NULL OR alerts.last_notified_at <= %(due)s"
                " RETURNING alert_key", args).fetchone() is not None
            if not notify:
                c.execute("UPDATE alerts SET summary = %(summary)s, labels_json = %(labels)s,"
                          " updated_at = %(now)s WHERE alert_key = %(key)s"
                          " AND (summary <> %(summary)s OR labels_json <> %(labels)s)", args)
            return notify

        return self._run(run)

    def alert_resolve(self, key: str, now: datetime) -> bool:
        return self._run(lambda c: c.execute(
            "UPDATE alerts SET state = 'resolved', resolved_at = %(now)s, updated_at = %(now)s"
            " WHERE alert_key = %(key)s AND state = 'firing'",
            {"now": utc(now), "key": key}).rowcount == 1)

    def active_alerts(self) -> list[AlertRow]:
        return self._alerts("WHERE state = 'firing' ORDER BY severity DESC, started_at, alert_key",
                            ())

    def alert_history(self, device_id: str | None = None, limit: int = 100) -> list[AlertRow]:
        if device_id is None:
            return self._alerts("ORDER BY updated_at DESC, alert_key LIMIT %s", (limit,))
        return self._alerts("WHERE device_id = %s ORDER BY updated_at DESC, alert_key LIMIT %s",
                            (device_id, limit))

    def _alerts(self, tail: str, args: tuple[Any, ...]) -> list[AlertRow]:
        rows = self._rows(f"SELECT {ALERT_COLUMNS} FROM alerts {tail}", args)  # noqa: S608
        return [alert_row(r, _dt) for r in rows]

    # ------------------------------------------------------------------ queries

    def _rows(self, sql: str, args: Sequence[Any] | Mapping[str, Any] = ()) -> list[Any]:
        return self._run(lambda c: c.execute(sql, args).fetchall())

    def device(self, device_id: str) -> DeviceRow | None:
        rows = self._rows(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = %s",  # noqa: S608
                          (device_id,))
        return device_row(rows[0], _dt) if rows else None

    def devices(self, limit: int | None = None, offset: int = 0,
                order_by: DeviceOrder = "severity") -> list[DeviceRow]:
        rows = self._rows(f"SELECT {DEVICE_COLUMNS} FROM devices ORDER BY {_ORDER[order_by]}"  # noqa: S608
                          " LIMIT %s OFFSET %s", (limit, offset))  # LIMIT NULL: no limit
        return [device_row(r, _dt) for r in rows]

    def device_certs(self, device_id: str) -> list[CertLink]:
        cols = ", ".join("c." + col for col in CERT_COLUMNS.split(", "))
        rows = self._rows(f"SELECT {cols}, dc.role FROM device_certs dc JOIN certificates c"  # noqa: S608
                          " ON c.sha256 = dc.sha256 WHERE dc.device_id = %s"
                          " ORDER BY dc.role, c.not_after", (device_id,))
        return [CertLink(cert_row(r, _dt), CertRole(r[-1])) for r in rows]

    def certificate(self, sha256: str) -> CertRow | None:
        rows = self._rows(f"SELECT {CERT_COLUMNS}, der FROM certificates WHERE sha256 = %s",  # noqa: S608
                          (sha256,))
        return cert_row(rows[0], _dt, rows[0][-1]) if rows else None

    def certificates_expiring_before(self, t: datetime,
                                     role: CertRole | None = None) -> list[CertHolding]:
        cols = ", ".join("c." + col for col in CERT_COLUMNS.split(", "))
        rows = self._rows(f"SELECT {cols}, dc.device_id, dc.role FROM certificates c"  # noqa: S608
                          " JOIN device_certs dc ON dc.sha256 = c.sha256"
                          " WHERE c.not_after < %(t)s"
                          " AND (%(role)s::text IS NULL OR dc.role = %(role)s::text)"
                          " ORDER BY c.not_after, dc.device_id, dc.role",
                          {"t": utc(t), "role": None if role is None else str(role)})
        return [CertHolding(cert_row(r, _dt), r[-2], CertRole(r[-1])) for r in rows]

    def holders(self, sha256: str) -> list[tuple[str, CertRole]]:
        rows = self._rows("SELECT device_id, role FROM device_certs WHERE sha256 = %s"
                          " ORDER BY device_id, role", (sha256,))
        return [(dev, CertRole(role)) for dev, role in rows]

    def devices_holding_count(self, sha256: str, role: CertRole | None = None) -> int:
        rows = self._rows("SELECT count(DISTINCT device_id) FROM device_certs WHERE"
                          " sha256 = %(sha)s AND (%(role)s::text IS NULL OR role = %(role)s::text)",
                          {"sha": sha256, "role": None if role is None else str(role)})
        return int(rows[0][0])

    def fleet_counts(self) -> dict[str, int]:
        return fleet_counts_from(self._rows("SELECT severity, online, count(*) FROM devices"
                                            " GROUP BY severity, online"))

    def history(self, device_id: str | None = None, limit: int = 100) -> list[HistoryRow]:
        rows = self._rows("SELECT id, device_id, at, kind, detail_json FROM history"
                          " WHERE %(dev)s::text IS NULL OR device_id = %(dev)s::text"
                          " ORDER BY id DESC LIMIT %(limit)s", {"dev": device_id, "limit": limit})
        return [HistoryRow(i, dev, _dt(at), kind, json.loads(d)) for i, dev, at, kind, d in rows]

    def inventory(self, device_id: str) -> InventoryRecord | None:
        rows = self._rows("SELECT digest, cas_json, updated_at FROM inventories"
                          " WHERE device_id = %s", (device_id,))
        return InventoryRecord(device_id, rows[0][0], rows[0][1], _dt(rows[0][2])) if rows else None

    def devices_with_inventory(self) -> set[str]:
        return {str(dev) for (dev,) in self._rows("SELECT device_id FROM inventories", ())}

    def scans(self) -> list[ScanRecord]:
        rows = self._rows("SELECT target, scanned_at, severity, result_json FROM scans"
                          " ORDER BY target")
        return [ScanRecord(t, _dt(at), int(sev), res) for t, at, sev, res in rows]

    def seen_count(self, device_id: str) -> int:
        rows = self._rows("SELECT count(*) FROM status_seen WHERE device_id = %s", (device_id,))
        return int(rows[0][0])

    def seen_seqs(self, device_id: str) -> list[tuple[str, int]]:
        rows = self._rows("SELECT boot_id, seq FROM status_seen WHERE device_id = %s"
                          " ORDER BY received_at, boot_id, seq", (device_id,))
        return [(b, int(s)) for b, s in rows]

    def rejection_counts(self) -> dict[str, int]:
        return {r: int(n) for r, n in self._rows("SELECT reason, count FROM rejections")}

    def rejection_samples(self, reason: str | None = None, limit: int = 50) -> list[RejectSample]:
        rows = self._rows("SELECT id, at, reason, topic, detail, sample FROM reject_samples"
                          " WHERE %(r)s::text IS NULL OR reason = %(r)s::text"
                          " ORDER BY id DESC LIMIT %(limit)s", {"r": reason, "limit": limit})
        return [RejectSample(i, _dt(at), r, t, d, bytes(s)) for i, at, r, t, d, s in rows]

    def integrity_check(self) -> bool:
        # PostgreSQL checks its own pages; what we can verify is that it answers.
        return self._rows("SELECT 1") == [(1,)]


def _one(cur: psycopg.Cursor[tuple[Any, ...]]) -> tuple[Any, ...]:
    row = cur.fetchone()
    if row is None:  # pragma: no cover - every caller selects exactly one row
        raise StoreError("query returned no row")
    return row
