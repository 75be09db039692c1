"""The running collector: MQTT in, batches through ingest, periodic jobs, fleet topics.

Owns threads and timing: paho's network thread only enqueues; one worker thread
takes batches (verification is CPU, the store wants few large transactions); a
periodic tick publishes the time beacon, marks silent devices offline, publishes the
fleet summary and runs the jobs it was handed. Jobs that must run once per period
across several collectors are claimed atomically in the store (`try_claim`). Also
owns the seams its parts meet at (`Job`, `DeviceListener`, the link and its inbox).

Must not build its parts: `collector.wiring` builds each and hands it over, and
nothing sets an attribute on a built service afterwards.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509

from certmon import clock as wallclock
from certmon import pki, systemd
from certmon import wire as p
from certmon.config import broker_endpoint
from certmon.errors import ConfigError, TransportError
from certmon.mqtt import Incoming, LinkSettings, MqttLink

from . import aggregate
from .config import CollectorConfig
from .ingest import Ingestor, Stored
from .store import Store

log = logging.getLogger("certmon.collector")

BATCH_MAX = 256
BATCH_WAIT_S = 0.05
TICK_S = 5.0


def load_fleet_cas(config: CollectorConfig) -> list[x509.Certificate]:
    cas: list[x509.Certificate] = []
    for path in config.tls.fleet_ca:
        bundle = pki.read_bundle(path)
        if not bundle.certs:
            problems = "; ".join(f.message for f in bundle.findings)
            raise ConfigError(f"tls.fleet_ca: {path}: no usable CA certificate ({problems})")
        cas.extend(c.cert for c in bundle.certs)
    return cas


@dataclass(frozen=True, slots=True)
class Periodic:
    """How often the tick's own duties run, and the fleet alert sweep (required CAs,
    shared certificates, re-notification: one collector of a group per period)."""

    beacon_every_s: float = 30.0
    silence_every_s: float = 15.0
    summary_every_s: float = 60.0
    prune_every_s: float = 3600.0
    fleet_sweep_every_s: float = 60.0


# The inbox between paho's thread and the ingest worker. When it is full, paho's
# thread blocks in put(), which stops reading the socket: TCP back-pressure to the
# broker, nothing dropped.
INBOX_MAX = 20_000
Inbox = queue.Queue[Incoming]


def new_inbox() -> Inbox:
    return queue.Queue(maxsize=INBOX_MAX)


def collector_link(config: CollectorConfig, on_message: Callable[[Incoming], None],
                   monotonic: Callable[[], float]) -> MqttLink:
    """The collector's broker connection and its subscriptions (not started)."""
    mqtt = config.mqtt
    prefix = mqtt.topic_prefix
    host, port, is_tls = broker_endpoint(mqtt.broker)
    client_id = mqtt.client_id or f"certmon-collector-{socket.gethostname()}"
    settings = LinkSettings(host=host, port=port, client_id=client_id, is_tls=is_tls,
                            ca_bundle=str(config.tls.ca_bundle),
                            cert=str(config.tls.cert), key=str(config.tls.key),
                            keepalive_s=mqtt.keepalive_s, max_inflight=100,
                            manual_ack=True,
                            clean_start=mqtt.session_expiry_s == 0,
                            session_expiry_s=mqtt.session_expiry_s)
    link = MqttLink(settings, on_message=on_message, monotonic=monotonic,
                    on_connect=lambda: log.info("connected to %s:%s as %s", host, port,
                                                client_id))
    share = f"$share/{mqtt.share_group}/" if mqtt.share_group else ""
    # Statuses and inventories are shared out across the group; cert and online
    # topics go to every collector: a collector must know a device's certificate
    # before the group hands it that device's status (docs/design-changes.md).
    # Order matters at (re)start: the broker sends each filter's retained messages
    # as it processes that SUBSCRIBE, so certificates come before the retained
    # statuses and inventories they sign, not after (which would reject them all).
    link.subscribe(p.device_topic_filter(prefix, p.TopicKind.CERT), 1)
    link.subscribe(p.device_topic_filter(prefix, p.TopicKind.ONLINE), 1)
    link.subscribe(share + p.device_topic_filter(prefix, p.TopicKind.INVENTORY), 1)
    link.subscribe(share + p.device_topic_filter(prefix, p.TopicKind.STATUS), 1)
    return link


