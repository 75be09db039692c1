"""The Alertmanager feed against a loopback HTTP receiver and the real SQLite store.

What a receiver is sent, and when: the whole active set in one POST per resend cycle
with endsAt four intervals ahead; a new alert, a severity change and a resolution at
once; resolutions re-posted for four intervals; a refused alert isolated while the
rest of its batch is delivered; retries with backoff and at every cycle; a snapshot
read that raced a resolution; a store that cannot be read. Time is a FixedClock; the
real Alertmanager is in tests/test_alertmanager.py.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kit.broker import wait_until
from kit.httppeer import HttpPeer, serve_http

from certmon.clock import FixedClock
from certmon.pki import Severity
from certmon.wire import FindingWire
from collector.alerts import Notification
from collector.alerts.engine import AlertEngine
from collector.alerts.rules import AlertCandidate, Scope, device_alerts
from collector.alerts.sinks import WebhookSink
from collector.store import AlertRow, Store, open_store

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
RESEND_S = 60


@pytest.fixture
def peer() -> Iterator[HttpPeer]:
    with serve_http() as state:
        yield state


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'alerts.db'}")
    s.migrate()
    yield s
    s.close()


def expiring(device: str, severity: Severity = Severity.WARNING) -> list[AlertCandidate]:
    f = FindingWire(code="CERT_EXPIRING", severity=severity, cert=None,
                    msg="client certificate expires in 3 days", not_after=None)
    return device_alerts(device, [f], online=True, now=T0)


def fired_elsewhere(store: Store, devices: list[str], now: datetime = T0) -> None:
    """Alerts another collector fired (and notified): in the store, never sent by us."""
    for dev in devices:
        for c in expiring(dev):
            store.alert_fire(c.key, rule=c.rule, device_id=c.device_id,
                             cert_sha256=c.cert_sha256, severity=int(c.severity),
                             summary=c.summary, labels=c.labels, now=now,
                             renotify_interval_s=14400)


def engine(store: Any, url: str, clock: FixedClock, **kw: Any) -> AlertEngine:
    kw.setdefault("backoff_base_s", 0.05)
    return AlertEngine(store, {}, alertmanagers={"webhook-1": WebhookSink(url, timeout_s=2)},
                       renotify_interval_s=14400, resend_interval_s=RESEND_S,
                       clock=clock.now, rng=random.Random(3), **kw)


def devices_in(body: list[dict[str, Any]]) -> list[str]:
    return sorted(a["labels"]["device"] for a in body)


def test_each_cycle_posts_the_whole_active_set_in_one_batch(store: Store,
                                                            peer: HttpPeer) -> None:
    devices = [f"gw-{i:02d}" for i in range(30)]
    fired_elsewhere(store, devices)
    clock = FixedClock(T0)
    eng = engine(store, peer.url, clock)
    try:
        eng.resend()
        [first] = peer.wait_for(1)
        clock.advance(RESEND_S)
        eng.resend()
        second = peer.wait_for(2)[1]
    finally:
        eng.close(2)
    for post, at in ((first, T0), (second, T0 + timedelta(seconds=RESEND_S))):
        body = post.json()
        assert devices_in(body) == devices  # one POST, every alert
        ends = at + timedelta(seconds=4 * RESEND_S)
        assert {a["endsAt"] for a in body} == {ends.strftime("%Y-%m-%dT%H:%M:%SZ")}
        assert {a["startsAt"] for a in body} == {"2026-03-01T12:00:00Z"}
    s = eng.feed_stats()["webhook-1"]
    assert (s.posts, s.failed, s.alerts_sent, s.firing) == (2, 0, 60, 30)


def test_changes_are_posted_at_once_and_a_resolution_rides_four_intervals(
        store: Store, peer: HttpPeer) -> None:
    clock = FixedClock(T0)
    eng = engine(store, peer.url, clock)
    try:
        eng.evaluate("gw-1", expiring("gw-1"), scope=Scope.FINDINGS)
        [fire] = peer.wait_for(1)
        assert [(a["labels"]["device"], a["endsAt"]) for a in fire.json()] == [
            ("gw-1", "2026-03-01T12:04:00Z")]
        # Severity change: the new label set fires, the old one ends, in one POST.
        clock.advance(10)
        eng.evaluate("gw-1", expiring("gw-1", Severity.CRITICAL), scope=Scope.FINDINGS)
        change = {a["labels"]["severity"]: a["endsAt"] for a in peer.wait_for(2)[1].json()}
        assert change == {"warning": "2026-03-01T12:00:10Z", "critical": "2026-03-01T12:04:10Z"}
        clock.advance(20)
        eng.evaluate("gw-1", [], scope=Scope.FINDINGS)
        [resolved] = peer.wait_for(3)[2].json()
        assert (resolved["labels"]["severity"], resolved["endsAt"]) == (
            "critical", "2026-03-01T12:00:30Z")
        # Each cycle re-posts both resolutions (they end stale claims by anyone) ...
        for n in range(3):
            clock.advance(RESEND_S)
            eng.resend()
            body = peer.wait_for(4 + n)[3 + n].json()
            assert sorted(a["endsAt"] for a in body) == ["2026-03-01T12:00:10Z",
                                                         "2026-03-01T12:00:30Z"]
        # ... until four intervals have passed (any claim made before has expired by
        # then): nothing is held, nothing posted.
        clock.advance(RESEND_S)
        eng.resend()
        assert wait_until(lambda: eng.feed_stats()["webhook-1"].resolving == 0, 2)
        time.sleep(0.2)  # a POST would have been made by now
        assert len(peer.received) == 6
    finally:
        eng.close(2)


def test_a_refused_alert_is_isolated_and_the_rest_of_the_batch_delivered(
        store: Store, peer: HttpPeer) -> None:
    # A receiver that refuses the whole batch for one bad alert (HTTP 400): Alertmanager
    # keeps the valid ones and still says 400; other receivers keep none.
    devices = [f"gw-{i:02d}" for i in range(10)]
    fired_elsewhere(store, devices)
    peer.respond = lambda body: 400 if b'"device":"gw-07"' in body else 200
    clock = FixedClock(T0)
    eng = engine(store, peer.url, clock)
    try:
        eng.resend()
        assert wait_until(lambda: eng.feed_stats()["webhook-1"].rejected == 1, 5)
        accepted = [devices_in(r.json()) for r in peer.received
                    if b'"device":"gw-07"' not in r.body]
        assert sorted(d for batch in accepted for d in batch) == [d for d in devices
                                                                  if d != "gw-07"]
        posts = len(peer.received)
        assert posts <= 2 * 4 + 1  # halving: about 2·log2(n) POSTs, not one per alert
        clock.advance(RESEND_S)
        eng.resend()  # next cycle: the refused alert stays out until it changes
        body = peer.wait_for(posts + 1)[posts].json()
        assert devices_in(body) == [d for d in devices if d != "gw-07"]
    finally:
        eng.close(2)
    s = eng.feed_stats()["webhook-1"]
    assert (s.rejected, s.failed) == (1, 0)


def test_a_failed_post_is_retried_with_backoff_and_at_once_at_each_cycle(
        store: Store, peer: HttpPeer) -> None:
    fired_elsewhere(store, ["gw-1", "gw-2"])
    clock = FixedClock(T0)
    peer.statuses = [503, 503]
    eng = engine(store, peer.url, clock)
    try:
        eng.resend()
        r1, r2, r3 = peer.wait_for(3)
        assert r2.at - r1.at >= 0.025 and r3.at - r2.at >= 0.05  # 50 ms · 2ⁿ · U(.5, 1)
        assert r1.body == r3.body
    finally:
        eng.close(2)
    slow = engine(store, peer.url, clock, backoff_base_s=30.0)
    try:
        peer.statuses = [503]
        slow.resend()
        peer.wait_for(4)
        clock.advance(RESEND_S)
        start = time.monotonic()
        slow.resend()  # the cycle does not wait for the 15–30 s backoff
        assert peer.wait_for(5, timeout=2)[4].at - start < 1.0
    finally:
        slow.close(2)
    assert slow.feed_stats()["webhook-1"].failed == 1


class RacingStore:
    """The real store; `active_alerts` lets `during_read` run between the read and
    its return, as an ingest thread may resolve an alert while the tick reads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.during_read: Any = None
        self.fail_reads = 0

    def alert_fire(self, key: str, **kw: Any) -> bool:
        return self.store.alert_fire(key, **kw)

    def alert_resolve(self, key: str, now: datetime) -> bool:
        return self.store.alert_resolve(key, now)

    def alert_history(self, device_id: str | None = None, limit: int = 100) -> list[AlertRow]:
        return self.store.alert_history(device_id, limit)

    def active_alerts(self) -> list[AlertRow]:
        if self.fail_reads:
            self.fail_reads -= 1
            raise OSError("database is locked")
        rows = self.store.active_alerts()
        if self.during_read is not None:
            self.during_read()
            self.during_read = None
        return rows


