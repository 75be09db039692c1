"""The collector's scheduled scans of its configured broker endpoints.

Owns turning `[[scan_targets]]` into probes on a schedule, storing each endpoint's
verdict (`store.put_scan`, the same JSON `certmon-scan --json` prints) and handing
the findings to the alert rules. Probing and judging are collector.scan's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from certmon import pki
from certmon.tlsprobe import ProbeTarget

from .config import CollectorConfig
from .scan import load_trust, scan_targets
from .store import ScanRecord, Store

log = logging.getLogger("certmon.collector.scan")


def probe_targets(config: CollectorConfig) -> list[ProbeTarget]:
    return [ProbeTarget(host=t.host, port=t.port, servername=t.servername, alpn=t.alpn,
                        mqtt=t.mqtt, timeout_s=config.scan_timeout_s)
            for t in config.scan_targets]


def make_scan_job(config: CollectorConfig, store: Store, now: Callable[[], datetime],
                  on_reports: Callable[[Sequence[tuple[str, Sequence[pki.Finding]]]], None]
                  ) -> Callable[[], None]:
    targets = probe_targets(config)
    # The broker endpoints are judged with the CA bundle the collector uses for its own
    # broker connection: the one the fleet's brokers are expected to chain to.
    trust = load_trust(str(config.tls.ca_bundle))
    policy = pki.Policy(**dataclasses.asdict(config.policy))

    def job() -> None:
        at = now()
        reports = scan_targets(targets, trust, at, policy)
        for report in reports:
            store.put_scan(ScanRecord(report.name, at, int(report.severity),
                                      json.dumps(pki.as_json(report), sort_keys=True)))
        log.info("scanned %d endpoint(s): %s", len(reports),
                 ", ".join(f"{r.name}={r.severity.name}" for r in reports))
        on_reports([(r.name, r.findings) for r in reports])

    return job
