"""sd_notify against a real AF_UNIX datagram socket, as systemd would bind it."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from certmon import systemd


def receive(sock: socket.socket) -> bytes:
    sock.settimeout(2.0)
    return sock.recv(4096)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = tmp_path / "notify"
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_each_helper_sends_its_datagram(notify_socket: socket.socket) -> None:
    assert systemd.ready()
    assert receive(notify_socket) == b"READY=1"
    assert systemd.watchdog()
    assert receive(notify_socket) == b"WATCHDOG=1"
    assert systemd.stopping()
    assert receive(notify_socket) == b"STOPPING=1"
    assert systemd.notify("RELOADING=1\nMONOTONIC_USEC=1")
    assert receive(notify_socket) == b"RELOADING=1\nMONOTONIC_USEC=1"


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"certmon-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready()
        assert receive(sock) == b"READY=1"


def test_outside_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.ready()
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not systemd.ready()


def test_a_dead_socket_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not systemd.watchdog()


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("30000000", None, 30.0),
    ("30000000", "self", 30.0),
    ("30000000", "1", None),  # meant for another process (our parent)
    ("0", None, None),
    ("junk", None, None),
    (None, None, None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval_s() == expected


def test_status_is_one_line(notify_socket: socket.socket) -> None:
    assert systemd.status("store unavailable\nfor 3 s")
    assert receive(notify_socket) == b"STATUS=store unavailable for 3 s"


def test_the_collector_watchdog_vouches_for_its_ingest_worker(
        notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """WATCHDOG=1 only while the ingest worker beats: a worker stuck in a store call
    (here SQLite's busy wait, 3 s, against another process's write lock) for longer
    than the interval gets no ping; once it waits for its retry it beats again, and
    STATUS says the store is unavailable. A real collector service on a real store;
    its broker link is never connected (nothing to acknowledge to)."""
    import sqlite3
    import threading
    import time
    from datetime import UTC, datetime

    from kit.fleet import cert_message, make_ca, make_device, signed_status

    from certmon import clock as wallclock
    from certmon import wire as p
    from certmon.config import loads
    from certmon.mqtt import Incoming, LinkSettings, MqttLink
    from collector.backlog import Backlog
    from collector.config import CollectorConfig
    from collector.ingest import Ingestor
    from collector.service import CollectorService, Listeners
    from collector.store.sqlite import SqliteStore
    from collector.verify import CertCache

    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # the loop ticks every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    store = SqliteStore(str(tmp_path / "certmon.db"), busy_timeout_s=3.0)
    store.migrate()
    now = datetime.now(UTC)
    ca = make_ca("notify-ca", now)
    dev = make_device(ca, "gw-notify", now)
    clock = wallclock.SystemClock()
    inbox = Backlog(clock.now)
    ingest = Ingestor(store, CertCache([ca.cert]), now=clock.now)
    ingest.process([Incoming(p.cert_topic(p.DEFAULT_PREFIX, dev.device_id), cert_message(dev),
                             False, 1)])
    config = loads(CollectorConfig, "", overrides={
        "mqtt.broker": "mqtt://127.0.0.1:1", "tls.fleet_ca": __file__,
        "tls.ca_bundle": __file__, "tls.cert": __file__, "tls.key": __file__,
        "ingest.store_retry_max_s": "0.5"})
    service = CollectorService(config, store=store, clock=clock, inbox=inbox, ingestor=ingest,
                               link=MqttLink(LinkSettings("127.0.0.1", 1, "n", is_tls=False)),
                               listeners=Listeners([]))
    runner = threading.Thread(target=service.run)
    runner.start()
    got: list[tuple[float, bytes]] = []
    notify_socket.settimeout(0.2)

    def read_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                got.append((time.monotonic(), notify_socket.recv(4096)))

    lock = sqlite3.connect(tmp_path / "certmon.db", isolation_level=None)
    try:
        read_for(1.5)
        assert got[0][1] == b"READY=1" and b"WATCHDOG=1" in [m for _, m in got]
        assert b"STATUS=ingesting" in [m for _, m in got]
        lock.execute("BEGIN EXCLUSIVE")
        stuck_at = time.monotonic()
        inbox.put(Incoming(p.status_topic(p.DEFAULT_PREFIX, dev.device_id),
                           signed_status(dev, 1, now), False, 1))
        # Stuck 3 s in the busy wait, 0.5 s waiting for the retry (beating), stuck again.
        read_for(5.0)
        pings = [at - stuck_at for at, m in got if m == b"WATCHDOG=1" and at > stuck_at]
        assert not [t for t in pings if 1.6 < t < 2.9], pings  # stuck: no ping
        assert [t for t in pings if 3.0 < t < 4.6], pings  # waiting for a retry: pings
        assert any(m.startswith(b"STATUS=store unavailable for ") for at, m in got
                   if at > stuck_at)
    finally:
        lock.close()  # the lock goes with its connection: the held status is stored
        assert wait_for(lambda: store.seen_count(dev.device_id) == 1, 10)
        service.stop()
        runner.join(20)
    assert not runner.is_alive()


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
