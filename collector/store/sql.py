"""The store's SQL, written once: the writes of the contract, over a `Dialect`.

Owns the statements of every `Store` write (ingest, online state, inventories,
rejections, scans, job claims, store outages, alerts) and migrations' bookkeeping;
reads are `collector.store.queries`', both halves of `SqlStore`. A backend subclasses `SqlStore`
with its connections, its transactions (`_write`, `_read`) and its migration runner.
It must not decide what a batch changes (that is `collector.store.plan`), read the
clock, or name a backend: what differs between databases is the dialect's.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from collector.store import (
    CertLink,
    CertRole,
    FindingRecord,
    InventoryRecord,
    OutageRecord,
    ScanRecord,
    StatusRecord,
    StoreError,
)
from collector.store.dialect import Dialect, Session, migrations
from collector.store.plan import (
    BatchPlan,
    RowState,
    SeqWindow,
    codes_of,
    detail_json,
    judge_seqs,
    plan_batch,
    plan_links,
)
from collector.store.queries import SqlQueries, findings_from_json

# SQL below is assembled only from the dialect's fragments and placeholders, never from
# arguments: hence the `noqa: S608` on those lines.
_T = TypeVar("_T")
_NEVER = datetime.min.replace(tzinfo=UTC)
_OUTAGES_KEPT = 100
_NEW_DEVICE = ("INSERT INTO devices (device_id, first_seen_at, updated_at)"
               " VALUES (?, ?, ?) ON CONFLICT DO NOTHING")


def clean_text(text: str) -> str:
    """Free text from the wire (rejection details, topics) as storable text: PostgreSQL
    refuses NUL and both refuse lone surrogates, and a rejection must still be counted."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def findings_to_json(findings: Sequence[FindingRecord]) -> str:
    return json.dumps([[f.code, f.severity, f.cert_sha256, f.message] for f in findings],
                      separators=(",", ":"), ensure_ascii=False)