class Publisher:
    """QoS 1 publishes on the link that never raise: what the collector publishes
    (beacon, fleet topics, alert messages) is re-published later anyway, so a
    disconnected link drops it (logged at debug) instead of failing the caller."""

    def __init__(self, link: MqttLink) -> None:
        self._link = link

    def __call__(self, topic: str, payload: bytes, retain: bool = False) -> None:
        try:
            self._link.publish(topic, payload, qos=1, retain=retain)
        except TransportError as exc:
            log.debug("not published to %s: %s", topic, exc)


@dataclass(frozen=True, slots=True)
class Job:
    """A periodic job of the service tick. `claimed`: run by one collector of a group
    per period (`store.try_claim`); otherwise by every collector."""

    name: str
    every_s: float
    run: Callable[[], None]
    claimed: bool = False


class DeviceListener(Protocol):
    """Told about devices: `on_stored` on the ingest thread, before the PUBACK, with
    the statuses a batch made current; `on_online` when a device's liveness changes
    (its online topic, or the tick finding it silent)."""

    def on_stored(self, stored: Sequence[Stored]) -> None: ...
    def on_online(self, device_id: str, online: bool, at: datetime) -> None: ...


class Listeners:
    """Several listeners as one, called in order (fleet topics before alerts)."""

    def __init__(self, listeners: Sequence[DeviceListener]) -> None:
        self._listeners = tuple(listeners)

    def on_stored(self, stored: Sequence[Stored]) -> None:
        for listener in self._listeners:
            listener.on_stored(stored)

    def on_online(self, device_id: str, online: bool, at: datetime) -> None:
        for listener in self._listeners:
            listener.on_online(device_id, online, at)


class FleetTopics:
    """The retained `fleet/device/<id>` views dashboards subscribe to."""

    def __init__(self, publish: Publisher, prefix: str) -> None:
        self._publish = publish
        self._prefix = prefix
        self._published: dict[str, tuple[object, ...]] = {}

    def on_stored(self, stored: Sequence[Stored]) -> None:
        for item in stored:
            record = item.record
            # Published only when the device's state changed: the common case (nothing
            # changed) must cost one tuple comparison, not a JSON document.
            key = (record.severity, record.worst_code, tuple(f.code for f in record.findings))
            if self._published.get(record.device_id) == key:
                continue
            self._published[record.device_id] = key
            state = aggregate.device_state(record.severity, record.worst_code, online=True)
            view = {"device_id": record.device_id, "state": str(state),
                    "severity": pki.Severity(record.severity).name,
                    "worst": record.worst_code, "seq": record.seq,
                    "ts": p.format_instant(record.device_ts),
                    "received_at": p.format_instant(record.received_at),
                    "findings": [f.code for f in record.findings],
                    "clock_offset_lo_s": record.clock_offset_lo_s,
                    "clock_offset_hi_s": record.clock_offset_hi_s}
            self._publish(p.fleet_device_topic(self._prefix, record.device_id),
                          json.dumps(view, sort_keys=True).encode(), retain=True)

    def on_online(self, device_id: str, online: bool, at: datetime) -> None:
        self._published.pop(device_id, None)  # the next status republishes the view


