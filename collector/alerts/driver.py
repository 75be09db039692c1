"""Collector events → alert evaluations: the glue between ingest and the alert engine.

Owns *when* each rule family is evaluated: a device's flooding when the ingest's
admission says it began or ended, a device's findings when its stored status
changed them (not on every status: at thousands of statuses per second, unchanged
findings need no transaction), its liveness when the online state changes, and the
fleet rules (required CAs, shared client certificates) plus re-notification on a
periodic sweep that one collector of a group claims in the store. The rules are in
`collector.alerts.rules`, the lifecycle and delivery in `collector.alerts.engine`;
the driver is handed a built engine and the resolved trust requirements
(`collector.trust`) and builds neither. Must not block on a sink.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from certmon import pki
from certmon import wire as p
from certmon.pki.crl import CrlFacts
from collector.ingest import Stored
from collector.store import CertRole, DeviceRow, Store
from collector.trust import RequiredCA

from .engine import AlertEngine
from .rules import (
    RENEWAL_FAILING,
    CertName,
    HeldCert,
    Scope,
    device_alerts,
    fleet_crl_alerts,
    flooding_alerts,
    offline_alerts,
    renewal_alerts,
    revoked_cert_alerts,
    scan_alerts,
    shared_client_cert_alerts,
    trust_requirement_alerts,
)

__all__ = ["AlertDriver"]


class AlertDriver:
    """A `collector.service.DeviceListener` that turns device events into evaluations."""

    def __init__(self, store: Store, engine: AlertEngine, *,
                 requirements: Sequence[RequiredCA], policy: pki.Policy,
                 now: Callable[[], datetime],
                 fleet_crls: Callable[[], Sequence[CrlFacts]] | None = None) -> None:
        self.store = store
        # The fleet's CRLs, read afresh at each sweep (collector.revocation).
        self.fleet_crls = fleet_crls
        self.engine = engine
        self.requirements = tuple(requirements)
        self.policy = policy
        self.now = now
        # device → the finding set last evaluated by this process (None: not yet).
        self._evaluated: dict[str, tuple[tuple[str, int, str | None], ...]] = {}

    def on_stored(self, stored: Sequence[Stored]) -> None:
        now = self.now()
        for item in stored:
            status = item.status
            renewal = renewal_alerts(status.device_id, status.renewal,
                                     interval_s=status.interval_s, now=now)
            key = (*sorted((f.code, int(f.severity), f.cert) for f in status.findings),
                   # The failure's reason, not the overdue age: that changes every time.
                   *((c.rule, int(c.severity), c.summary if c.rule == RENEWAL_FAILING else None)
                     for c in renewal))
            if self._evaluated.get(status.device_id) == key:
                continue
            # One store read for both: the findings, and the offline alerts that a
            # fresh status ends (the device is back).
            self.engine.evaluate_device(status.device_id, {
                Scope.FINDINGS: device_alerts(status.device_id, status.findings, online=True,
                                              now=now, certs=_names(status)) + renewal,
                Scope.OFFLINE: []}, now=now)
            # Marked only once evaluated: when the store fails mid-batch, ingest
            # re-runs this listener and the devices not yet evaluated still are.
            self._evaluated[status.device_id] = key

    def on_online(self, device_id: str, online: bool, at: datetime) -> None:
        row = self.store.device(device_id)
        client = None
        if row is not None and row.client_sha256:
            client = self.store.certificate(row.client_sha256)
        self.engine.evaluate(device_id, offline_alerts(
            device_id, online=online, last_seen_at=row.last_received_at if row else None,
            client_not_after=client.not_after if client else None,
            client_sha256=row.client_sha256 if row else None, now=at, policy=self.policy,
            interval_s=row.interval_s if row else None),
            scope=Scope.OFFLINE, now=at)

    def on_flooding(self, device_id: str, flooding: bool, at: datetime) -> None:
        """The ingest's admission found the device over its budget, or back within it."""
        self.engine.evaluate(device_id, flooding_alerts(device_id, flooding=flooding),
                             scope=Scope.FLOODING, now=at)

    def sweep(self) -> None:
        """Fleet rules and re-notification; call periodically under a store claim."""
        now = self.now()
        devices = self.store.devices()
        if self.requirements:
            holders: dict[str, set[str]] = {}
            for req in self.requirements:
                holders[req.sha256] = {dev for dev, role in self.store.holders(req.sha256)
                                       if role == CertRole.TRUST}
            with_inventory = self.store.devices_with_inventory()
            self.engine.evaluate_fleet(
                trust_requirement_alerts(self.requirements, holders, with_inventory),
                scope=Scope.TRUST, now=now)
        clients = {d.device_id: d.client_sha256 for d in devices if d.client_sha256}
        self.engine.evaluate(None, shared_client_cert_alerts(clients),
                             scope=Scope.SHARED_CERT, now=now)
        if self.fleet_crls is not None:
            crls = self.fleet_crls()
            self.engine.evaluate_fleet([
                *revoked_cert_alerts(self._held_client_certs(
                    [d for d in devices if d.is_online]), crls),
                *fleet_crl_alerts(crls, now, self.policy)], scope=Scope.REVOKED, now=now)
        self.engine.renotify_due(now)

    def _held_client_certs(self, devices: Sequence[DeviceRow]) -> list[HeldCert]:
        held = []
        for device in devices:
            row = self.store.certificate(device.client_sha256) if device.client_sha256 else None
            if row is not None:
                held.append(HeldCert(device.device_id, row.sha256, row.subject, row.issuer,
                                     row.serial_hex))
        return held

    def on_scans(self, reports: Sequence[tuple[str, Sequence[pki.Finding]]]) -> None:
        """Alerts for the endpoints the collector scans itself (scope SCAN)."""
        self.engine.evaluate(None, scan_alerts(reports), scope=Scope.SCAN, now=self.now())

    def close(self) -> None:
        self.engine.close(10.0)


def _names(status: p.Status) -> dict[str, CertName]:
    names: dict[str, CertName] = {}
    for brief in [*(status.trust_store.expiring if status.trust_store else ()),
                  *(status.broker.chain if status.broker else ())]:
        names[brief.ref] = CertName(brief.ref, brief.subject)
    return names
