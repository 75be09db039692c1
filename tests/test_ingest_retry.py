"""Ingest across a store outage, piece by piece, on a real SQLite file.

The outage is real: a second connection holds the database's write lock (`BEGIN
EXCLUSIVE`), so the store's writes fail with SQLITE_BUSY after its busy timeout, which
the store reports as `StoreUnavailable`. The whole story with a stopped PostgreSQL
and a full disk is tests/test_faults_postgres.py's; here: a plan resumes at its first
undone effect (listeners told once, rejections counted once), the inbox's bound and
watermark, the health transitions and processing clock, and the effect of
`ingest.store_retry_max_s`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kit.broker import wait_until
from kit.fleet import SimDevice, cert_message, make_ca, make_device, signed_status

from certmon import clock as wallclock
from certmon import wire as p
from certmon.config import loads
from certmon.mqtt import Incoming, LinkSettings, MqttLink
from collector.backlog import Backlog
from collector.config import CollectorConfig
from collector.ingest import Ingestor, Stored
from collector.service import CollectorService, Listeners
from collector.store import StoreUnavailable
from collector.store.sqlite import SqliteStore
from collector.storehealth import (
    StoreHealth,
    came_back,
    processing_clock,
    retry_delay_s,
    status_text,
    went_down,
)
from collector.verify import CertCache

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PREFIX = p.DEFAULT_PREFIX


class WriteLock:
    """Another process's transaction holding the database's one write lock."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def take(self) -> None:
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("COMMIT")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[SqliteStore, WriteLock]]:
    path = tmp_path / "certmon.db"
    store = SqliteStore(str(path), busy_timeout_s=0.05)
    store.migrate()
    lock = WriteLock(path)
    yield store, lock
    lock.conn.close()
    store.close()


@pytest.fixture(scope="module")
def device() -> tuple[CertCache, SimDevice]:
    now = datetime.now(UTC)
    ca = make_ca("retry-ca", now)
    return CertCache([ca.cert]), make_device(ca, "gw-retry", now)


def msg(topic: str, payload: bytes, at: datetime) -> Incoming:
    return Incoming(topic, payload, False, 1, received_at=at)


def test_a_plan_resumes_at_its_first_undone_effect(
        db: tuple[SqliteStore, WriteLock], device: tuple[CertCache, SimDevice]) -> None:
    store, lock = db
    certs, dev = device
    now = datetime.now(UTC)
    told: list[str] = []

    def on_stored(stored: Sequence[Stored]) -> None:
        told.append(f"stored {[s.record.seq for s in stored]}")
        if len(told) == 1:
            lock.take()  # the database goes away right after the first transaction

    def on_online(device_id: str, online: bool, at: datetime) -> None:
        told.append(f"online {online}")

    ingest = Ingestor(store, certs, now=lambda: now, on_stored=on_stored, on_online=on_online)
    status_topic = p.status_topic(PREFIX, dev.device_id)
    batch = [
        msg(p.cert_topic(PREFIX, dev.device_id), cert_message(dev), now),
        msg(status_topic, signed_status(dev, 1, now), now),
        msg(status_topic, b"not a jws", now + timedelta(seconds=1)),
        msg(status_topic, signed_status(dev, 2, now), now + timedelta(seconds=2)),
        msg(p.online_topic(PREFIX, dev.device_id), p.online_payload(False),
            now + timedelta(seconds=3)),
        msg(status_topic, signed_status(dev, 3, now), now + timedelta(seconds=4)),
    ]
    plan = ingest.decide(batch)
    # One transaction for the run of statuses 1 and 2 (the bad one is rejected after it),
    # the online change, the status after it.
    assert [type(e).__name__ for e in plan.effects] == ["Statuses", "Reject", "Online",
                                                         "Statuses"]
    with pytest.raises(StoreUnavailable):
        ingest.apply(plan)
    assert told == ["stored [1, 2]"]
    assert store.seen_seqs(dev.device_id) == [("sim-boot", 1), ("sim-boot", 2)]
    assert ingest.rejected == {}  # the rejection's store write failed: not counted yet
    with pytest.raises(StoreUnavailable):
        ingest.apply(plan)  # still down: nothing more happens, nothing twice
    assert told == ["stored [1, 2]"] and ingest.accepted == 2
    lock.release()
    ingest.apply(plan)
    assert plan.is_done
    assert told == ["stored [1, 2]", "online False", "stored [3]"]
    assert ingest.accepted == 3 and ingest.rejected == {"not_jws": 1}
    assert store.rejection_counts() == {"not_jws": 1}
    assert [seq for _, seq in store.seen_seqs(dev.device_id)] == [1, 2, 3]
    row = store.device(dev.device_id)
    assert row is not None and row.seq == 3 and row.is_online  # the status after the LWT
    # Received is when each message arrived, not when the retry stored it.
    assert row.last_received_at == now + timedelta(seconds=4)
    ingest.apply(plan)  # a done plan does nothing
    assert told[-1] == "stored [3]" and ingest.accepted == 3