class SqlStore(SqlQueries):
    """`Store` over a dialect. Subclasses supply transactions and the migration runner."""

    def __init__(self, dialect: Dialect, *, reject_sample_limit: int) -> None:
        super().__init__(dialect)
        self._sample_limit = reject_sample_limit

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def _write(self, fn: Callable[[Session], _T]) -> _T:
        """`fn` in one write transaction."""

    @abc.abstractmethod
    def _run_script(self, s: Session, script: str) -> None:
        """One migration file's statements, inside the migration's transaction."""

    def _lock_migrations(self, s: Session) -> None:
        """Make concurrent `migrate()` calls wait for each other (if the writer lock
        does not already)."""

    def migrate(self) -> None:
        def run(s: Session) -> None:
            self._lock_migrations(s)
            s.script(self._d.migrations_table)
            done = {int(v) for (v,) in s.rows("SELECT version FROM schema_migrations")}
            known = migrations(self._d.name)
            if done and max(done) > known[-1][0]:
                raise StoreError(f"database schema {max(done)} is newer than this certmon "
                                 f"({known[-1][0]}); upgrade certmon")
            for version, script in known:
                if version not in done:
                    self._run_script(s, script)
                    s.rows("INSERT INTO schema_migrations (version) VALUES (?)", (version,))

        self._write(run)

    # ------------------------------------------------------------------ ingest

    def record_statuses(self, batch: Sequence[StatusRecord]) -> list[bool]:
        if not batch:
            return []
        return self._write(lambda s: self._record(s, batch))

    def _record(self, s: Session, batch: Sequence[StatusRecord]) -> list[bool]:
        enc = self._d.encode
        first: dict[str, datetime] = {}
        for r in batch:
            first[r.device_id] = min(first.get(r.device_id, r.received_at), r.received_at)
        devs = sorted(first)
        # Device rows first: device_boots references them.
        s.each("INSERT INTO devices (device_id, first_seen_at, updated_at) {rows}"
               " ON CONFLICT DO NOTHING", ("text", "instant", "instant"),
               [(d, enc(first[d]), enc(first[d])) for d in devs])
        if self._d.lock_devices:
            # The replay check reads and rewrites each boot's window: under the device
            # rows' locks (in device_id order, so concurrent batches wait rather than
            # deadlock), two collectors of a share group judge a device one at a time.
            s.each("SELECT d.device_id FROM devices d WHERE d.device_id IN ({rows})"  # noqa: S608
                   f" ORDER BY d.device_id {self._d.lock_devices}", ("text",),
                   [(d,) for d in devs])
        keys = sorted({(r.device_id, r.boot_id) for r in batch})
        windows = {(d, b): SeqWindow.from_row(None if h is None else int(h),
                                              None if w is None else bytes(w))
                   for d, b, h, w in s.each(
                       "SELECT device_id, boot_id, high_seq, seen_bits FROM device_boots"
                       " WHERE (device_id, boot_id) IN ({rows})", ("text", "text"), keys)}
        flags = judge_seqs(batch, windows)
        new = [r for r, is_fresh in zip(batch, flags, strict=True) if is_fresh]
        if not new:
            return flags
        boot_min: dict[tuple[str, str], datetime] = {}
        for r in new:
            key = (r.device_id, r.boot_id)
            boot_min[key] = min(boot_min.get(key, r.received_at), r.received_at)
        # Earlier first sighting wins when two collectors' clocks disagree.
        s.many("INSERT INTO device_boots (device_id, boot_id, first_seen_at, high_seq,"
               " seen_bits) VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, boot_id) DO UPDATE"
               " SET high_seq = excluded.high_seq, seen_bits = excluded.seen_bits,"
               " first_seen_at = CASE WHEN excluded.first_seen_at < device_boots.first_seen_at"
               " THEN excluded.first_seen_at ELSE device_boots.first_seen_at END",
               [(d, b, enc(at), windows[(d, b)].high, windows[(d, b)].blob())
                for (d, b), at in sorted(boot_min.items())])
        self._apply(s, new)
        return flags

    def _apply(self, s: Session, new: list[StatusRecord]) -> None:
        enc, dec = self._d.encode, self._d.decode
        bk = sorted({(r.device_id, r.boot_id) for r in new})
        devs = sorted({r.device_id for r in new})
        states: dict[str, RowState] = {}
        # In device_id order, locked where the dialect locks: concurrent batches then
        # wait for each other instead of deadlocking.
        for row in s.each(
                "SELECT d.device_id, d.status_json IS NOT NULL, d.boot_id, b.first_seen_at,"  # noqa: S608
                " d.seq, d.severity, d.findings_json, d.client_sha256, d.trust_digest,"
                " d.online, d.online_changed_at, d.last_received_at FROM devices d"
                " LEFT JOIN device_boots b ON b.device_id = d.device_id AND"
                " b.boot_id = d.boot_id WHERE d.device_id IN ({rows})"
                f" ORDER BY d.device_id {self._d.lock_devices}", ("text",), [(d,) for d in devs]):
            states[row[0]] = RowState(
                row[0], bool(row[1]), row[2], self._opt(row[3]), row[4], int(row[5]),
                codes_of(findings_from_json(row[6])), row[7], row[8], bool(row[9]),
                self._opt(row[10]), self._opt(row[11]))
        boots = {(d, b): dec(t) for d, b, t in s.each(
            "SELECT device_id, boot_id, first_seen_at FROM device_boots"
            " WHERE (device_id, boot_id) IN ({rows})", ("text", "text"), bk)}
        links: dict[str, set[tuple[str, str]]] = {d: set() for d in devs}
        # Only a record that carries certificates changes links: most statuses don't
        # (the ingest sends them when the client certificate changes).
        with_certs = sorted({r.device_id for r in new if r.certs or r.replace_roles})
        for d, role, sha in s.each("SELECT device_id, role, sha256 FROM device_certs"
                                   " WHERE device_id IN ({rows})", ("text",),
                                   [(d,) for d in with_certs]):
            links[d].add((role, sha))
        plan = plan_batch(new, states, boots, links)
        self._write_links(s, plan)
        s.many("UPDATE devices SET last_status_ts = ?, boot_id = ?, seq = ?, interval_s = ?,"
               " severity = ?, worst_code = ?, findings_json = ?, status_json = ?,"
               " client_sha256 = ?, trust_digest = ?,"
               " clock_offset_lo_s = coalesce(?, clock_offset_lo_s),"
               " clock_offset_hi_s = coalesce(?, clock_offset_hi_s),"
               " clock_offset_at = coalesce(?, clock_offset_at) WHERE device_id = ?",
               [(enc(r.device_ts), r.boot_id, r.seq, r.interval_s, int(r.severity), r.worst_code,
                 findings_to_json(r.findings), r.status_json, r.client_sha256, r.trust_digest,
                 r.clock_offset_lo_s, r.clock_offset_hi_s,
                 None if r.clock_offset_lo_s is None and r.clock_offset_hi_s is None
                 else enc(r.received_at), dev) for dev, r in sorted(plan.applied.items())])
        # The greatest: another collector may have stored a later receipt meanwhile.
        g = self._d.greatest
        s.many(f"UPDATE devices SET last_received_at = {g}(coalesce(last_received_at, ?), ?),"  # noqa: S608
               f" updated_at = {g}(updated_at, ?) WHERE device_id = ?",
               [(enc(at), enc(at), enc(at), dev) for dev, at in sorted(plan.touched.items())])
        s.many("UPDATE devices SET online = TRUE, online_changed_at = ? WHERE device_id = ?",
               [(enc(at), dev) for dev, at in sorted(plan.online_at.items())])
        s.each("INSERT INTO history (device_id, at, kind, detail_json) {rows}",
               ("text", "instant", "text", "text"),
               [(dev, enc(at), kind, detail) for dev, at, kind, detail in plan.history])

    def _write_links(self, s: Session, plan: BatchPlan) -> None:
        enc, g = self._d.encode, self._d.greatest
        s.many(
            "INSERT INTO certificates (sha256, subject, issuer, serial_hex, not_before, not_after,"  # noqa: S608
            " key_type, key_bits, signature_algorithm, is_ca, is_self_issued, first_seen_at,"
            " last_seen_at, der) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (sha256) DO UPDATE SET"
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
            f" last_seen_at = {g}(certificates.last_seen_at, excluded.last_seen_at)",
            [(k.sha256, k.subject, k.issuer, k.serial_hex, enc(k.not_before), enc(k.not_after),
              k.key_type, k.key_bits, k.signature_algorithm, k.is_ca, k.is_self_issued,
              enc(at), enc(at), k.der) for _, (k, at) in sorted(plan.certs.items())])
        s.many("DELETE FROM device_certs WHERE device_id = ? AND sha256 = ? AND role = ?",
               sorted(plan.link_deletes))
        s.many("INSERT INTO device_certs (device_id, sha256, role, since_at, last_seen_at)"  # noqa: S608
               " VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, role, sha256) DO UPDATE SET"
               f" last_seen_at = {g}(device_certs.last_seen_at, excluded.last_seen_at)",
               [(*key, enc(at), enc(at)) for key, at in sorted(plan.link_upserts.items())])

    def set_online(self, device_id: str, online: bool, at: datetime) -> bool:
        t = self._d.encode(at)

        def run(s: Session) -> bool:
            s.rows(_NEW_DEVICE, (device_id, t, t))
            # A stale message (older than the last change) must not flip the state back.
            changed = s.count(
                "UPDATE devices SET online = :on, online_changed_at = :at, updated_at = :at"
                " WHERE device_id = :dev AND online <> :on"
                " AND (online_changed_at IS NULL OR online_changed_at <= :at)",
                {"on": online, "at": t, "dev": device_id}) == 1
            if changed:
                s.rows("INSERT INTO history (device_id, at, kind, detail_json)"
                       " VALUES (?, ?, 'online_change', ?)",
                       (device_id, t, detail_json(online=online, cause="message")))
            return changed

        return self._write(run)

    def mark_silent(self, horizon: datetime, factor: float = 3.0) -> list[str]:
        # The change is dated at the horizon: that is when the silence was established.
        t = self._d.encode(horizon)

        def run(s: Session) -> list[str]:
            ids = sorted(str(dev) for (dev,) in s.rows(
                "UPDATE devices SET online = FALSE, online_changed_at = :now,"  # noqa: S608
                " updated_at = :now WHERE online = TRUE AND interval_s IS NOT NULL"
                f" AND last_received_at IS NOT NULL AND {self._d.silent} RETURNING device_id",
                {"now": t, "f": float(factor)}))
            s.each("INSERT INTO history (device_id, at, kind, detail_json) {rows}",
                   ("text", "instant", "text", "text"),
                   [(dev, t, "online_change", detail_json(online=False, cause="silence"))
                    for dev in ids])
            return ids

        return self._write(run)

    def put_inventory(self, inventory: InventoryRecord) -> None:
        inv, at = inventory, self._d.encode(inventory.updated_at)

        def run(s: Session) -> None:
            s.rows(_NEW_DEVICE, (inv.device_id, at, at))
            if self._d.lock_devices:  # serialises link replacement with record_statuses
                s.rows("SELECT 1 FROM devices d WHERE d.device_id = ? "  # noqa: S608
                       + self._d.lock_devices, (inv.device_id,))
            stored = s.count(
                "INSERT INTO inventories (device_id, digest, cas_json, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET"
                " digest = excluded.digest, cas_json = excluded.cas_json,"
                " updated_at = excluded.updated_at"
                " WHERE excluded.updated_at >= inventories.updated_at",
                (inv.device_id, inv.digest, inv.cas_json, at)) == 1
            if stored:  # a reordered older inventory must not replace the trust links
                plan = BatchPlan()
                current = {(str(r), str(h)) for r, h in s.rows(
                    "SELECT role, sha256 FROM device_certs WHERE device_id = ?",
                    (inv.device_id,))}
                plan_links(plan, inv.device_id, [CertLink(k, CertRole.TRUST) for k in inv.cas],
                           frozenset({CertRole.TRUST}), inv.updated_at, current)
                self._write_links(s, plan)

        self._write(run)

    def prune_seen(self, before: datetime) -> int:
        # Forget the one-by-one window of boots a device has left (not its current
        # boot, first seen before `before`): a late status of such a boot is then a
        # replay at or below its highest seq. The row stays, since its first sighting
        # orders it before the boots that followed.
        return self._write(lambda s: s.count(
            "UPDATE device_boots SET seen_bits = NULL WHERE seen_bits IS NOT NULL"
            " AND first_seen_at < ? AND NOT EXISTS (SELECT 1 FROM devices d WHERE"
            " d.device_id = device_boots.device_id AND d.boot_id = device_boots.boot_id)",
            (self._d.encode(before),)))

    def count_rejection(self, reason: str, *, at: datetime, topic: str, detail: str,
                        sample: bytes) -> None:
        args = {"r": clean_text(reason), "at": self._d.encode(at),
                "topic": clean_text(topic)[:512], "detail": clean_text(detail)[:2048],
                "sample": bytes(sample[:512]), "k": self._sample_limit}

        def run(s: Session) -> None:
            s.rows("INSERT INTO rejections (reason, count, last_at) VALUES (:r, 1, :at)"  # noqa: S608
                   " ON CONFLICT (reason) DO UPDATE SET count = rejections.count + 1,"
                   f" last_at = {self._d.greatest}(rejections.last_at, excluded.last_at)", args)
            s.rows("INSERT INTO reject_samples (at, reason, topic, detail, sample)"
                   " VALUES (:at, :r, :topic, :detail, :sample)", args)
            # Keep the newest K per reason: a flood of one kind must not grow the table.
            s.rows("DELETE FROM reject_samples WHERE reason = :r AND id <= (SELECT id FROM"
                   " reject_samples WHERE reason = :r ORDER BY id DESC LIMIT 1 OFFSET :k)", args)

        self._write(run)

    def put_scan(self, scan: ScanRecord) -> None:
        self._write(lambda s: s.rows(
            "INSERT INTO scans (target, scanned_at, severity, result_json)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (target) DO UPDATE SET"
            " scanned_at = excluded.scanned_at, severity = excluded.severity,"
            " result_json = excluded.result_json",
            (scan.target, self._d.encode(scan.scanned_at), int(scan.severity), scan.result_json)))

    def record_outage(self, outage: OutageRecord) -> None:
        o = outage
        args = {"c": clean_text(o.collector)[:256], "s": self._d.encode(o.started_at),
                "e": self._d.encode(o.ended_at), "h": int(o.messages_held),
                "err": clean_text(o.error)[:200], "k": _OUTAGES_KEPT}

        def run(s: Session) -> None:
            s.rows("INSERT INTO store_outages (collector, started_at, ended_at, messages_held,"
                   " error) VALUES (:c, :s, :e, :h, :err)", args)
            # The newest K: a flapping database must not grow the table.
            s.rows("DELETE FROM store_outages WHERE id <= (SELECT id FROM store_outages"
                   " ORDER BY id DESC LIMIT 1 OFFSET :k)", args)

        self._write(run)

    def try_claim(self, job: str, now: datetime, every_s: float) -> bool:
        args = (job, self._d.encode(now), self._d.encode(now - timedelta(seconds=every_s)))
        return bool(self._write(lambda s: s.rows(
            "INSERT INTO job_claims (job, claimed_at) VALUES (?, ?) ON CONFLICT (job)"
            " DO UPDATE SET claimed_at = excluded.claimed_at"
            " WHERE job_claims.claimed_at <= ? RETURNING job", args)))

    # ------------------------------------------------------------------ alerts

    def alert_fire(self, key: str, *, rule: str, device_id: str | None,
                   cert_sha256: str | None, severity: int, summary: str,
                   labels: Mapping[str, str], now: datetime,
                   renotify_interval_s: float | None) -> bool:
        args = {
            "key": key, "rule": rule, "dev": device_id, "sha": cert_sha256,
            "sev": int(severity), "summary": summary, "now": self._d.encode(now),
            "labels": json.dumps(dict(labels), sort_keys=True, separators=(",", ":")),
            "due": self._d.encode(_NEVER if renotify_interval_s is None
                                  else now - timedelta(seconds=renotify_interval_s)),
        }

        def run(s: Session) -> bool:
            # One conditional upsert: a row comes back only for a new alert, a re-fire
            # after resolve, a severity change or a due re-notification. In PostgreSQL
            # the conflicting row is locked and the WHERE re-read, so of N collectors
            # one gets the row; SQLite's writers are serialised anyway.
            notify = bool(s.rows(
                "INSERT INTO alerts (alert_key, rule, device_id, cert_sha256, severity, state,"
                " summary, labels_json, started_at, resolved_at, last_notified_at, notify_count,"
                " updated_at) VALUES (:key, :rule, :dev, :sha, :sev, 'firing', :summary,"
                " :labels, :now, NULL, :now, 1, :now)"
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
                " OR alerts.last_notified_at IS NULL OR alerts.last_notified_at <= :due"
                " RETURNING alert_key", args))
            if not notify:
                s.rows("UPDATE alerts SET summary = :summary, labels_json = :labels,"
                       " updated_at = :now WHERE alert_key = :key"
                       " AND (summary <> :summary OR labels_json <> :labels)", args)
            return notify

        return self._write(run)

    def alert_resolve(self, key: str, now: datetime) -> bool:
        return self._write(lambda s: s.count(
            "UPDATE alerts SET state = 'resolved', resolved_at = :now, updated_at = :now"
            " WHERE alert_key = :key AND state = 'firing'",
            {"now": self._d.encode(now), "key": key}) == 1)
