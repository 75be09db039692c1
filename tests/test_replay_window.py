"""The replay guard's window (collector.store.plan.SeqWindow), on both backends.

A boot's highest seq plus a bitmap of the REORDER_WINDOW seqs below it: a reordered
status inside the window is new once, one further below the highest is a replay, a
new boot starts a window of its own, and the rows a device costs stay constant
however many statuses it sends (the O(1) promise of docs/store.md, "Replay guard").
"""

from __future__ import annotations

from datetime import timedelta

import test_store_contract as contract  # the store fixtures, both backends
from test_store_contract import T0, Db, status

from collector.store import Store
from collector.store.dialect import Session, migrations
from collector.store.plan import REORDER_WINDOW, SeqWindow
from collector.store.sql import SqlStore

# The contract's fixtures: every test here runs on SQLite and on PostgreSQL.
pg_admin, db, store = contract.pg_admin, contract.db, contract.store


def test_window_admits_each_seq_once_and_forgets_beyond_its_width() -> None:
    w = SeqWindow(None)
    assert [w.admit(q) for q in (10, 10, 8, 8, 9, 11, 9)] == [
        True, False, True, False, True, True, False]
    assert w.seqs() == [8, 9, 10, 11]
    high = 20 + REORDER_WINDOW  # the window now spans seqs 20 … high - 1
    assert w.admit(high)
    assert not w.admit(19)  # below the window: a replay, though never sent
    assert w.admit(20)  # the window's last slot, never seen
    assert w.admit(high - 1) and not w.admit(high - 1)
    assert SeqWindow.from_row(w.high, w.blob()) == w  # the stored form round-trips
    assert not SeqWindow.from_row(5, None).admit(4)  # NULL bitmap: all below seen


def test_reorder_within_window_accepted_beyond_rejected(store: Store) -> None:
    assert store.record_statuses([status("dev1", REORDER_WINDOW + 10, 0)]) == [True]
    late = [status("dev1", q, 1) for q in (REORDER_WINDOW + 9, 10, 9, 10)]
    assert store.record_statuses(late) == [True, True, False, False]
    dev = store.device("dev1")
    assert dev is not None and dev.seq == REORDER_WINDOW + 10  # late ones change nothing


def test_share_group_writers_agree_on_each_seq(store: Store) -> None:
    # Interleaved, as two collectors of a group would deliver them: each seq once.
    first = store.record_statuses([status("dev1", q, q) for q in range(1, 40, 2)])
    second = store.record_statuses([status("dev1", q, q) for q in range(40, 0, -1)])
    assert all(first) and sum(second) == 20
    assert [q for _, q in store.seen_seqs("dev1")] == list(range(1, 41))


def test_rows_per_device_constant_over_30_days(store: Store) -> None:
    assert isinstance(store, SqlStore)
    rows: list[int] = []
    # 30 days at a 5-minute interval, in daily batches of 288 statuses.
    for day in range(30):
        batch = [status("dev1", day * 288 + i + 1, day * 86400 + i * 300, interval_s=300)
                 for i in range(288)]
        assert all(store.record_statuses(batch))
        rows.append(store.table_rows())
    assert len(set(rows)) == 1, rows
    assert store.device("dev1") is not None
    assert store.history("dev1", limit=10)[0].kind == "first_status"  # changes only
    assert store.prune_seen(T0 + timedelta(days=31)) == 0  # the current boot stays exact


def test_migration_0003_keeps_each_boots_highest_seq(db: Db) -> None:
    """From a schema-2 database with status_seen rows: the highest seq of a boot is
    kept exactly, below it every seq counts as seen, the old table is gone."""
    store = db.open()
    assert isinstance(store, SqlStore)
    enc = store._d.encode

    def schema_2(s: Session) -> None:
        s.script(store._d.migrations_table)
        for version, script in migrations(store._d.name):
            if version <= 2:
                store._run_script(s, script)
                s.rows("INSERT INTO schema_migrations (version) VALUES (?)", (version,))
        s.rows("INSERT INTO devices (device_id, first_seen_at, updated_at) VALUES"
               " ('dev1', ?, ?)", (enc(T0), enc(T0)))
        s.rows("INSERT INTO device_boots VALUES ('dev1', 'b1', ?)", (enc(T0),))
        for q in (3, 5, 7):
            s.rows("INSERT INTO status_seen VALUES ('dev1', 'b1', ?, ?, ?)",
                   (q, enc(T0), enc(T0)))

    store._write(schema_2)
    store.migrate()
    assert store.seen_seqs("dev1") == [("b1", q) for q in range(8)]
    assert store.record_statuses([status("dev1", 6, 10), status("dev1", 8, 11)]) == [
        False, True]
    assert store.seen_seqs("dev1")[-1] == ("b1", 8)
