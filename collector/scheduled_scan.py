"""The collector's scheduled scans of its configured broker endpoints.

Owns turning the config into a scan job: which endpoints (`[[scan_targets]]`), with
which trust and policy, storing each endpoint's verdict (`store.put_scan`, the same
JSON `certmon-scan --json` prints) and handing the findings to the alert rules.
Probing and judging are the core's (`certmon.scan`, `certmon.scanverdict`), shared
with the `scanner` role; this module must not import that role.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime

from certmon import pki
from certmon.scan import distinct_client_ids, load_trust, probe_targets, scan_targets
from certmon.tlsprobe import ProbeTarget

from .config import CollectorConfig
from .store import ScanRecord, Store

log = logging.getLogger("certmon.collector.scan")


def make_scan_job(config: CollectorConfig, store: Store, now: Callable[[], datetime],
                  on_reports: Callable[[Sequence[tuple[str, Sequence[pki.Finding]]]], None]
                  ) -> Callable[[], None]:
    # Each endpoint its own MQTT client id (two listeners of one broker would otherwise
    # drop each other's probe), distinct per collector process of a share group too.
    targets = distinct_client_ids(probe_targets(
        config.scan_targets, ProbeTarget(host="", timeout_s=config.scan_timeout_s)),
        f"certmon-collector-scan-{os.getpid()}")
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
