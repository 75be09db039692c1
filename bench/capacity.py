"""Capacity model (issue 18): what a fleet costs the store and the collector, measured.

Three measurements, each printed with the figures docs/capacity.md projects from:

1. **Fleet size** (`--devices`, default 100,000): every device's first status, as the
   ingest hands it to the store (a real signed status's JSON, its own client
   certificate and the shared CA chain), through `record_statuses` in batches of
   `--batch`; store bytes in total and per device, rows per device, statuses/s.
2. **Thirty days of one part of it** (`--sample` devices, default 50, time compressed:
   received_at injected, one status per device per 5 minutes, 8,640 each): the rows
   the store holds for those devices after each simulated day (they must stay
   constant: the replay guard is a window per boot, history rows are for changes
   only) and the store's bytes. The full fleet over 30 days is 864 million statuses,
   hours of work: the sample shows the per-device cost does not grow, phase 1 what
   it is.
3. **Collector CPU per status** (`--cpu-devices` × `--cpu-rounds` pre-signed statuses
   through `Ingestor.process`: topic, admission, signature verification, store
   write): CPU µs per status (this process's CPU time, store included, SQLite) and so
   CPU-seconds per device per day at a 5-minute interval.

Both backends: SQLite in a temporary file; PostgreSQL at --pg-url (default the
machine's `test` database at 127.0.0.1:5432) in a schema of its own, dropped after.

    .venv/bin/python bench/capacity.py                       # the defaults above
    .venv/bin/python bench/capacity.py --devices 10000 --sample 20 --backends sqlite
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit (bench/README.md)

from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402
from kit.fleet import make_ca, make_devices, signed_status  # noqa: E402

from certmon import wire as p  # noqa: E402
from certmon.mqtt import Incoming  # noqa: E402
from collector.admission import Budget  # noqa: E402
from collector.ingest import Ingestor  # noqa: E402
from collector.store import (  # noqa: E402
    CertLink,
    CertRole,
    CertRow,
    StatusRecord,
    open_store,
)
from collector.store.sql import SqlStore  # noqa: E402
from collector.verify import CertCache  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL_S = 300
_DER = Encoding.DER
PER_DAY = 86_400 // INTERVAL_S


@dataclass
class Backend:
    name: str
    url: str
    size: Callable[[], int]  # store bytes now
    close: Callable[[], None]


def backends(names: list[str], pg_url: str, tmp: Path) -> Iterator[Backend]:
    for name in names:
        if name == "sqlite":
            db = tmp / f"capacity-{secrets.token_hex(3)}.db"

            def sqlite_size(db: Path = db) -> int:
                import sqlite3

                with sqlite3.connect(db) as conn:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    pages, free = (conn.execute(f"PRAGMA {q}").fetchone()[0]
                                   for q in ("page_count", "freelist_count"))
                    size = conn.execute("PRAGMA page_size").fetchone()[0]
                return int((pages - free) * size)

            yield Backend("sqlite", f"sqlite:///{db}", sqlite_size, lambda db=db: db.unlink())
        else:
            import psycopg

            schema = f"certmon_capacity_{secrets.token_hex(4)}"
            admin = psycopg.connect(pg_url, autocommit=True)
            admin.execute(f"CREATE SCHEMA {schema}")

            def pg_size(schema: str = schema, admin: psycopg.Connection = admin) -> int:
                admin.execute(f"VACUUM (ANALYZE) {schema}.devices")  # dead tuples out
                for table in ("device_boots", "device_certs", "certificates", "history"):
                    admin.execute(f"VACUUM {schema}.{table}")
                row = admin.execute(
                    "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN"
                    " pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
                    " AND c.relkind = 'r'", (schema,)).fetchone()
                return int(row[0] if row and row[0] else 0)

            def pg_drop(schema: str = schema, admin: psycopg.Connection = admin) -> None:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")
                admin.close()

            yield Backend("postgres", f"{pg_url}?options=-csearch_path%3D{schema}",
                          pg_size, pg_drop)


class Fleet:
    """Statuses as the ingest records them, for any number of devices: one real
    signed status's JSON as the template (its size is what the store keeps)."""

    def __init__(self) -> None:
        now = T0
        self.ca = make_ca("capacity root", now)
        (dev,) = make_devices(self.ca, 1, now, prefix="cap")
        token = signed_status(dev, 1, now, interval_s=INTERVAL_S)
        self.template = p.parse_jws(token, 65536).payload.decode()
        self.template_device = dev.device_id
        self.ca_row = CertRow(sha256="c" * 64, subject="CN=capacity root",
                              issuer="CN=capacity root",
                              not_before=now, not_after=now + timedelta(days=3650), is_ca=True,
                              der=self.ca.cert.public_bytes(_DER))
        self.leaf_der = dev.cert.public_bytes(_DER)

    def record(self, i: int, seq: int, at: datetime, *, with_certs: bool) -> StatusRecord:
        device = f"dev-{i:07d}"
        leaf = CertRow(sha256=f"{i:064x}", subject=f"CN={device}", issuer="CN=capacity root",
                       not_before=T0, not_after=T0 + timedelta(days=365), key_type="EC",
                       key_bits=256, signature_algorithm="ecdsa-with-SHA256", is_ca=False,
                       der=self.leaf_der)
        body = self.template.replace(self.template_device, device)
        return StatusRecord(
            device_id=device, boot_id="b" * 32, seq=seq, device_ts=at, received_at=at,
            interval_s=INTERVAL_S, status_json=body.replace('"seq":1', f'"seq":{seq}', 1),
            severity=0, client_sha256=leaf.sha256, trust_digest="d" * 64,
            certs=(CertLink(leaf, CertRole.CLIENT), CertLink(self.ca_row, CertRole.CHAIN))
            if with_certs else ())



