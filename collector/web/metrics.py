"""Prometheus exposition of the fleet: a custom collector that reads on scrape.

Owns metric names, help texts and labels (docs/metrics.md lists each). Labels stay
low-cardinality: at most one series per device and role or bound, never a serial
or fingerprint, so a certificate renewal updates a value instead of minting a
series. Instants are absolute Unix timestamps (`*_not_after_seconds`), so rules
subtract `time()` themselves and a stale scrape never shows a wrong "days left".
Fleet values come from the web layer's `Snapshot` (shared with the dashboard, bounded
by its TTL, rendered once per snapshot); what the running collector process tells
(`ProcessCounters`: link, ingest counters, store health, backlog) is rendered anew on
every scrape (`live_exposition`), so a store outage shows at once even though no new
snapshot can be read meanwhile. Must not read the store beyond the snapshot, except
the persistent rejection totals when no process is given.

Bounded by default (`per_device="at_risk"`, `[web] metrics_per_device`): the fleet is
described by fleet-level families (devices by state, earliest expiry and holders per
issuing CA and role, a days-left histogram per role), and a device gets per-device
series only for what puts it at risk (a connection certificate within the horizon,
offline, clock in doubt, renewal due or failing): at 100k devices that is a few MB
instead of ~56 MB. `per_device="all"` exports every device's series (docs/metrics.md
gives the cardinality of both).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Literal, Protocol, get_args

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

import certmon
from certmon import wire as p
from collector import brokers
from collector.store import SEVERITY_NAMES, Store
from collector.storehealth import StoreHealth

from .api import STATE_RANK
from .fleet import DeviceBrief, Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PerDevice = Literal["at_risk", "all"]
PER_DEVICE_MODES: tuple[PerDevice, ...] = get_args(PerDevice)
# The roles a device's own connection depends on (the expiry rules' `role=~`); trust
# and broker certificates are shared by many devices: fleet-level, per issuing CA.
CONNECTION_ROLES = ("client", "chain", "signing")
HISTOGRAM_ROLES = ("client", "chain", "signing", "trust", "broker")
DAYS_LEFT_BUCKETS = (0.0, 3.0, 7.0, 14.0, 30.0, 60.0, 90.0, 180.0, 365.0)
# A clock offset bound beyond this is exported even without a clock finding: tighter
# than any sane alert threshold (the shipped rule's is 300 s).
CLOCK_SERIES_S = 60.0


class ProcessCounters(Protocol):
    """What /metrics reads of the running collector process, beyond the store."""

    def ingest_counts(self) -> Mapping[str, int]:
        """Messages handled by this process, by result (accepted, duplicate, rejected,
        and superseded / rate_limited: statuses admission acknowledged unverified)."""
        ...

    def rejected_counts(self) -> Mapping[str, int]:
        """This process's rejections by reason."""
        ...

    def broker_connected(self) -> bool:
        """Whether the collector's MQTT link is connected (statuses can arrive)."""
        ...

    def store_health(self) -> StoreHealth:
        """The store as the ingest sees it (up, or down since when, outages)."""
        ...

    def backlog(self) -> int:
        """Messages received and not yet stored (held unacknowledged)."""
        ...

    def crl_counts(self) -> Mapping[str, Mapping[str, int]]:
        """Fleet CRLs not believed ("refused": unreadable / unverified / older, each
        counted once per change) and CRL fetches that failed ("fetch_failed", by
        reason), when fleet CRLs are configured."""
        ...


