"""The running collector: MQTT in, batches through ingest, periodic jobs, fleet topics.

Owns threads and timing: paho's network thread only enqueues (collector.backlog); one
worker thread takes batches (verification is CPU, the store wants few large
transactions), and while the store is unavailable holds its batch unacknowledged and
retries it with capped back-off, so nothing is lost and nothing is stored twice; a
periodic tick publishes the time beacon, marks silent devices offline (judged at the
ingest watermark, never at a backlog's expense), publishes the fleet summary and runs
the jobs it was handed. Jobs that must run once per period across several collectors
are claimed atomically in the store (`try_claim`). Also owns the store's health as
this process sees it (log lines, sd_notify STATUS and watchdog) and the seams its parts
meet at (`Job`, `DeviceListener`, the link and its inbox).

Must not build its parts: `collector.wiring` builds each and hands it over, and
nothing sets an attribute on a built service afterwards.
"""

from __future__ import annotations

import functools
import json
import logging
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
from certmon.errors import ConfigError
from certmon.mqtt import Incoming, LinkSettings
from certmon.mqttproc import ProcessLink

from .backlog import Backlog
from .config import CollectorConfig
from .effects import Plan, rejected_plan
from .ingest import Ingestor, Stored
from .publish import Publisher
from .store import Store, StoreError, StoreUnavailable
from .storehealth import (
    HealthCell,
    StoreHealth,
    came_back,
    processing_clock,
    retry_delay_s,
    status_text,
    went_down,
)

log = logging.getLogger("certmon.collector")

BATCH_MAX = 256
BATCH_WAIT_S = 0.05
TICK_S = 5.0
BUG_ATTEMPTS = 3  # a batch failing for a reason other than the store: tries, then rejected


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


def collector_link(config: CollectorConfig,
                   on_messages: Callable[[Sequence[Incoming]], None]) -> ProcessLink:
    """The collector's broker connection and its subscriptions (not started)."""
    mqtt = config.mqtt
    prefix = mqtt.topic_prefix
    host, port, is_tls = broker_endpoint(mqtt.broker)
    client_id = mqtt.client_id or f"certmon-collector-{socket.gethostname()}"
    settings = LinkSettings(host=host, port=port, client_id=client_id, is_tls=is_tls,
                            ca_bundle=str(config.tls.ca_bundle),
                            cert=str(config.tls.cert), key=str(config.tls.key),
                            keepalive_s=mqtt.keepalive_s, max_inflight=100,
                            manual_ack=True, protocol=mqtt.protocol,
                            # With v311 a persistent session is clean_session false;
                            # its lifetime is the broker's (3.1.1 cannot send one).
                            clean_start=mqtt.session_expiry_s == 0,
                            session_expiry_s=mqtt.session_expiry_s)
    # The connection lives in a child process (certmon.mqttproc): paho's per-message
    # work runs on the other core and the inbox gets a batch per wake-up.
    link = ProcessLink(settings, on_messages=on_messages,
                       on_connect=lambda: log.info("connected to %s:%s as %s", host, port,
                                                   client_id))
    share = f"$share/{mqtt.share_group}/" if mqtt.share_group else ""
    # Statuses and inventories are shared out across the group; cert and online
    # topics go to every collector: a collector must know a device's certificate
    # before the group hands it that device's status (docs/design-changes.md).
    # Order matters at (re)start: the broker sends each filter's retained messages
    # as it processes that SUBSCRIBE, so certificates come before the retained
    # statuses and inventories they sign, not after (which would reject them all).
    # With mqtt.legacy_v1_topics each kind is also subscribed in the v1 layout.
    for kind, shared in ((p.TopicKind.CERT, ""), (p.TopicKind.ONLINE, ""),
                         (p.TopicKind.INVENTORY, share), (p.TopicKind.STATUS, share),
                         (p.TopicKind.HEARTBEAT, share)):
        for topic_filter in p.device_topic_filters(prefix, kind,
                                                   legacy_v1=mqtt.legacy_v1_topics):
            link.subscribe(shared + topic_filter, 1)
    return link


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


