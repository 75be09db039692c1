"""The store's read side, written once: every query of the contract over a `Dialect`.

Owns the `Store` queries (devices, certificates, alerts, history, inventories, scans,
rejection counts, store outages), the inspections only tests use (`seen_count`, `seen_seqs`,
`devices_holding_count`, `rejection_samples`, `integrity_check`: methods of the shared
implementation, left out of the `Store` Protocol) and the decoding of rows to records.
It must not write, open connections or name a backend: `SqlQueries._read` is the
backend's snapshot, and what differs between databases is the dialect's.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from collector.store import (
    SEVERITY_NAMES,
    AlertRow,
    CertHolding,
    CertLink,
    CertRole,
    CertRow,
    DeviceOrder,
    DeviceRow,
    FindingRecord,
    HistoryRow,
    InventoryRecord,
    OutageRecord,
    RejectSample,
    ScanRecord,
)
from collector.store.dialect import Dialect, Row, Session
from collector.store.plan import SeqWindow

# SQL below is assembled only from this module's constants and the dialect's (column
# lists, _ORDER), never from arguments: hence the `noqa: S608` on those lines.
_T = TypeVar("_T")
_ORDER: dict[str, str] = {  # a literal map: order_by never reaches SQL as text
    "severity": "severity DESC, device_id",
    "device_id": "device_id",
    "last_received_at": "last_received_at DESC NULLS LAST, device_id",
}
ALERT_COLUMNS = ("alert_key, rule, device_id, cert_sha256, severity, state, summary, labels_json, "
                 "started_at, resolved_at, last_notified_at, notify_count, updated_at")
DEVICE_COLUMNS = (
    "device_id, first_seen_at, last_received_at, last_status_ts, boot_id, seq, interval_s, "
    "online, online_changed_at, severity, worst_code, findings_json, status_json, "
    "client_sha256, trust_digest, clock_offset_lo_s, clock_offset_hi_s, clock_offset_at, "
    "updated_at")
CERT_COLUMNS = ("sha256, subject, not_before, not_after, issuer, serial_hex, key_type, key_bits, "
                "signature_algorithm, is_ca, is_self_issued")
_C_CERT_COLUMNS = ", ".join("c." + col for col in CERT_COLUMNS.split(", "))


def findings_from_json(text: str | None) -> tuple[FindingRecord, ...]:
    return tuple(FindingRecord(c, s, h, m) for c, s, h, m in json.loads(text or "[]"))


def _where(*conds: tuple[str, object]) -> tuple[str, list[object]]:
    """' WHERE a = ? AND …' of the conditions whose value is not None (None: any)."""
    used = [(sql, v) for sql, v in conds if v is not None]
    return ((" WHERE " + " AND ".join(sql for sql, _ in used)) if used else "",
            [v for _, v in used])


_FLEET_TABLES = ("devices", "device_boots", "device_certs", "certificates", "history")


class SqlQueries(abc.ABC):
    """The read half of `SqlStore`; a backend supplies `_read`."""

    def __init__(self, dialect: Dialect) -> None:
        self._d = dialect

    @abc.abstractmethod
    def _read(self, fn: Callable[[Session], _T]) -> _T:
        """`fn` in one read snapshot."""

    def _rows(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return self._read(lambda s: s.rows(sql, args))

    # ------------------------------------------------------------------ alerts

    def active_alerts(self) -> list[AlertRow]:
        return self._alerts(" WHERE state = 'firing' ORDER BY severity DESC, started_at,"
                            " alert_key", [])

    def alert_history(self, device_id: str | None = None, limit: int = 100) -> list[AlertRow]:
        where, args = _where(("device_id = ?", device_id))
        return self._alerts(f"{where} ORDER BY updated_at DESC, alert_key LIMIT ?",
                            [*args, limit])

    def _alerts(self, tail: str, args: list[object]) -> list[AlertRow]:
        rows = self._rows(f"SELECT {ALERT_COLUMNS} FROM alerts{tail}", args)  # noqa: S608
        return [self._alert(r) for r in rows]

    # ------------------------------------------------------------------ queries

    def device(self, device_id: str) -> DeviceRow | None:
        rows = self._rows(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?",  # noqa: S608
                          (device_id,))
        return self._device(rows[0]) if rows else None

    def devices(self, limit: int | None = None, offset: int = 0,
                order_by: DeviceOrder = "severity") -> list[DeviceRow]:
        rows = self._rows(f"SELECT {DEVICE_COLUMNS} FROM devices ORDER BY {_ORDER[order_by]}"  # noqa: S608
                          " LIMIT ? OFFSET ?", (self._d.no_limit if limit is None else limit,
                                                offset))
        return [self._device(r) for r in rows]

    def device_certs(self, device_id: str) -> list[CertLink]:
        rows = self._rows(f"SELECT {_C_CERT_COLUMNS}, dc.role FROM device_certs dc"  # noqa: S608
                          " JOIN certificates c ON c.sha256 = dc.sha256 WHERE dc.device_id = ?"
                          " ORDER BY dc.role, c.not_after", (device_id,))
        return [CertLink(self._cert(r), CertRole(r[-1])) for r in rows]

    def certificate(self, sha256: str) -> CertRow | None:
        rows = self._rows(f"SELECT {CERT_COLUMNS}, der FROM certificates WHERE sha256 = ?",  # noqa: S608
                          (sha256,))
        return self._cert(rows[0], rows[0][-1]) if rows else None

    def certificates_expiring_before(self, t: datetime,
                                     role: CertRole | None = None) -> list[CertHolding]:
        where, args = _where(("c.not_after < ?", self._d.encode(t)),
                             ("dc.role = ?", None if role is None else str(role)))
        rows = self._rows(f"SELECT {_C_CERT_COLUMNS}, dc.device_id, dc.role FROM certificates c"  # noqa: S608
                          f" JOIN device_certs dc ON dc.sha256 = c.sha256{where}"
                          " ORDER BY c.not_after, dc.device_id, dc.role", args)
        return [CertHolding(self._cert(r), r[-2], CertRole(r[-1])) for r in rows]

    def holders(self, sha256: str) -> list[tuple[str, CertRole]]:
        rows = self._rows("SELECT device_id, role FROM device_certs WHERE sha256 = ?"
                          " ORDER BY device_id, role", (sha256,))
        return [(dev, CertRole(role)) for dev, role in rows]

    def fleet_counts(self) -> dict[str, int]:
        """{"total", "online", "offline", "ok", "warning", …}: device counts."""
        out = dict.fromkeys(("total", "online", "offline", *SEVERITY_NAMES.values()), 0)
        for severity, online, n in self._rows("SELECT severity, online, count(*) FROM devices"
                                              " GROUP BY severity, online"):
            out["total"] += n
            out["online" if online else "offline"] += n
            out[SEVERITY_NAMES[int(severity)]] += n
        return out

    def history(self, device_id: str | None = None, limit: int = 100) -> list[HistoryRow]:
        where, args = _where(("device_id = ?", device_id))
        rows = self._rows("SELECT id, device_id, at, kind, detail_json FROM history"  # noqa: S608
                          f"{where} ORDER BY id DESC LIMIT ?", [*args, limit])
        return [HistoryRow(int(i), dev, self._d.decode(at), kind, json.loads(d))
                for i, dev, at, kind, d in rows]

    def inventory(self, device_id: str) -> InventoryRecord | None:
        rows = self._rows("SELECT digest, cas_json, updated_at FROM inventories"
                          " WHERE device_id = ?", (device_id,))
        return (InventoryRecord(device_id, rows[0][0], rows[0][1], self._d.decode(rows[0][2]))
                if rows else None)

    def devices_with_inventory(self) -> set[str]:
        return {str(dev) for (dev,) in self._rows("SELECT device_id FROM inventories")}

    def scans(self) -> list[ScanRecord]:
        rows = self._rows("SELECT target, scanned_at, severity, result_json FROM scans"
                          " ORDER BY target")
        return [ScanRecord(t, self._d.decode(at), int(sev), res) for t, at, sev, res in rows]

    def rejection_counts(self) -> dict[str, int]:
        return {r: int(n) for r, n in self._rows("SELECT reason, count FROM rejections")}

    def store_outages(self, limit: int = 10) -> list[OutageRecord]:
        rows = self._rows("SELECT collector, started_at, ended_at, messages_held, error"
                          " FROM store_outages ORDER BY id DESC LIMIT ?", (limit,))
        return [OutageRecord(c, self._d.decode(s), self._d.decode(e), int(h), err)
                for c, s, e, h, err in rows]

    # ------------------------------------------------ inspections (tests, not the Protocol)

    def seen_count(self, device_id: str) -> int:
        return len(self.seen_seqs(device_id))

    def seen_seqs(self, device_id: str) -> list[tuple[str, int]]:
        """(boot_id, seq) the replay guard knows as seen, boots in the order first seen:
        every seq of a boot while it spans fewer than REORDER_WINDOW + 1 seqs."""
        rows = self._rows("SELECT boot_id, high_seq, seen_bits FROM device_boots"
                          " WHERE device_id = ? ORDER BY first_seen_at, boot_id", (device_id,))
        return [(b, q) for b, h, w in rows for q in SeqWindow.from_row(
            None if h is None else int(h), None if w is None else bytes(w)).seqs()]

    def table_rows(self) -> int:
        """Rows in the tables that grow with the fleet (devices, their boots, links,
        history): what tests/test_replay_window.py and bench/capacity.py watch."""
        return sum(int(self._rows(f"SELECT count(*) FROM {t}")[0][0])  # noqa: S608
                   for t in _FLEET_TABLES)

    def devices_holding_count(self, sha256: str, role: CertRole | None = None) -> int:
        where, args = _where(("sha256 = ?", sha256),
                             ("role = ?", None if role is None else str(role)))
        rows = self._rows(f"SELECT count(DISTINCT device_id) FROM device_certs{where}", args)  # noqa: S608
        return int(rows[0][0])

    def rejection_samples(self, reason: str | None = None, limit: int = 50) -> list[RejectSample]:
        where, args = _where(("reason = ?", reason))
        rows = self._rows("SELECT id, at, reason, topic, detail, sample FROM reject_samples"  # noqa: S608
                          f"{where} ORDER BY id DESC LIMIT ?", [*args, limit])
        return [RejectSample(int(i), self._d.decode(at), r, t, d, bytes(b))
                for i, at, r, t, d, b in rows]

    def integrity_check(self) -> bool:
        return self._rows(self._d.integrity_sql) == [("ok",)]

    # ------------------------------------------------------------------ row decoding

    def _opt(self, value: object) -> datetime | None:
        return None if value is None else self._d.decode(value)

    def _alert(self, v: Row) -> AlertRow:
        return AlertRow(v[0], v[1], v[2], v[3], int(v[4]), v[5], v[6], json.loads(v[7]),
                        self._d.decode(v[8]), self._opt(v[9]), self._opt(v[10]), int(v[11]),
                        self._d.decode(v[12]))

    def _device(self, v: Row) -> DeviceRow:
        return DeviceRow(
            device_id=v[0], first_seen_at=self._d.decode(v[1]), last_received_at=self._opt(v[2]),
            last_status_ts=self._opt(v[3]), boot_id=v[4], seq=v[5], interval_s=v[6],
            is_online=bool(v[7]), online_changed_at=self._opt(v[8]), severity=int(v[9]),
            worst_code=v[10], findings=findings_from_json(v[11]), status_json=v[12],
            client_sha256=v[13], trust_digest=v[14], clock_offset_lo_s=v[15],
            clock_offset_hi_s=v[16], clock_offset_at=self._opt(v[17]),
            updated_at=self._d.decode(v[18]))

    def _cert(self, v: Row, der: bytes | None = None) -> CertRow:
        return CertRow(sha256=v[0], subject=v[1], not_before=self._d.decode(v[2]),
                       not_after=self._d.decode(v[3]), issuer=v[4], serial_hex=v[5],
                       key_type=v[6], key_bits=v[7], signature_algorithm=v[8],
                       is_ca=None if v[9] is None else bool(v[9]),
                       is_self_issued=None if v[10] is None else bool(v[10]), der=der)
