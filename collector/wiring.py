"""The collector's composition root: config in, a wired CollectorService out.

Owns which parts run together and who is handed what: the store, the broker link and
its inbox, certificate cache and verifier pool, the ingestor, the device listeners
(fleet topics, then the alert driver), the periodic jobs (fleet alert sweep, scheduled
scans), the web server and the order things close in. Every part is built here,
bottom-up, and handed its collaborators; nothing sets an attribute on a built part
afterwards. Must not hold behaviour of its own beyond that: each part is built in its
own module (docs/design-changes.md, "Compose by construction").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from certmon import clock as wallclock
from certmon import pki
from certmon.mqttproc import ProcessLink

from .admission import Budget
from .alerts.driver import AlertDriver
from .alerts.engine import AlertEngine
from .alerts.sinks import build_sinks
from .backlog import Backlog
from .config import CollectorConfig
from .crlfetch import CrlSource
from .identity import collector_signer
from .ingest import Ingestor
from .publish import FleetTopics, Publisher
from .revocation import FleetCrls
from .service import (
    CollectorService,
    Job,
    Listeners,
    Periodic,
    collector_link,
    load_fleet_cas,
)
from .store import open_store
from .storehealth import HealthCell, StoreHealth
from .trust import resolve_requirements
from .verify import CertCache
from .verifypool import VerifierPool

log = logging.getLogger("certmon.collector")


def _fleet_crls(config: CollectorConfig, certs: CertCache,
                monotonic: Callable[[], float]) -> FleetCrls | None:
    tls = config.tls
    if not tls.fleet_crl and not tls.fleet_crl_urls:
        return None
    cas = [pki.LoadedCert(ca, pki.facts_from_cert(ca)) for ca in certs.fleet_cas]
    urls = CrlSource(tls.fleet_crl_urls, timeout_s=tls.crl_fetch_timeout_s,
                     every_s=tls.crl_fetch_every_s, monotonic=monotonic) \
        if tls.fleet_crl_urls else None
    return FleetCrls(tls.fleet_crl, cas, urls, chain_certs=certs.chain_certs)


def build_collector(config: CollectorConfig, *, web: bool = True,
                    periodic: Periodic | None = None,
                    clock: wallclock.Clock | None = None) -> CollectorService:
    """Every part of a collector, built and handed over. The web server listens from
    here on; the rest starts with `CollectorService.start()`/`run()`."""
    clock = clock or wallclock.SystemClock()
    periodic = periodic or Periodic()
    prefix = config.mqtt.topic_prefix
    # What the config names is read first: a bad file fails before anything is opened.
    requirements = resolve_requirements(config.trust_requirements)
    certs = CertCache(load_fleet_cas(config))
    basic_auth = _basic_auth(config) if web else None
    with contextlib.ExitStack() as undo:  # a part that fails closes those built before
        store = open_store(config.store.url, reject_sample_limit=config.ingest.reject_samples)
        undo.callback(store.close)
        store.migrate()
        inbox = Backlog(clock.now)  # stamps each message's arrival
        health = HealthCell()
        link = collector_link(config, inbox.put_many)
        publish = Publisher(link, collector_signer(config))
        sinks = build_sinks(config.alerts, topic_prefix=prefix, publish=publish)
        engine = AlertEngine(store, sinks.notify, alertmanagers=sinks.alertmanager,
                             renotify_interval_s=config.alerts.renotify_interval_s,
                             resend_interval_s=config.alerts.resend_interval_s,
                             clock=clock.now)
        undo.callback(engine.close, 1.0)
        crls = _fleet_crls(config, certs, clock.monotonic)
        alerts = AlertDriver(store, engine, requirements=requirements,
                             policy=pki.Policy(**dataclasses.asdict(config.policy)),
                             now=clock.now,
                             fleet_crls=crls.current if crls is not None else None)
        listeners = Listeners([FleetTopics(publish, prefix), alerts])
        workers = config.ingest.verify_workers
        pool = VerifierPool(workers) if workers else None
        if pool is not None:
            undo.callback(pool.close)
        ingestor = Ingestor(store, certs, prefix=prefix,
                            legacy_v1_topics=config.mqtt.legacy_v1_topics,
                            max_payload_bytes=config.ingest.max_payload_bytes,
                            now=clock.now, on_stored=listeners.on_stored,
                            on_online=listeners.on_online, pool=pool,
                            budget=Budget(config.ingest.device_rate_per_min / 60.0,
                                          float(config.ingest.device_burst)),
                            on_flooding=alerts.on_flooding)
        jobs = [Job("alerts.fleet", periodic.fleet_sweep_every_s, alerts.sweep, claimed=True)]
        if sinks.alertmanager:  # every collector resends: Alertmanager dedups by labels
            jobs.append(Job("alerts.resend", float(config.alerts.resend_interval_s),
                            engine.resend))
        if config.scan_targets:
            from .scheduled_scan import make_scan_job

            scan = make_scan_job(config, store, clock.now, alerts.on_scans)
            jobs.append(Job("scan", float(config.scan_interval_s), in_background(scan),
                            claimed=True))
        on_close: list[Callable[[], None]] = [alerts.close]
        web_url = None
        if web:
            from .web.app import start_web

            server = start_web(store, config.web.listen,
                               process=LiveCounters(ingestor, link, inbox, health, crls),
                               trust_requirements=requirements, basic_auth=basic_auth,
                               now=clock.now,
                               metrics_per_device=config.web.metrics_per_device,
                               metrics_horizon_days=float(config.policy.warn_days))
            on_close.append(server.stop)
            web_url = server.url
        if pool is not None:
            on_close.append(pool.close)  # after the worker thread: the service joins it first
        service = CollectorService(config, store=store, clock=clock, link=link, inbox=inbox,
                                   ingestor=ingestor, listeners=listeners, health=health,
                                   jobs=jobs,
                                   on_close=on_close, periodic=periodic, web_url=web_url,
                                   publisher=publish)
        undo.pop_all()  # built: from now on the service closes what it was handed
    return service


@dataclass(frozen=True, slots=True)
class LiveCounters:
    """The running process as /metrics sees it (`collector.web.ProcessCounters`)."""

    ingestor: Ingestor
    link: ProcessLink
    inbox: Backlog
    health: HealthCell
    crls: FleetCrls | None = None

    def ingest_counts(self) -> Mapping[str, int]:
        ing = self.ingestor
        # superseded / rate_limited: acknowledged unverified by admission, not rejected.
        return {"accepted": ing.accepted, "duplicate": ing.duplicates,
                "rejected": sum(ing.rejected_counts().values()),
                "superseded": 0, "rate_limited": 0, **ing.unadmitted_counts()}

    def rejected_counts(self) -> Mapping[str, int]:
        return self.ingestor.rejected_counts()

    def broker_connected(self) -> bool:
        return self.link.is_connected

    def store_health(self) -> StoreHealth:
        return self.health.get()

    def backlog(self) -> int:
        return len(self.inbox)

    def crl_counts(self) -> Mapping[str, Mapping[str, int]]:
        return self.crls.counts() if self.crls is not None else {}


def in_background(job: Callable[[], None]) -> Callable[[], None]:
    """Run a slow periodic job (scans wait for timeouts) in its own thread, one at a
    time, so the service tick (beacon, silence, summary) is never held up by it."""
    running = threading.Lock()

    def start() -> None:
        if not running.acquire(blocking=False):
            return  # the previous run is still going: skip this period

        def run() -> None:
            try:
                job()
            except Exception:  # the next period tries again
                log.exception("background job failed")
            finally:
                running.release()

        threading.Thread(target=run, name="certmon-scan", daemon=True).start()

    return start


def _basic_auth(config: CollectorConfig) -> tuple[str, str] | None:
    web = config.web
    if web.basic_auth_user and web.basic_auth_password_file:
        password = web.basic_auth_password_file.read_text().strip()
        return web.basic_auth_user, password
    return None