class CollectorService:
    """Runs the parts it is handed (collector.wiring builds them): it never builds one,
    and nothing changes them after construction."""

    def __init__(self, config: CollectorConfig, *, store: Store, clock: wallclock.Clock,
                 link: MqttLink, inbox: Inbox, ingestor: Ingestor, listeners: DeviceListener,
                 jobs: Sequence[Job] = (), on_close: Sequence[Callable[[], None]] = (),
                 periodic: Periodic | None = None, web_url: str | None = None) -> None:
        self.config = config
        self.web_url = web_url  # where the web face listens (None: none), e.g. for logs
        self.clock = clock
        self.prefix = config.mqtt.topic_prefix
        self.store = store
        self.link = link
        self.inbox = inbox
        self.ingestor = ingestor
        self.listeners = listeners
        self.jobs = tuple(jobs)
        self.on_close = tuple(on_close)
        self.periodic = periodic or Periodic()
        self.publish = Publisher(link)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._last_run: dict[str, float] = {}

    # ------------------------------------------------------------ threads

    def start(self) -> None:
        self.link.start()
        self._worker = threading.Thread(target=self._work, name="certmon-ingest", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self.inbox.get(timeout=BATCH_WAIT_S if len(batch) < 8 else 0))
                except queue.Empty:
                    break
            try:
                self.ingestor.process(batch)
            except Exception:  # e.g. the database went away: keep running
                # Not acknowledged: the broker delivers these again after a reconnect.
                log.exception("a batch of %d messages failed; not acknowledged", len(batch))
                self.ingestor.rejected["store_error"] += len(batch)
                self._stop.wait(1.0)
                continue
            # Acknowledged only now that the store has them: at least once, not at
            # most once (a crash before this line means the broker re-sends).
            self.link.ack(batch)

    def run(self) -> int:
        """The service loop until stop(): periodic jobs and sd_notify."""
        self.start()
        systemd.ready()
        watchdog_s = systemd.watchdog_interval_s()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("periodic job failed")
            systemd.watchdog()
            self._stop.wait(min(TICK_S, watchdog_s / 2) if watchdog_s else TICK_S)
        self.close()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        systemd.stopping()
        if self._worker is not None:
            self._worker.join(timeout=10)
        # What is still in the inbox was never acknowledged: the broker keeps it for
        # this session (or re-sends it), so nothing is dropped half-way at shutdown.
        for hook in self.on_close:
            try:
                hook()
            except Exception:
                log.exception("shutdown hook failed")
        self.link.stop()
        self.store.close()

    # ------------------------------------------------------------ periodic jobs

    def _due(self, job: str, every_s: float) -> bool:
        now_mono = self.clock.monotonic()
        if now_mono - self._last_run.get(job, -1e18) < every_s:
            return False
        self._last_run[job] = now_mono
        return True

    def tick(self) -> None:
        now = self.clock.now()
        per = self.periodic
        if self._due("beacon", per.beacon_every_s) and \
                self.store.try_claim("beacon", now, per.beacon_every_s * 0.9):
            self.publish(p.beacon_topic(self.prefix), p.encode_message(p.Beacon(ts=now)))
        if self._due("silence", per.silence_every_s):
            for device_id in self.store.mark_silent(
                    now, factor=self.config.ingest.offline_after_intervals):
                log.info("%s is silent for more than %g intervals: offline", device_id,
                         self.config.ingest.offline_after_intervals)
                self.listeners.on_online(device_id, False, now)
        if self._due("summary", per.summary_every_s) and \
                self.store.try_claim("summary", now, per.summary_every_s * 0.9):
            self.publish(p.fleet_summary_topic(self.prefix),
                         json.dumps(self.fleet_summary(now), sort_keys=True).encode(), retain=True)
        if self._due("prune", per.prune_every_s):
            self.store.prune_seen(now - timedelta(days=30))
        for job in self.jobs:
            if self._due(job.name, job.every_s) and (
                    not job.claimed or self.store.try_claim(job.name, now, job.every_s * 0.9)):
                job.run()

    def fleet_summary(self, now: datetime) -> dict[str, object]:
        counts = self.store.fleet_counts()
        horizon = now + timedelta(days=self.config.policy.warn_days)
        soon = self.store.certificates_expiring_before(horizon)
        next_expiry = min((h.cert.not_after for h in soon), default=None)
        return {"v": p.SCHEMA_VERSION, "ts": p.format_instant(now), "counts": counts,
                "rejected": self.store.rejection_counts(),
                "next_expiry": p.format_instant(next_expiry) if next_expiry else None,
                "expiring_within_warn_days": len({h.cert.sha256 for h in soon})}