def fleet_size(b: Backend, fleet: Fleet, n: int, batch: int) -> dict[str, float]:
    store = open_store(b.url)
    store.migrate()
    empty = b.size()
    start = time.perf_counter()
    for lo in range(0, n, batch):
        store.record_statuses([
            fleet.record(i, 1, T0 + timedelta(seconds=i % INTERVAL_S), with_certs=True)
            for i in range(lo, min(n, lo + batch))])
    took = time.perf_counter() - start
    assert isinstance(store, SqlStore)
    rows = store.table_rows()
    store.close()
    total = b.size() - empty
    return {"devices": n, "bytes_total": total, "bytes_per_device": total / n,
            "rows_per_device": rows / n, "first_statuses_per_s": n / took}


def thirty_days(b: Backend, fleet: Fleet, sample: int, days: int) -> list[tuple[int, int, int]]:
    """(day, rows for the sample, store bytes) after each simulated day."""
    store = open_store(b.url)
    store.migrate()
    assert isinstance(store, SqlStore)
    out = []
    rounds_per_batch = 5
    for day in range(days):
        for r0 in range(0, PER_DAY, rounds_per_batch):
            recs = []
            for r in range(r0, min(PER_DAY, r0 + rounds_per_batch)):
                k = day * PER_DAY + r
                at = T0 + timedelta(seconds=k * INTERVAL_S)
                recs += [fleet.record(i, k + 1, at + timedelta(seconds=i), with_certs=k == 0)
                         for i in range(sample)]
            store.record_statuses(recs)
        out.append((day + 1, store.table_rows(), b.size()))
    store.close()
    return out


def cpu_per_status(url: str, devices: int, rounds: int) -> dict[str, float]:
    now = datetime.now(UTC)
    ca = make_ca("capacity cpu root", now)
    devs = make_devices(ca, devices, now, prefix="cpu")
    certs = CertCache([ca.cert])
    for d in devs:
        certs.add([d.cert, *d.chain], now)
    msgs = [Incoming(p.status_topic(p.DEFAULT_PREFIX, d.device_id),
                     signed_status(d, k + 1, now, interval_s=INTERVAL_S), False, 1,
                     received_at=now + timedelta(seconds=k * INTERVAL_S))
            for k in range(rounds) for d in devs]
    store = open_store(url)
    store.migrate()
    ingest = Ingestor(store, certs, now=lambda: now, budget=Budget())
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for lo in range(0, len(msgs), 256):
        ingest.process(msgs[lo:lo + 256])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    store.close()
    assert ingest.accepted == len(msgs), (ingest.accepted, ingest.rejected_counts())
    us = cpu / len(msgs) * 1e6
    return {"statuses": len(msgs), "cpu_us_per_status": us, "statuses_per_s": len(msgs) / wall,
            "cpu_s_per_device_day": us * PER_DAY / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--sample", type=int, default=50)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--cpu-devices", type=int, default=2_000)
    ap.add_argument("--cpu-rounds", type=int, default=3)
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    fleet = Fleet()
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in backends(args.backends.split(","), args.pg_url, Path(tmp)):
            try:
                size = fleet_size(b, fleet, args.devices, args.batch)
                print(f"[{b.name}] fleet of {size['devices']:,}: "
                      f"{size['bytes_total'] / 1e6:.1f} MB,"
                      f" {size['bytes_per_device']:.0f} B/device, {size['rows_per_device']:.2f}"
                      f" rows/device, first statuses {size['first_statuses_per_s']:,.0f}/s",
                      flush=True)
            finally:
                b.close()
            b2 = next(backends([b.name], args.pg_url, Path(tmp)))
            try:
                start = time.perf_counter()
                days = thirty_days(b2, fleet, args.sample, args.days)
                took = time.perf_counter() - start
                statuses = args.sample * PER_DAY * args.days
                rows = sorted({r for _d, r, _s in days})
                print(f"[{b.name}] {args.sample} devices x {args.days} days ({statuses:,} "
                      f"statuses, {statuses / took:,.0f}/s): rows after each day {rows} "
                      f"({'constant' if len(rows) == 1 else 'GROWING'}), "
                      f"{rows[-1] / args.sample:.2f} rows/device; bytes day 1 {days[0][2]:,}, "
                      f"day {args.days} {days[-1][2]:,}", flush=True)
            finally:
                b2.close()
            b3 = next(backends([b.name], args.pg_url, Path(tmp)))
            try:
                cpu = cpu_per_status(b3.url, args.cpu_devices, args.cpu_rounds)
                print(f"[{b.name}] ingest of {cpu['statuses']:,} signed statuses: "
                      f"{cpu['cpu_us_per_status']:.0f} µs CPU/status, "
                      f"{cpu['statuses_per_s']:,.0f} statuses/s, "
                      f"{cpu['cpu_s_per_device_day']:.3f} CPU-s/device/day", flush=True)
            finally:
                b3.close()
            report[b.name] = {"fleet": size, "days": days, "cpu": cpu}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