def test_the_inbox_bounds_memory_and_knows_the_oldest_unstored() -> None:
    clock = iter(T0 + timedelta(seconds=i) for i in range(100))
    inbox = Backlog(lambda: next(clock), maxlen=3)
    for i in range(3):
        inbox.put(Incoming(f"t/{i}", b"", False, 1))
    batch = inbox.take(2, 0.1, 0.0)
    assert [m.topic for m in batch] == ["t/0", "t/1"] and len(inbox) == 3
    assert inbox.oldest_at() == T0  # taken is not stored: still the watermark
    assert [m.topic for m in inbox.take(5, 0.1, 0.0)] == ["t/2"]
    blocked = threading.Thread(target=inbox.put, args=(Incoming("t/3", b"", False, 1),))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive() and len(inbox) == 3  # full: paho's thread waits, no drop
    inbox.done(2)
    blocked.join(5)
    assert not blocked.is_alive() and len(inbox) == 2
    assert inbox.oldest_at() == T0 + timedelta(seconds=2)
    inbox.done(1)
    assert [m.topic for m in inbox.take(5, 0.1, 0.0)] == ["t/3"]
    assert inbox.take(5, 0.05, 0.0) == []  # nothing new
    inbox.done(1)
    assert inbox.oldest_at() is None
    full = Backlog(lambda: T0, maxlen=1)
    full.put(Incoming("a", b"", False, 1))
    stuck = threading.Thread(target=full.put, args=(Incoming("b", b"", False, 1),))
    stuck.start()
    full.close()  # shutdown lets paho's thread go; the message stays unacknowledged
    stuck.join(5)
    assert not stuck.is_alive() and len(full) == 1


def test_health_transitions_and_the_processing_clock() -> None:
    h = StoreHealth()
    assert processing_clock(h, T0) == T0
    down = went_down(h, T0, "OperationalError", 5)
    assert (down.is_up, down.outages, down.held_max) == (False, 1, 5)
    down = went_down(down, T0 + timedelta(seconds=10), "OperationalError", 20)
    assert (down.outages, down.held, down.held_max, down.since_at) == (1, 20, 20, T0)
    # Stopped while down; after the return it runs at double speed until caught up.
    assert processing_clock(down, T0 + timedelta(seconds=30)) == T0
    up = came_back(down, T0 + timedelta(seconds=30), "collector-a")
    assert up.last_outage is not None and up.last_outage.duration_s == 30
    assert up.last_outage.messages_held == 20 and up.last_outage.error == "OperationalError"
    assert processing_clock(up, T0 + timedelta(seconds=40)) == T0 + timedelta(seconds=20)
    assert processing_clock(up, T0 + timedelta(seconds=60)) == T0 + timedelta(seconds=60)
    assert processing_clock(up, T0 + timedelta(seconds=90)) == T0 + timedelta(seconds=90)
    assert came_back(up, T0, "x") is up  # already up: no outage
    # A second outage before the clock caught up stops it where it stood.
    again = went_down(up, T0 + timedelta(seconds=35), "DiskFull", 1)
    assert again.outages == 2 and again.clock_at == T0 + timedelta(seconds=10)
    assert status_text(again, 7, T0 + timedelta(seconds=45)) == (
        "store unavailable for 10 s (DiskFull): holding 7 messages unacknowledged, none lost")
    assert status_text(up, 0, T0) == ("ingesting; last store outage 30 s, 20 messages held")
    assert status_text(StoreHealth(), 0, T0) == "ingesting"


def test_retry_back_off_doubles_up_to_its_cap() -> None:
    assert [retry_delay_s(n, 30) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert [retry_delay_s(n, 0.2) for n in (1, 5)] == [0.2, 0.2]
    assert retry_delay_s(10_000, 30) == 30  # no overflow after a long outage


@pytest.mark.parametrize(("retry_max_s", "back_within_s"), [(0.2, (0.0, 0.5)),
                                                              (2.0, (0.6, 2.5))])
def test_store_retry_max_s_caps_the_wait_after_the_store_returns(
        db: tuple[SqliteStore, WriteLock], device: tuple[CertCache, SimDevice],
        retry_max_s: float, back_within_s: tuple[float, float]) -> None:
    """`ingest.store_retry_max_s`: with 0.2 the held batch is stored within ~0.2 s of
    the store's return; with 2 (tries at 0.5, 1.5, 3.5 s) it waits for the next try."""
    store, lock = db
    certs, dev = device
    config = loads(CollectorConfig, "", overrides={
        "mqtt.broker": "mqtt://127.0.0.1:1", "tls.fleet_ca": __file__, "tls.ca_bundle": __file__,
        "tls.cert": __file__, "tls.key": __file__,  # never read: the link is plain
        "ingest.store_retry_max_s": str(retry_max_s)})
    clock = wallclock.SystemClock()
    inbox = Backlog(clock.now)
    link = MqttLink(LinkSettings("127.0.0.1", 1, "retry-test", is_tls=False))  # not started
    ingest = Ingestor(store, certs, now=clock.now)
    service = CollectorService(config, store=store, clock=clock, link=link, inbox=inbox,
                               ingestor=ingest, listeners=Listeners([]))
    now = clock.now()
    ingest.process([msg(p.cert_topic(PREFIX, dev.device_id), cert_message(dev), now)])
    lock.take()
    service.start()  # the link retries its broker (there is none) in the background
    try:
        inbox.put(Incoming(p.status_topic(PREFIX, dev.device_id), signed_status(dev, 1, now),
                           False, 1))
        assert wait_until(lambda: not service.health.get().is_up, 5)
        time.sleep(2.6 - 0.05)
        assert store.seen_count(dev.device_id) == 0 and len(inbox) == 1  # held
        released = time.monotonic()
        lock.release()
        assert wait_until(lambda: store.seen_count(dev.device_id) == 1, 10)
        took = time.monotonic() - released
        assert back_within_s[0] <= took <= back_within_s[1], took
        assert wait_until(lambda: len(inbox) == 0, 5)  # acknowledged, forgotten
        assert service.health.get().is_up and service.health.get().outages == 1
    finally:
        service.close()