def test_a_snapshot_read_before_a_resolution_does_not_bring_it_back(
        store: Store, peer: HttpPeer) -> None:
    racing = RacingStore(store)
    clock = FixedClock(T0)
    eng = engine(racing, peer.url, clock)
    try:
        eng.evaluate("gw-1", expiring("gw-1"), scope=Scope.FINDINGS)
        peer.wait_for(1)
        clock.advance(30)
        racing.during_read = lambda: eng.evaluate("gw-1", [], scope=Scope.FINDINGS)
        eng.resend()  # read gw-1 firing; resolved before the feed got the snapshot
        assert wait_until(lambda: eng.feed_stats()["webhook-1"].posts >= 2, 2)
        posts = eng.feed_stats()["webhook-1"].posts  # the resolution and the cycle: 1 or 2
        clock.advance(RESEND_S)
        eng.resend()
        peer.wait_for(posts + 1)
        for r in peer.received[1:]:
            assert [a["endsAt"] for a in r.json()] == ["2026-03-01T12:00:30Z"]
        assert eng.feed_stats()["webhook-1"].firing == 0
    finally:
        eng.close(2)


def test_a_store_that_cannot_be_read_resends_the_last_set(store: Store,
                                                          peer: HttpPeer) -> None:
    racing = RacingStore(store)
    fired_elsewhere(store, ["gw-1", "gw-2"])
    clock = FixedClock(T0)
    eng = engine(racing, peer.url, clock)
    try:
        eng.resend()
        peer.wait_for(1)
        racing.fail_reads = 1
        clock.advance(RESEND_S)
        eng.resend()  # logged; Alertmanager must not time the alerts out meanwhile
        body = peer.wait_for(2)[1].json()
    finally:
        eng.close(2)
    assert devices_in(body) == ["gw-1", "gw-2"]
    assert {a["endsAt"] for a in body} == {"2026-03-01T12:05:00Z"}


def test_a_hung_receiver_delays_neither_ingest_nor_the_human_channels(store: Store) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.got: list[Notification] = []

        def send(self, notification: Notification) -> None:
            self.got.append(notification)

    silent = socket.socket()  # accepts connections (backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    rec = Recorder()
    clock = FixedClock(T0)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/api/v2/alerts"
    eng = AlertEngine(store, {"log": rec}, renotify_interval_s=14400, resend_interval_s=RESEND_S,
                      alertmanagers={"webhook-1": WebhookSink(url, timeout_s=5)},
                      clock=clock.now)
    try:
        start = time.monotonic()
        for i in range(20):
            eng.evaluate(f"gw-{i}", expiring(f"gw-{i}"), scope=Scope.FINDINGS)
            eng.resend()
        assert time.monotonic() - start < 1.0  # ingest and the tick only hand over
        assert wait_until(lambda: len(rec.got) == 20, 1.0)
    finally:
        start = time.monotonic()
        eng.close(0.3)
        assert time.monotonic() - start < 1.0  # close keeps its deadline
        silent.close()