class FleetCollector:
    """Every certmon_* family from one snapshot; `exposition` renders them."""

    def __init__(self, store: Store, process: ProcessCounters | None = None, *,
                 per_device: PerDevice = "at_risk", horizon_days: float = 30.0) -> None:
        """`per_device`: "at_risk" (per-device series only for what puts a device at
        risk) or "all"; `horizon_days`: how near an expiry or renewal point puts a
        device at risk (the collector's `[policy] warn_days`)."""
        if per_device not in PER_DEVICE_MODES:
            raise ValueError(f"per_device must be one of {', '.join(PER_DEVICE_MODES)}")
        self.store = store
        self.process = process
        self.per_device = per_device
        self.horizon = timedelta(days=horizon_days)

    def exposition(self, snap: Snapshot) -> bytes:
        """The fleet's text format for one given snapshot (memoised on it by the web
        app); without a process, the store's rejection totals too."""
        return _render(lambda: self.families(snap))

    def live_exposition(self) -> bytes:
        """The process's families, read now (cheap: a handful of series)."""
        return _render(self._process) if self.process is not None else b""

    def families(self, s: Snapshot) -> Iterator[Metric]:
        not_after = GaugeMetricFamily(
            "certmon_cert_not_after_seconds",
            "Earliest notAfter (Unix time) of the certificates a device holds, per role",
            labels=["device", "role"])
        online = GaugeMetricFamily("certmon_device_online",
                                   "1 if the device is online (status fresh, no LWT)",
                                   labels=["device"])
        offset = GaugeMetricFamily(
            "certmon_device_clock_offset_seconds",
            "Bounds of the device clock offset (device minus true time)",
            labels=["device", "bound"])
        renewal_due = GaugeMetricFamily(
            "certmon_renewal_due_seconds",
            "When the device's client certificate renewal is due (Unix time)",
            labels=["device"])
        renewal_failures = GaugeMetricFamily(
            "certmon_renewal_failures",
            "Consecutive failed renewal attempts of the device's client certificate",
            labels=["device"])
        findings: Counter[tuple[str, str]] = Counter()
        everything = self.per_device == "all"
        horizon_at = s.taken_at + self.horizon
        exported = 0
        for d in s.devices:
            shown = everything
            due_at, failures = d.renewal_due_at, d.renewal_failures
            if due_at is not None and (everything or due_at < horizon_at or failures):
                renewal_due.add_metric([d.device_id], due_at.timestamp())
                shown = True
            if failures is not None and (everything or failures > 0):
                renewal_failures.add_metric([d.device_id], float(failures))
                shown = True
            for role, earliest_at in sorted(d.earliest.items()):
                if everything or (role in CONNECTION_ROLES and earliest_at < horizon_at):
                    not_after.add_metric([d.device_id, role], earliest_at.timestamp())
                    shown = True
            if everything or not d.is_online:
                online.add_metric([d.device_id], 1.0 if d.is_online else 0.0)
                shown = True
            if everything or _clock_in_doubt(d):
                for bound, value in (("lo", d.clock_lo_s), ("hi", d.clock_hi_s)):
                    if value is not None:
                        offset.add_metric([d.device_id, bound], value)
                        shown = True
            exported += shown
            for code, level in d.findings:
                findings[(code, SEVERITY_NAMES.get(level, "unknown"))] += 1
        devices_shown = GaugeMetricFamily(
            "certmon_exported_devices",
            "Devices with per-device series in this exposition ([web] metrics_per_device)",
            labels=["mode"])
        devices_shown.add_metric([self.per_device], float(exported))
        yield devices_shown
        yield not_after
        yield online
        yield offset
        yield renewal_due
        yield renewal_failures

        yield from _fleet_expiry(s, horizon_at)

        states = Counter(d.state for d in s.devices)
        devices = GaugeMetricFamily("certmon_devices", "Devices by dashboard state",
                                    labels=["state"])
        for state in STATE_RANK:
            devices.add_metric([state], float(states.get(state, 0)))
        yield devices

        fam = GaugeMetricFamily("certmon_findings",
                                "Current findings across all devices' latest statuses",
                                labels=["code", "severity"])
        for (code, sev_name), n in sorted(findings.items()):
            fam.add_metric([code, sev_name], float(n))
        yield fam

        alerts = GaugeMetricFamily("certmon_alerts_active", "Firing alerts by severity",
                                   labels=["severity"])
        by_sev = Counter(SEVERITY_NAMES.get(a.severity, "unknown") for a in s.alerts)
        for name in SEVERITY_NAMES.values():
            alerts.add_metric([name], float(by_sev.get(name, 0)))
        yield alerts

        earliest = GaugeMetricFamily(
            "certmon_scan_earliest_expiry_seconds",
            "Earliest notAfter on the scanned endpoint's chain (Unix time)", labels=["target"])
        success = GaugeMetricFamily("certmon_scan_success",
                                    "1 if the last scan of the endpoint completed",
                                    labels=["target"])
        scanned_at = GaugeMetricFamily("certmon_scan_timestamp_seconds",
                                       "When the endpoint was last scanned (Unix time)",
                                       labels=["target"])
        for scan in s.scans:
            expiry = p.parse_instant(str(scan["earliest_expiry"]))
            if expiry is not None:
                earliest.add_metric([scan["target"]], expiry.timestamp())
            success.add_metric([scan["target"]], 1.0 if scan["success"] else 0.0)
            at = p.parse_instant(str(scan["scanned_at"]))
            if at is not None:
                scanned_at.add_metric([scan["target"]], at.timestamp())
        yield earliest
        yield success
        yield scanned_at

        if self.process is None:
            yield self._rejected(self.store.rejection_counts())
        info = InfoMetricFamily("certmon_build", "certmon version")
        info.add_metric([], {"version": certmon.__version__})
        yield info
        build = GaugeMetricFamily("certmon_snapshot_build_seconds",
                                  "Time the last fleet snapshot took to read from the store")
        build.add_metric([], s.build_s)
        yield build
        yield from brokers.metric_families(s.broker_hosts)  # docs/broker-host.md

    def _process(self) -> Iterator[Metric]:
        process = self.process
        assert process is not None
        up = GaugeMetricFamily("certmon_collector_up",
                               "1 while the collector is connected to the broker")
        up.add_metric([], 1.0 if process.broker_connected() else 0.0)
        yield up
        msgs = CounterMetricFamily("certmon_ingest_messages",
                                   "Messages handled by this collector process, by result",
                                   labels=["result"])
        for result, n in sorted(process.ingest_counts().items()):
            msgs.add_metric([result], float(n))
        yield msgs
        # This process's counters (they reset on restart, which rate() handles).
        yield self._rejected(process.rejected_counts())
        yield from _store_health(process.store_health(), process.backlog())
        yield from _crls(process.crl_counts())

    @staticmethod
    def _rejected(counts: Mapping[str, int]) -> Metric:
        rej = CounterMetricFamily("certmon_ingest_rejected",
                                  "Rejected messages by reason", labels=["reason"])
        for reason, n in sorted(counts.items()):
            rej.add_metric([reason], float(n))
        return rej