class CollectorService:
    """Runs the parts it is handed (collector.wiring builds them): it never builds one,
    and nothing changes them after construction."""

    def __init__(self, config: CollectorConfig, *, store: Store, clock: wallclock.Clock,
                 link: ProcessLink, inbox: Backlog, ingestor: Ingestor, listeners: DeviceListener,
                 health: HealthCell | None = None,
                 jobs: Sequence[Job] = (), on_close: Sequence[Callable[[], None]] = (),
                 periodic: Periodic | None = None, web_url: str | None = None,
                 publisher: Publisher | None = None) -> None:
        self.config = config
        self.web_url = web_url  # where the web face listens (None: none), e.g. for logs
        self.clock = clock
        self.prefix = config.mqtt.topic_prefix
        self.store = store
        self.link = link
        self.inbox = inbox
        self.ingestor = ingestor
        self.listeners = listeners
        self.health = health or HealthCell()
        self.jobs = tuple(jobs)
        self.on_close = tuple(on_close)
        self.periodic = periodic or Periodic()
        self.publish = publisher or Publisher(link)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._last_run: dict[str, float] = {}
        self._beat_mono = clock.monotonic()  # the ingest worker's heartbeat
        self._unrecorded: list[StoreHealth] = []  # ended outages not yet in the store
        self._offline_untold: list[tuple[str, datetime]] = []  # marked silent, not yet told

    # ------------------------------------------------------------ threads

    def start(self) -> None:
        self.link.start()
        self._worker = threading.Thread(target=self._work, name="certmon-ingest", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            self._beat_mono = self.clock.monotonic()
            batch = self.inbox.take(BATCH_MAX, 0.5, BATCH_WAIT_S)
            if batch and self._store_batch(batch):
                # Acknowledged only now that the store has them: at least once, not at
                # most once (a crash before this line means the broker re-sends).
                self.link.ack(batch)
                self.inbox.done(len(batch))

    def _store_batch(self, batch: Sequence[Incoming]) -> bool:
        """Decide and apply `batch`, holding it through a store outage; False only when
        stopped first (then it stays unacknowledged: the broker delivers it again)."""
        plan: Plan | None = None
        attempt = bugs = 0
        while not self._stop.is_set():
            try:
                if plan is None:
                    plan = self.ingestor.decide(batch)
                self.ingestor.apply(plan)
            except StoreUnavailable as exc:
                attempt += 1
                self._store_failed(exc)
                self._wait(retry_delay_s(attempt, self.config.ingest.store_retry_max_s))
                continue
            except Exception as exc:  # a bug, not the store: neither lose nor loop forever
                bugs += 1
                log.exception("a batch of %d messages failed (attempt %d)", len(batch), bugs)
                if bugs >= BUG_ATTEMPTS:  # counted and sampled, then acknowledged
                    plan = rejected_plan(batch, plan, f"{type(exc).__name__}: {exc}",
                                         self.clock.now())
                self._wait(retry_delay_s(bugs, self.config.ingest.store_retry_max_s))
                continue
            self._store_worked()
            return True
        return False

    def _wait(self, seconds: float) -> None:
        """Sleep for a retry, still beating: a worker waiting for the store is alive."""
        end = self.clock.monotonic() + seconds
        while not self._stop.is_set() and (left := end - self.clock.monotonic()) > 0:
            self._beat_mono = self.clock.monotonic()
            self._stop.wait(min(left, 1.0))

    def _store_failed(self, exc: Exception) -> None:
        held = len(self.inbox)
        error = type(exc.__cause__ or exc).__name__  # the driver's class: no URL in it
        before, _ = self.health.update(lambda h: went_down(h, self.clock.now(), error, held))
        if before.is_up:
            log.error("store unavailable (%s): holding %d messages unacknowledged, retrying "
                      "every ≤ %g s; devices are not judged silent meanwhile", exc, held,
                      self.config.ingest.store_retry_max_s)

    def _store_worked(self) -> None:
        if self.health.get().is_up:
            return
        before, after = self.health.update(
            lambda h: came_back(h, self.clock.now(), self.link.settings.client_id))
        if not before.is_up and after.last_outage is not None:
            outage = after.last_outage
            log.warning("store back after %.1f s: the %d messages held meanwhile are stored "
                        "in order, none lost", outage.duration_s, outage.messages_held)
            self._unrecorded.append(after)

    def worker_alive(self, within_s: float) -> bool:
        """The ingest worker looped (or waited for the store) within `within_s`."""
        return (self._worker is not None and self._worker.is_alive()
                and self.clock.monotonic() - self._beat_mono <= within_s)

    def run(self) -> int:
        """The service loop until stop(): periodic jobs and sd_notify."""
        self.start()
        systemd.ready()
        watchdog_s = systemd.watchdog_interval_s()
        told = ""
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("periodic job failed")
            # The watchdog vouches for the ingest, not only for this loop: a worker
            # stuck for a whole interval (a hung call, a deadlock) gets no ping and
            # systemd restarts the collector. Waiting out a store outage is not stuck:
            # the worker beats while it waits, so an outage alone keeps the pings.
            if watchdog_s and self.worker_alive(watchdog_s):
                systemd.watchdog()
            text = status_text(self.health.get(), len(self.inbox), self.clock.now())
            if text != told:
                told = text if systemd.status(text) else told
            self._stop.wait(min(TICK_S, watchdog_s / 2) if watchdog_s else TICK_S)
        self.close()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        systemd.stopping()
        self.inbox.close()  # paho's thread may wait in put(): let it go
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

    def silence_horizon(self, now: datetime) -> datetime:
        """The instant silence is judged at: the arrival of the oldest message not yet
        stored, or the processing clock after a store outage (storehealth), or now."""
        oldest = self.inbox.oldest_at()
        horizon = processing_clock(self.health.get(), now)
        return min(horizon, oldest) if oldest is not None else horizon

    def tick(self) -> None:
        """Each duty on its own: one that meets a store outage (or a bug) does not keep
        the others from their turn — the Alertmanager resend is built to run then."""
        now = self.clock.now()
        duties: list[tuple[str, Callable[[datetime], None]]] = [
            ("outages", self._record_outages), ("beacon", self._beacon),
            ("silence", self._silence), ("summary", self._summary), ("prune", self._prune)]
        duties += [(job.name, functools.partial(self._job, job)) for job in self.jobs]
        for name, duty in duties:
            try:
                duty(now)
            except StoreUnavailable as exc:
                # Not a traceback every 5 s: the outage is logged once, when it starts.
                self._store_failed(exc)
            except Exception:
                log.exception("periodic duty %s failed", name)
        if not self.health.get().is_up and len(self.inbox) == 0:
            # Nothing held, so no batch of the worker's will find out: a small write of
            # the tick's own does (the claim row of a job that is never run).
            try:
                self.store.try_claim("store.probe", now, 0.0)
            except StoreUnavailable:
                return
            self._store_worked()

    def _record_outages(self, _now: datetime) -> None:
        while self._unrecorded:  # for `certmon-collector report`
            outage = self._unrecorded[0].last_outage
            try:
                if outage is not None:
                    self.store.record_outage(outage)
            except StoreUnavailable:
                raise  # kept for the next tick
            except StoreError:
                log.exception("could not record a store outage; dropped")
            self._unrecorded.pop(0)

    def _beacon(self, now: datetime) -> None:
        per = self.periodic
        if self._due("beacon", per.beacon_every_s) and \
                self.store.try_claim("beacon", now, per.beacon_every_s * 0.9):
            self.publish(p.beacon_topic(self.prefix), p.encode_message(p.Beacon(ts=now)))

    def _silence(self, now: datetime) -> None:
        if self.health.get().is_up and self._due("silence", self.periodic.silence_every_s):
            horizon = self.silence_horizon(now)
            factor = self.config.ingest.offline_after_intervals
            for device_id in self.store.mark_silent(horizon, factor=factor):
                log.info("%s is silent for more than %g intervals: offline", device_id, factor)
                self._offline_untold.append((device_id, horizon))
        # Marked offline in the store, so never returned again: each device is told to
        # the listeners until that worked, even across a store outage.
        while self._offline_untold:
            device_id, at = self._offline_untold[0]
            self.listeners.on_online(device_id, False, at)
            self._offline_untold.pop(0)

    def _summary(self, now: datetime) -> None:
        per = self.periodic
        if self._due("summary", per.summary_every_s) and \
                self.store.try_claim("summary", now, per.summary_every_s * 0.9):
            self.publish(p.fleet_summary_topic(self.prefix),
                         json.dumps(self.fleet_summary(now), sort_keys=True).encode(), retain=True)

    def _prune(self, now: datetime) -> None:
        if self._due("prune", self.periodic.prune_every_s):
            self.store.prune_seen(now - timedelta(days=30))

    def _job(self, job: Job, now: datetime) -> None:
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

