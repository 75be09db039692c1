"""Alert sinks against real peers (an HTTP server on 127.0.0.1) and the engine's
non-blocking dispatch: per-notification retries with backoff, isolation of a failing
sink and of a failing notification, close. The Alertmanager feed is tested in
tests/test_alert_feed.py (loopback peer) and tests/test_alertmanager.py (the real one)."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kit.httppeer import HttpPeer, serve_http

from certmon.pki import Severity
from certmon.wire import DEFAULT_PREFIX
from collector.alerts import AlertmanagerAlert, AlertSinkError, Notification, ReceiverRejected
from collector.alerts.engine import AlertEngine
from collector.alerts.sinks import (
    FEEDS,
    SINKS,
    AppriseSink,
    LogSink,
    MqttSink,
    WebhookSink,
    build_sinks,
)
from collector.config import AlertsConfig
from collector.store import AlertRow

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
REF = "0123456789abcdef"
LABELS = {"alertname": "CERT_EXPIRING", "rule": "CERT_EXPIRING", "device": "gw-1",
          "severity": "warning", "category": "certificate", "scope": "findings", "cert": REF}


def note(**kw: Any) -> Notification:
    base = Notification(
        status="firing", reason="new", key=f"CERT_EXPIRING|gw-1|{REF}", rule="CERT_EXPIRING",
        device_id="gw-1", cert_sha256=REF, severity=Severity.WARNING, category="certificate",
        summary="gw-1: client certificate expires in 3 days", labels=LABELS,
        starts_at=NOW, at=NOW)
    return replace(base, **kw)


def am_alert(**kw: Any) -> AlertmanagerAlert:
    base = AlertmanagerAlert(labels=LABELS,
                             annotations={"summary": "gw-1: client certificate expires in 3 days"},
                             starts_at=NOW, ends_at=NOW + timedelta(minutes=4))
    return replace(base, **kw)


# --------------------------------------------------------------------------- a real peer


@pytest.fixture
def peer() -> Iterator[HttpPeer]:
    with serve_http() as state:
        yield state


# --------------------------------------------------------------------------- webhook


def test_webhook_posts_the_alertmanager_v2_body(peer: HttpPeer) -> None:
    sink = WebhookSink(peer.url + "/api/v2/alerts")
    sink.post_alerts([am_alert(generator_url="https://certmon.example/devices/gw-1"),
                      am_alert(labels={**LABELS, "device": "gw-2"},
                               ends_at=NOW + timedelta(minutes=30))])
    [r] = peer.wait_for(1)
    assert r.path == "/api/v2/alerts"
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == [{
        "labels": LABELS,
        "annotations": {"summary": "gw-1: client certificate expires in 3 days"},
        "startsAt": "2026-03-01T12:00:00Z",
        "endsAt": "2026-03-01T12:04:00Z",
        "generatorURL": "https://certmon.example/devices/gw-1",
    }, {
        "labels": {**LABELS, "device": "gw-2"},
        "annotations": {"summary": "gw-1: client certificate expires in 3 days"},
        "startsAt": "2026-03-01T12:00:00Z", "endsAt": "2026-03-01T12:30:00Z",
    }]


@pytest.mark.parametrize(("status", "error"), [(400, ReceiverRejected),
                                               (422, ReceiverRejected),
                                               (503, AlertSinkError), (404, AlertSinkError)])
def test_webhook_tells_a_refused_content_from_a_failure(peer: HttpPeer, status: int,
                                                         error: type[Exception]) -> None:
    peer.statuses = [status]
    with pytest.raises(AlertSinkError, match=f"HTTP {status}") as info:
        WebhookSink(peer.url).post_alerts([am_alert()])
    assert type(info.value) is error


def test_webhook_non_2xx_raises_without_leaking_the_url(peer: HttpPeer) -> None:
    peer.statuses = [500]
    with pytest.raises(AlertSinkError, match="HTTP 500") as info:
        WebhookSink(peer.url + "/hook?token=SECRET").post_alerts([am_alert()])
    assert "SECRET" not in str(info.value)


def test_a_url_http_client_refuses_is_an_error_without_the_url(peer: HttpPeer) -> None:
    # A space in the query: http.client raises InvalidURL quoting path and query.
    with pytest.raises(AlertSinkError, match="InvalidURL") as info:
        WebhookSink(peer.url + "/hook?token=SECRET x").post_alerts([am_alert()])
    assert "SECRET" not in str(info.value)


def test_webhook_does_not_follow_redirects(peer: HttpPeer) -> None:
    peer.statuses, peer.location = [307], "http://127.0.0.2:1/elsewhere"
    with pytest.raises(AlertSinkError, match="HTTP 307"):
        WebhookSink(peer.url).post_alerts([am_alert()])
    assert len(peer.received) == 1


def test_webhook_unreachable_raises() -> None:
    with pytest.raises(AlertSinkError, match=r"webhook 127\.0\.0\.1"):
        WebhookSink("http://127.0.0.1:1/", timeout_s=2).post_alerts([am_alert()])


def test_webhook_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookSink("file:///etc/passwd")


# --------------------------------------------------------------------------- dispatch


class NoStore:
    def alert_fire(self, key: str, **kw: Any) -> bool:
        raise AssertionError("not used")

    def alert_resolve(self, key: str, now: datetime) -> bool:
        raise AssertionError("not used")

    def active_alerts(self) -> list[AlertRow]:
        return []

    def alert_history(self, device_id: str | None = None, limit: int = 100) -> list[AlertRow]:
        return []


class Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[float, Notification]] = []
        self.cond = threading.Condition()

    def send(self, notification: Notification) -> None:
        with self.cond:
            self.got.append((time.monotonic(), notification))
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[tuple[float, Notification]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, timeout), self.got
            return list(self.got)


class Failing:
    def __init__(self) -> None:
        self.calls = 0

    def send(self, notification: Notification) -> None:
        self.calls += 1
        raise ConnectionError("receiver down")


class Hanging:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def send(self, notification: Notification) -> None:
        self.entered.set()
        self.release.wait(10)


def make_engine(sinks: Mapping[str, Any], **kw: Any) -> AlertEngine:
    kw.setdefault("backoff_base_s", 0.05)
    kw.setdefault("backoff_cap_s", 1.0)
    return AlertEngine(NoStore(), sinks, renotify_interval_s=3600, clock=lambda: NOW,
                       rng=random.Random(7), **kw)


class Flaky(Recorder):
    """Fails the first `fails` attempts of each key in `keys` (every key: None)."""

    def __init__(self, fails: int, keys: set[str] | None = None) -> None:
        super().__init__()
        self.fails, self.keys = fails, keys
        self.attempts: list[tuple[float, str]] = []

    def send(self, notification: Notification) -> None:
        key = notification.key
        self.attempts.append((time.monotonic(), key))
        if (self.keys is None or key in self.keys) and \
                sum(1 for _, k in self.attempts if k == key) <= self.fails:
            raise ConnectionError(f"refused {key}")
        super().send(notification)


def test_a_failed_notification_is_retried_with_backoff_then_sent() -> None:
    flaky = Flaky(fails=2)
    eng = make_engine({"flaky": flaky}, backoff_base_s=0.05)
    try:
        eng.dispatch(note())
        flaky.wait_for(1)
    finally:
        eng.close(5)
    (t1, _), (t2, _), (t3, _) = flaky.attempts
    # Backoff = min(cap, base · 2^n) · U(0.5, 1): ≥ 25 ms, then ≥ 50 ms.
    assert t2 - t1 >= 0.025
    assert t3 - t2 >= 0.05
    s = eng.stats()["flaky"]
    assert (s.sent, s.failed, s.dropped, s.queued) == (1, 2, 0, 0)


def test_a_failing_notification_does_not_hold_back_the_others_of_its_sink() -> None:
    # The receiver refuses one notification for a while (an apprise service that
    # rejects one message): the ones queued behind it go out at once, not after its
    # retries (up to 8 attempts, backoff up to the cap).
    flaky = Flaky(fails=3, keys={"k0"})
    eng = make_engine({"flaky": flaky}, backoff_base_s=0.5, backoff_cap_s=5.0)
    try:
        start = time.monotonic()
        for i in range(10):
            eng.dispatch(note(key=f"k{i}"))
        got = flaky.wait_for(9, timeout=2)
        assert got[8][0] - start < 0.4  # before k0's first retry could even start
        assert [n.key for _, n in got[:9]] == [f"k{i}" for i in range(1, 10)]
        assert eng.stats()["flaky"].queued == 1  # k0, waiting for its retry
        assert flaky.wait_for(10, timeout=10)[9][1].key == "k0"
    finally:
        eng.close(2)
    s = eng.stats()["flaky"]
    assert (s.sent, s.failed, s.dropped) == (10, 3, 0)


def test_a_retry_is_dropped_once_its_key_has_newer_news() -> None:
    # k0 fires, the MQTT link refuses; then k0 resolves and the resolution goes out.
    # The firing retried after that would leave a retained "firing" over "resolved".
    flaky = Flaky(fails=1, keys={"k0"})
    eng = make_engine({"flaky": flaky}, backoff_base_s=0.3)
    try:
        eng.dispatch(note(key="k0"))
        assert wait(lambda: flaky.attempts)
        eng.dispatch(note(key="k0", status="resolved", reason="resolved", ends_at=NOW))
        [(_, resolved)] = flaky.wait_for(1)
        assert resolved.status == "resolved"
        assert wait(lambda: eng.stats()["flaky"].superseded == 1, 3)
    finally:
        eng.close(2)
    assert [n.status for _, n in flaky.got] == ["resolved"]
    s = eng.stats()["flaky"]
    assert (s.sent, s.failed, s.dropped, s.superseded, s.queued) == (1, 1, 0, 1, 0)


def wait(predicate: Any, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_failing_and_hanging_sinks_delay_neither_ingest_nor_other_sinks() -> None:
    hanging, failing, good = Hanging(), Failing(), Recorder()
    eng = make_engine({"hang": hanging, "fail": failing, "good": good}, backoff_base_s=1.0)
    try:
        start = time.monotonic()
        for i in range(20):
            eng.dispatch(note(key=f"k{i}"))
        queued_in = time.monotonic() - start
        got = good.wait_for(20, timeout=2)
        assert queued_in < 0.1  # the ingest thread only enqueues
        assert got[-1][0] - start < 1.0  # the good sink was not held up by the others
        assert [n.key for _, n in got] == [f"k{i}" for i in range(20)]
        assert hanging.entered.wait(2)
    finally:
        hanging.release.set()
        eng.close(0.5)
    stats = eng.stats()
    assert (stats["good"].sent, stats["good"].failed) == (20, 0)
    assert stats["fail"].sent == 0 and stats["fail"].failed >= 1
    # Closing at the deadline gives up the backlog of the failing sink and counts it.
    assert stats["fail"].dropped == 20 and stats["fail"].queued == 0


def test_retries_exhausted_drop_and_count() -> None:
    failing = Failing()
    eng = make_engine({"fail": failing}, max_attempts=3, backoff_base_s=0.01)
    try:
        eng.dispatch(note())
        deadline = time.monotonic() + 2
        while eng.stats()["fail"].dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        eng.close(1)
    assert failing.calls == 3
    s = eng.stats()["fail"]
    assert (s.sent, s.failed, s.dropped) == (0, 3, 1)


def test_full_queue_drops_instead_of_blocking() -> None:
    hanging = Hanging()
    eng = make_engine({"hang": hanging}, queue_size=2)
    try:
        eng.dispatch(note(key="first"))
        assert hanging.entered.wait(2)  # in flight; the queue is empty again
        start = time.monotonic()
        for i in range(5):
            eng.dispatch(note(key=f"k{i}"))
        assert time.monotonic() - start < 0.1
        s = eng.stats()["hang"]
        assert (s.queued, s.dropped) == (2, 3)
    finally:
        hanging.release.set()
        eng.close(2)
    s = eng.stats()["hang"]
    assert (s.sent, s.dropped) == (3, 3)


def test_close_drains_what_is_queued() -> None:
    good = Recorder()
    eng = make_engine({"good": good})
    for i in range(50):
        eng.dispatch(note(key=f"k{i}"))
    eng.close(5)
    assert len(good.got) == 50
    eng.dispatch(note(key="after-close"))  # refused, counted, never blocks
    assert eng.stats()["good"].dropped == 1


def test_close_returns_at_its_deadline_with_a_hung_sink() -> None:
    hanging = Hanging()
    eng = make_engine({"hang": hanging})
    eng.dispatch(note(key="a"))
    eng.dispatch(note(key="b"))
    assert hanging.entered.wait(2)
    start = time.monotonic()
    try:
        eng.close(0.2)
        assert time.monotonic() - start < 1.0
        assert eng.stats()["hang"].dropped == 1  # "b" was still queued
    finally:
        hanging.release.set()


# --------------------------------------------------------------------------- apprise


def test_apprise_json_url_posts_to_a_local_server(peer: HttpPeer) -> None:
    sink = AppriseSink([peer.url.replace("http://", "json://") + "/notify"])
    sink.send(note(severity=Severity.CRITICAL))
    [r] = peer.wait_for(1)
    assert r.path == "/notify"
    doc = r.json()
    assert doc["title"] == "[certmon CRITICAL] CERT_EXPIRING on gw-1"
    assert doc["message"].startswith("gw-1: client certificate expires in 3 days\n")
    assert doc["type"] == "failure"


def test_apprise_resolved_is_a_success_notice(peer: HttpPeer) -> None:
    sink = AppriseSink([peer.url.replace("http://", "json://")])
    sink.send(note(status="resolved", reason="resolved", ends_at=NOW))
    doc = peer.wait_for(1)[0].json()
    assert (doc["title"], doc["type"]) == ("[certmon RESOLVED] CERT_EXPIRING on gw-1", "success")


def test_apprise_failure_raises(peer: HttpPeer) -> None:
    peer.statuses = [500]
    sink = AppriseSink([peer.url.replace("http://", "json://")])
    with pytest.raises(AlertSinkError, match="not delivered"):
        sink.send(note())


def test_apprise_rejects_an_unknown_url() -> None:
    with pytest.raises(ValueError, match="#1"):
        AppriseSink(["nosuchservice://token@host"])


# --------------------------------------------------------------------------- mqtt, log


class Published:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, bool]] = []

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.calls.append((topic, payload, retain))


def test_mqtt_firing_is_retained_json_resolved_clears_it() -> None:
    pub = Published()
    sink = MqttSink(pub, "certmon/v2")
    sink.send(note())
    sink.send(note(status="resolved", reason="resolved", ends_at=NOW))
    (t1, p1, r1), (t2, p2, r2) = pub.calls
    assert t1 == t2 == f"certmon/v2/alerts/gw-1/CERT_EXPIRING/{REF}"
    assert (r1, r2, p2) == (True, True, b"")
    assert json.loads(p1) == {
        "status": "firing", "rule": "CERT_EXPIRING", "device": "gw-1", "severity": "warning",
        "category": "certificate", "key": f"CERT_EXPIRING|gw-1|{REF}", "cert": REF,
        "summary": note().summary, "labels": LABELS, "startsAt": "2026-03-01T12:00:00Z",
        "at": "2026-03-01T12:00:00Z"}


def test_mqtt_topics_for_fleet_and_certificate_less_alerts() -> None:
    pub = Published()
    sink = MqttSink(pub, "p")
    sink.send(note(device_id=None, rule="SHARED_CLIENT_CERT", cert_sha256="c" * 64))
    sink.send(note(rule="DEVICE_OFFLINE", cert_sha256=None))
    assert [c[0] for c in pub.calls] == [f"p/alerts/fleet/SHARED_CLIENT_CERT/{'c' * 16}",
                                         "p/alerts/gw-1/DEVICE_OFFLINE"]


def test_mqtt_publish_failure_propagates() -> None:
    def publish(topic: str, payload: bytes, retain: bool) -> None:
        raise ConnectionError("not connected")

    with pytest.raises(ConnectionError):
        MqttSink(publish, "p").send(note())


def test_log_sink_writes_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="certmon.alerts")
    LogSink().send(note())
    LogSink().send(note(status="resolved", reason="resolved", ends_at=NOW))
    firing, resolved = caplog.records
    assert firing.levelno == logging.WARNING and resolved.levelno == logging.INFO
    assert firing.getMessage() == (
        "alert FIRING (new) CERT_EXPIRING: gw-1: client certificate expires in 3 days "
        f"[rule=CERT_EXPIRING device=gw-1 severity=warning key=CERT_EXPIRING|gw-1|{REF}]")
    assert resolved.getMessage().startswith("alert RESOLVED (resolved) CERT_EXPIRING")


# --------------------------------------------------------------------------- registry


def test_registry_and_build_sinks(peer: HttpPeer) -> None:
    assert set(SINKS) == {"log", "mqtt", "apprise"}
    assert set(FEEDS) == {"webhook"}
    cfg = AlertsConfig(webhook_urls=(peer.url + "/a", peer.url + "/b"),
                       apprise_urls=(peer.url.replace("http://", "json://"),))
    sinks = build_sinks(cfg, topic_prefix=DEFAULT_PREFIX, publish=Published())
    assert list(sinks.notify) == ["log", "mqtt", "apprise-1"]
    assert list(sinks.alertmanager) == ["webhook-1", "webhook-2"]
    assert list(build_sinks(AlertsConfig(mqtt_topic_enabled=False), topic_prefix="x",
                            publish=Published()).notify) == ["log"]