def _crls(counts: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    # A CRL the collector refuses or cannot fetch keeps the last good one in force
    # (collector.revocation): these say that the fleet's revocation list is going stale.
    # Only where fleet CRLs (or their URLs) are configured.
    for key, name, text in (
            ("refused", "certmon_crl_refused", "Fleet CRLs not believed, by reason"),
            ("fetch_failed", "certmon_crl_fetch_failures",
             "Fleet CRL fetches (tls.fleet_crl_urls) that failed, by reason")):
        if key not in counts or not counts[key]:
            continue
        family = CounterMetricFamily(name, text, labels=["reason"])
        for reason, n in sorted(counts[key].items()):
            family.add_metric([reason], float(n))
        yield family


def _clock_in_doubt(d: DeviceBrief) -> bool:
    """The clock is (part of) the device's problem, or its offset interval lies clearly
    away from zero."""
    if d.state == "clock" or any(code.startswith("CLOCK") and level >= 1
                                 for code, level in d.findings):
        return True
    return ((d.clock_lo_s is not None and d.clock_lo_s > CLOCK_SERIES_S)
            or (d.clock_hi_s is not None and d.clock_hi_s < -CLOCK_SERIES_S))


def _fleet_expiry(s: Snapshot, horizon_at: datetime) -> Iterator[Metric]:
    """Fleet-level expiry, bounded by the number of CAs and roles, not of devices:
    per issuing CA and role the earliest notAfter held and how many hold one (and one
    expiring within the horizon); per role a histogram of devices' days left."""
    earliest: dict[tuple[str, str], datetime] = {}
    holders: Counter[tuple[str, str]] = Counter()
    expiring: Counter[tuple[str, str]] = Counter()
    for agg in s.certs.values():
        cert = agg.cert
        issuer = cert.issuer or cert.subject  # a trust-store CA known by name only
        for role, n in agg.holders.items():
            key = (issuer, role)
            if key not in earliest or cert.not_after < earliest[key]:
                earliest[key] = cert.not_after
            holders[key] += n
            if cert.not_after < horizon_at:
                expiring[key] += n
    by_ca = GaugeMetricFamily(
        "certmon_ca_earliest_not_after_seconds",
        "Earliest notAfter (Unix time) among the certificates devices hold in a role, "
        "per issuing CA", labels=["issuer", "role"])
    held = GaugeMetricFamily(
        "certmon_ca_holders",
        "Device-certificate links per issuing CA and role", labels=["issuer", "role"])
    soon = GaugeMetricFamily(
        "certmon_ca_expiring_holders",
        "Device-certificate links per issuing CA and role whose certificate expires "
        "within the at-risk horizon ([policy] warn_days)", labels=["issuer", "role"])
    for key in sorted(earliest):
        by_ca.add_metric(list(key), earliest[key].timestamp())
        held.add_metric(list(key), float(holders[key]))
        soon.add_metric(list(key), float(expiring[key]))
    yield by_ca
    yield held
    yield soon

    per_role: dict[str, list[float]] = {role: [] for role in HISTOGRAM_ROLES}
    for d in s.devices:
        for role, at in d.earliest.items():
            per_role.setdefault(role, []).append((at - s.taken_at).total_seconds() / 86400)
    days = HistogramMetricFamily(
        "certmon_cert_days_left",
        "Devices by days left on their earliest certificate in a role, as of the "
        "snapshot (certmon_snapshot_taken_seconds)", labels=["role"])
    for role in sorted(per_role):
        values = sorted(per_role[role])
        buckets = [(f"{edge:g}", float(bisect_right(values, edge))) for edge in DAYS_LEFT_BUCKETS]
        days.add_metric([role], [*buckets, ("+Inf", float(len(values)))], sum(values))
    yield days
    taken = GaugeMetricFamily("certmon_snapshot_taken_seconds",
                              "When the fleet snapshot was taken (Unix time)")
    taken.add_metric([], s.taken_at.timestamp())
    yield taken


def _store_health(h: StoreHealth, backlog: int) -> Iterator[Metric]:
    up = GaugeMetricFamily("certmon_collector_store_up",
                           "1 while the collector can write its store, 0 during an outage")
    up.add_metric([], 1.0 if h.is_up else 0.0)
    yield up
    held = GaugeMetricFamily("certmon_collector_ingest_backlog_messages",
                             "Messages received and not yet stored (unacknowledged)")
    held.add_metric([], float(backlog))
    yield held
    outages = CounterMetricFamily("certmon_collector_store_outages",
                                  "Store outages this collector process lived through")
    outages.add_metric([], float(h.outages))
    yield outages
    if not h.is_up and h.since_at is not None:
        since = GaugeMetricFamily("certmon_collector_store_down_since_seconds",
                                  "When the current store outage began (Unix time)")
        since.add_metric([], h.since_at.timestamp())
        yield since
    if h.last_outage is not None:
        last = GaugeMetricFamily("certmon_collector_store_last_outage_seconds",
                                 "How long the last store outage lasted")
        last.add_metric([], h.last_outage.duration_s)
        yield last


def _render(families: Callable[[], Iterable[Metric]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)


class _Fixed(Collector):
    """Some families as a prometheus_client collector, for one `generate_latest`."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families()
