"""Alert sinks against real peers (an HTTP server on 127.0.0.1) and the engine's
non-blocking dispatch: retries with backoff, isolation of a failing sink, close."""

from __future__ import annotations

import http.server
import json
import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from certmon.pki import Severity
from collector.alerts import AlertSinkError, Notification
from collector.alerts.engine import AlertEngine
from collector.alerts.sinks import (
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
        starts_at=NOW, at=NOW, expires_at=NOW + timedelta(hours=8))
    return replace(base, **kw)


# --------------------------------------------------------------------------- a real peer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpPeer:
    url: str
    statuses: list[int] = field(default_factory=list)  # consumed per request; then 200
    received: list[Received] = field(default_factory=list)
    location: str | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Received]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.received) >= n, timeout), self.received
            return list(self.received)


@pytest.fixture
def peer() -> Iterator[HttpPeer]:
    state = HttpPeer(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.cond:
                state.received.append(Received(self.path, dict(self.headers), body,
                                               time.monotonic()))
                status = state.statuses.pop(0) if state.statuses else 200
                state.cond.notify_all()
            self.send_response(status)
            if state.location and 300 <= status < 400:
                self.send_header("Location", state.location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- webhook


def test_webhook_posts_the_alertmanager_v2_body(peer: HttpPeer) -> None:
    sink = WebhookSink(peer.url + "/api/v2/alerts")
    sink.send(note(generator_url="https://certmon.example/devices/gw-1"))
    [r] = peer.wait_for(1)
    assert r.path == "/api/v2/alerts"
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == [{
        "labels": LABELS,
        "annotations": {"summary": "gw-1: client certificate expires in 3 days"},
        "startsAt": "2026-03-01T12:00:00Z",
        "endsAt": "2026-03-01T20:00:00Z",  # expires_at: Alertmanager must not time it out
        "generatorURL": "https://certmon.example/devices/gw-1",
    }]


def test_webhook_resolved_carries_ends_at(peer: HttpPeer) -> None:
    ended = NOW + timedelta(minutes=30)
    WebhookSink(peer.url).send(note(status="resolved", reason="resolved", ends_at=ended,
                                    expires_at=None))
    [r] = peer.wait_for(1)
    assert r.json() == [{"labels": LABELS, "annotations": {"summary": note().summary},
                         "startsAt": "2026-03-01T12:00:00Z", "endsAt": "2026-03-01T12:30:00Z"}]


def test_webhook_severity_change_ends_the_old_label_set(peer: HttpPeer) -> None:
    later = NOW + timedelta(minutes=5)
    new_labels = {**LABELS, "severity": "critical"}
    WebhookSink(peer.url).send(note(reason="severity", severity=Severity.CRITICAL,
                                    labels=new_labels, replaces_labels=LABELS, at=later))
    [old, new] = peer.wait_for(1)[0].json()
    assert (old["labels"], old["endsAt"]) == (LABELS, "2026-03-01T12:05:00Z")
    assert (new["labels"], new["endsAt"]) == (new_labels, "2026-03-01T20:00:00Z")


def test_webhook_non_2xx_raises_without_leaking_the_url(peer: HttpPeer) -> None:
    peer.statuses = [500]
    with pytest.raises(AlertSinkError, match="HTTP 500") as info:
        WebhookSink(peer.url + "/hook?token=SECRET").send(note())
    assert "SECRET" not in str(info.value)


def test_webhook_does_not_follow_redirects(peer: HttpPeer) -> None:
    peer.statuses, peer.location = [307], "http://127.0.0.2:1/elsewhere"
    with pytest.raises(AlertSinkError, match="HTTP 307"):
        WebhookSink(peer.url).send(note())
    assert len(peer.received) == 1


def test_webhook_unreachable_raises() -> None:
    with pytest.raises(AlertSinkError, match=r"webhook 127\.0\.0\.1"):
        WebhookSink("http://127.0.0.1:1/", timeout_s=2).send(note())


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


def test_webhook_500_is_retried_with_backoff_then_succeeds(peer: HttpPeer) -> None:
    peer.statuses = [500, 500]
    eng = make_engine({"webhook-1": WebhookSink(peer.url)}, backoff_base_s=0.05)
    try:
        eng.dispatch(note())
        r1, r2, r3 = peer.wait_for(3)
    finally:
        eng.close(5)
    # Backoff = min(cap, base · 2^n) · U(0.5, 1): ≥ 25 ms, then ≥ 50 ms.
    assert r2.at - r1.at >= 0.025
    assert r3.at - r2.at >= 0.05
    assert r1.body == r3.body
    s = eng.stats()["webhook-1"]
    assert (s.sent, s.failed, s.dropped, s.queued) == (1, 2, 0, 0)


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
    sink = MqttSink(pub, "certmon/v1")
    sink.send(note())
    sink.send(note(status="resolved", reason="resolved", ends_at=NOW))
    (t1, p1, r1), (t2, p2, r2) = pub.calls
    assert t1 == t2 == f"certmon/v1/alerts/gw-1/CERT_EXPIRING/{REF}"
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
    assert set(SINKS) == {"log", "mqtt", "webhook", "apprise"}
    cfg = AlertsConfig(webhook_urls=(peer.url + "/a", peer.url + "/b"),
                       apprise_urls=(peer.url.replace("http://", "json://"),))
    sinks = build_sinks(cfg, topic_prefix="certmon/v1", publish=Published())
    assert list(sinks) == ["log", "mqtt", "webhook-1", "webhook-2", "apprise-1"]
    assert list(build_sinks(AlertsConfig(mqtt_topic_enabled=False), topic_prefix="x",
                            publish=Published())) == ["log"]
