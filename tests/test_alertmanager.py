"""certmon against a real Alertmanager (Debian's prometheus-alertmanager, our own process).

The operator's stories (issue 19): Alertmanager keeps alerts in memory only, so a
restart, or an outage longer than the alerts' endsAt, loses them; certmon must feed
it as Prometheus does, so that it has every active alert back within one resend
interval. Each test starts Alertmanager on a free loopback port with its own storage
and clustering off (tests/kit/alertmanager.py) and asks it what it holds
(`GET /api/v2/alerts`). Time is injected (FixedClock) and anchored so that the
instants certmon puts on the wire match Alertmanager's own clock where it judges
them (an alert whose endsAt has passed is not listed).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from conftest import Fleet, collector_config, missing
from kit.alertmanager import Alertmanager, find_alertmanager
from kit.broker import wait_until

from certmon.clock import FixedClock
from certmon.pki import Severity
from certmon.wire import FindingWire
from collector.alerts import Notification
from collector.alerts.engine import AlertEngine
from collector.alerts.rules import AlertCandidate, Scope, device_alerts
from collector.alerts.sinks import WebhookSink
from collector.service import Periodic
from collector.store import Store, open_store
from collector.wiring import build_collector

RESEND_S = 60


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    binary = find_alertmanager()
    if binary is None:
        missing("prometheus-alertmanager not found (apt install prometheus-alertmanager)")
    am = Alertmanager(binary, tmp_path / "alertmanager")
    try:
        yield am.start()
    finally:
        am.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'alerts.db'}")
    s.migrate()
    yield s
    s.close()


class Recorder:
    """A human channel (what the log, MQTT and apprise sinks stand for here)."""

    def __init__(self) -> None:
        self.got: list[tuple[float, Notification]] = []

    def send(self, notification: Notification) -> None:
        self.got.append((time.monotonic(), notification))


def expiring(device: str, now: datetime) -> list[AlertCandidate]:
    f = FindingWire(code="CERT_EXPIRING", severity=Severity.WARNING, cert=None,
                    msg="client certificate expires in 3 days", not_after=None)
    return device_alerts(device, [f], online=True, now=now)


def devices_at(am: Alertmanager) -> set[str]:
    return {a["labels"]["device"] for a in am.alerts()}


def failed_at_least(eng: AlertEngine, n: int) -> bool:
    return eng.feed_stats()["webhook-1"].failed >= n


def back_within(am: Alertmanager, want: set[str], timeout_s: float = 10.0) -> float:
    """Seconds (real) until Alertmanager lists exactly `want`."""
    start = time.monotonic()
    assert wait_until(lambda: devices_at(am) == want, timeout_s, 0.02), (devices_at(am),
                                                                         am.log_text())
    return time.monotonic() - start


def test_a_restarted_alertmanager_has_every_alert_back_at_the_next_resend(
        fleet_broker: Fleet, alertmanager: Alertmanager, tmp_path: Path) -> None:
    """The collector as wired (build_collector, the service tick's resend job), with
    `alerts.resend_interval_s = 30`; Alertmanager restarted with empty storage."""
    clock = FixedClock(datetime.now(UTC))
    config = collector_config(fleet_broker, tmp_path, **{
        "alerts.webhook_urls": alertmanager.alerts_url,
        "alerts.resend_interval_s": "30", "alerts.mqtt_topic_enabled": "false"})
    service = build_collector(config, web=False, clock=clock, periodic=Periodic(
        fleet_sweep_every_s=1e9))
    try:
        devices = {f"gw-{i}" for i in range(5)}
        for dev in sorted(devices):  # fired (and notified) by another collector
            for c in expiring(dev, clock.now()):
                service.store.alert_fire(c.key, rule=c.rule, device_id=c.device_id,
                                         cert_sha256=c.cert_sha256, severity=int(c.severity),
                                         summary=c.summary, labels=c.labels, now=clock.now(),
                                         renotify_interval_s=14400)
        service.tick()  # the first tick resends: the store's set, whoever fired it
        back_within(alertmanager, devices)
        [one] = [a for a in alertmanager.alerts() if a["labels"]["device"] == "gw-0"]
        ends = datetime.fromisoformat(one["endsAt"].replace("Z", "+00:00"))
        assert ends - clock.now() > timedelta(seconds=4 * 30 - 1)  # four intervals ahead

        alertmanager.restart(empty=True)
        assert alertmanager.alerts() == []  # its memory is gone
        clock.advance(29)
        service.tick()
        assert alertmanager.alerts() == []  # not yet: 29 s < resend_interval_s
        clock.advance(1)
        service.tick()
        real_s = back_within(alertmanager, devices)
        print(f"restart with empty storage: back {30} s (injected) after the restart, "
              f"{real_s * 1000:.0f} ms after the cycle")
    finally:
        service.close()


@pytest.mark.parametrize("outage", ["stopped", "hung"])
def test_an_alertmanager_down_for_ten_minutes_has_the_active_set_when_it_returns(
        store: Store, alertmanager: Alertmanager, outage: str) -> None:
    """stopped: the process is gone and comes back with nothing in memory. hung
    (SIGSTOP): connections hang until the sink's timeout; it comes back with what it
    held, so the resolution made meanwhile must reach it to end gw-2."""
    # Alertmanager judges endsAt by its own clock: the injected clock starts 3 min in
    # the past, so the resolution made during the outage (t0 + 2 min) has passed for
    # it and the claims made before the outage (endsAt t0 + 4 min) have not.
    real_now = datetime.now(UTC)
    clock = FixedClock(real_now - timedelta(minutes=3))
    human = Recorder()
    sink = WebhookSink(alertmanager.alerts_url, timeout_s=0.3)
    eng = AlertEngine(store, {"human": human}, renotify_interval_s=14400,
                      alertmanagers={"webhook-1": sink}, resend_interval_s=RESEND_S,
                      clock=clock.now, rng=random.Random(5))
    try:
        for dev in ("gw-1", "gw-2", "gw-3"):
            eng.evaluate(dev, expiring(dev, clock.now()), scope=Scope.FINDINGS)
        back_within(alertmanager, {"gw-1", "gw-2", "gw-3"})  # posted at once

        alertmanager.stop() if outage == "stopped" else alertmanager.pause()
        for minute in range(1, 11):
            clock.advance(RESEND_S)
            start = time.monotonic()
            if minute == 2:
                eng.evaluate("gw-2", [], scope=Scope.FINDINGS)
            if minute == 6:
                eng.evaluate("gw-4", expiring("gw-4", clock.now()), scope=Scope.FINDINGS)
            eng.resend()
            assert time.monotonic() - start < 0.2  # ingest and the tick are never held up
            # Each minute's cycle tries (and fails) before the next minute comes.
            assert wait_until(partial(failed_at_least, eng, minute), 5)
        # The human channel got every change at once, down receiver or not.
        assert wait_until(lambda: len(human.got) == 5, 2)
        assert [(n.status, n.device_id) for _, n in human.got][3:] == [
            ("resolved", "gw-2"), ("firing", "gw-4")]
        down = eng.feed_stats()["webhook-1"]
        assert (down.firing, down.resolving, down.dropped) == (3, 1, 0)

        alertmanager.start() if outage == "stopped" else alertmanager.resume()
        clock.advance(RESEND_S)
        start = time.monotonic()
        eng.resend()
        # (A resumed Alertmanager also works off the requests that hung in its backlog.)
        assert wait_until(lambda: eng.feed_stats()["webhook-1"].last_delivered_at
                          == clock.now(), 5)
        back_within(alertmanager, {"gw-1", "gw-3", "gw-4"})
        real_s = time.monotonic() - start
        print(f"down ({outage}) 10 min then returns: right at the first cycle, "
              f"{real_s * 1000:.0f} ms after it; {down.failed} failed POSTs meanwhile")
        assert eng.feed_stats()["webhook-1"].dropped == 0
    finally:
        eng.close(2)


def test_one_alert_alertmanager_refuses_does_not_hold_back_the_others(
        store: Store, alertmanager: Alertmanager) -> None:
    # A row written by another collector (say a newer version) with a label name
    # Alertmanager refuses ("bad-label": not [a-zA-Z_][a-zA-Z0-9_]*). Alertmanager
    # answers 400 for the whole batch; certmon isolates the bad one and counts it.
    clock = FixedClock(datetime.now(UTC))
    for dev in ("gw-1", "gw-2", "gw-3"):
        for c in expiring(dev, clock.now()):
            store.alert_fire(c.key, rule=c.rule, device_id=c.device_id,
                             cert_sha256=c.cert_sha256, severity=int(c.severity),
                             summary=c.summary, now=clock.now(), renotify_interval_s=14400,
                             labels={**c.labels, "bad-label": "x"} if dev == "gw-2"
                             else c.labels)
    eng = AlertEngine(store, {}, renotify_interval_s=14400, resend_interval_s=RESEND_S,
                      alertmanagers={"webhook-1": WebhookSink(alertmanager.alerts_url)},
                      clock=clock.now)
    try:
        eng.resend()
        assert wait_until(lambda: eng.feed_stats()["webhook-1"].rejected == 1, 5)
        assert devices_at(alertmanager) == {"gw-1", "gw-3"}
        s = eng.feed_stats()["webhook-1"]
        assert (s.failed, s.rejected) == (0, 1)  # a refused alert is not an outage
    finally:
        eng.close(2)


def test_a_resolution_ends_the_alert_at_alertmanager(store: Store,
                                                      alertmanager: Alertmanager) -> None:
    clock = FixedClock(datetime.now(UTC))
    eng = AlertEngine(store, {}, renotify_interval_s=14400, resend_interval_s=RESEND_S,
                      alertmanagers={"webhook-1": WebhookSink(alertmanager.alerts_url)},
                      clock=clock.now)
    try:
        eng.evaluate("gw-1", expiring("gw-1", clock.now()), scope=Scope.FINDINGS)
        eng.evaluate("gw-2", expiring("gw-2", clock.now()), scope=Scope.FINDINGS)
        back_within(alertmanager, {"gw-1", "gw-2"})
        eng.evaluate("gw-1", [], scope=Scope.FINDINGS)
        back_within(alertmanager, {"gw-2"})
        # The next cycles re-post the resolution: it stays ended.
        clock.advance(RESEND_S)
        eng.resend()
        assert wait_until(lambda: eng.feed_stats()["webhook-1"].posts >= 3, 5)
        assert devices_at(alertmanager) == {"gw-2"}
    finally:
        eng.close(2)
