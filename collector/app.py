"""The collector's composition root: config in, a wired CollectorService out.

Owns which parts run together (store and ingest in the service, the alert engine
and its sinks, the web server) and nothing else; each part is built in its own module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .alerting import CollectorAlerts
from .config import CollectorConfig
from .service import CollectorService

log = logging.getLogger("certmon.collector")

# How often the fleet-wide alert rules (required CAs, shared certificates) and
# re-notification run; one collector of a group does it per period.
FLEET_SWEEP_S = 60.0


def build_collector(config: CollectorConfig, *, web: bool = True) -> CollectorService:
    service = CollectorService(config)
    alerts = CollectorAlerts(config, service.store,
                             lambda topic, payload, retain: service.publish(topic, payload,
                                                                            retain),
                             service.clock.now)
    service.alert_hook = lambda _svc, stored: alerts.on_stored(stored)
    service.online_listeners.append(alerts.on_online)
    service.jobs.append(("alerts.fleet", FLEET_SWEEP_S, alerts.sweep, True))
    service.on_close.append(alerts.close)
    service.alerts = alerts
    if config.scan_targets:
        from .scheduled_scan import make_scan_job

        job = make_scan_job(config, service.store, service.clock.now, alerts.on_scans)
        service.jobs.append(("scan", float(config.scan_interval_s), in_background(job), True))
    if web:
        from .web.app import start_web

        server = start_web(service, config.web.listen, basic_auth=_basic_auth(config))
        service.web = server
        service.on_close.append(server.stop)
    return service


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
