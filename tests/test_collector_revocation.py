"""`tls.fleet_crl`: a device whose client certificate the fleet CA has revoked, yet
which still connects and reports (the broker has no crlfile), raises CERT_REVOKED on
the collector; a reissued CRL without it resolves the alert at the next sweep.

Real Mosquitto (the fleet broker), the real agent code, a real collector built by
`collector.wiring.build_collector` on SQLite. A fleet CRL near its nextUpdate is
a fleet alert too (CRL_EXPIRING).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, collector_config
from cryptography.hazmat.primitives import serialization
from kit.broker import wait_until
from kit.pki import write_bundle, write_crls

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import pki
from certmon.config import loads
from certmon.pki.crl import parse_crls
from collector.alerts.rules import HeldCert, revoked_cert_alerts
from collector.service import CollectorService, Periodic
from collector.wiring import build_collector


def _agent(creds: Any, port: int, state: Path) -> AgentService:
    config = loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{port}", "tls.ca_bundle": str(creds.ca_bundle_path),
        "tls.cert": str(creds.cert_path), "tls.key": str(creds.key_path),
        "agent.state_dir": str(state), "agent.interval_s": "60"})
    return AgentService(config)


@pytest.fixture
def crl_collector(fleet_broker: Fleet, tmp_path: Path) -> Iterator[tuple[CollectorService, Path]]:
    fleet = fleet_broker
    crl_path = tmp_path / "fleet.crl"
    # Two days left: the collector's copy is about to go stale (CRL_EXPIRING).
    write_crls(crl_path, [fleet.pki.crl(fleet.devices_ca,
                                        this_update=fleet.pki.now - timedelta(days=5),
                                        next_update=fleet.pki.now + timedelta(days=2))])
    # The CRL's issuer is the devices intermediate: its key verifies the CRL.
    cas = write_bundle(tmp_path / "fleet-cas.pem", [fleet.root, fleet.devices_ca])
    service = build_collector(
        collector_config(fleet, tmp_path, **{"tls.fleet_crl": str(crl_path),
                                             "tls.fleet_ca": str(cas)}),
        web=False, periodic=Periodic(beacon_every_s=0.2, silence_every_s=0.2,
                                     summary_every_s=0.2, fleet_sweep_every_s=0.2))
    service.start()
    assert service.link.wait_connected(10)
    yield service, crl_path
    service.close()


def test_a_revoked_device_that_still_reports_raises_cert_revoked(
    fleet_broker: Fleet, crl_collector: tuple[CollectorService, Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="certmon.collector")
    collector, crl_path = crl_collector
    fleet = fleet_broker
    revoked = fleet.device_credentials("gw-revoked", tmp_path / "r", days=365)
    kept = fleet.device_credentials("gw-kept", tmp_path / "k", days=365)
    revoked_cert = pki.read_bundle(revoked.cert_path).certs[0]
    agents = [_agent(revoked, fleet.mtls_port, tmp_path / "sr"),
              _agent(kept, fleet.mtls_port, tmp_path / "sk")]
    try:
        for a in agents:
            a.connect(10)
            a.report_once()
        for a in agents:
            assert a.wait_delivered(15)
        store = collector.store
        assert wait_until(lambda: all((r := store.device(d)) is not None and r.is_online
                                      and r.client_sha256 for d in ("gw-revoked", "gw-kept")),
                          15), collector.ingestor.rejected

        def revoked_alerts() -> list[Any]:
            return [a for a in store.active_alerts() if a.rule == "CERT_REVOKED"]

        def swept() -> bool:
            collector.tick()  # the service loop's periodic jobs, the fleet sweep among them
            return True

        def alerts_of(rule: str) -> list[Any]:
            return [a for a in store.active_alerts() if a.rule == rule]

        # The device reports; nothing is revoked yet, but the fleet CRL is expiring.
        assert swept() and not revoked_alerts()
        (stale,) = alerts_of("CRL_EXPIRING")
        assert stale.device_id is None and stale.severity == pki.Severity.CRITICAL
        assert pki.iso_utc(fleet.pki.now + timedelta(days=2)) in stale.summary
        # The CA revokes gw-revoked's certificate and reissues its CRL; the broker
        # has no crlfile, so the device keeps connecting and reporting.
        write_crls(crl_path, [fleet.pki.crl(
            fleet.devices_ca, this_update=fleet.pki.now,
            next_update=fleet.pki.now + timedelta(days=60), revoked=[revoked_cert.cert],
            number=2)])
        assert wait_until(lambda: swept() and revoked_alerts(), 10), store.active_alerts()
        (alert,) = revoked_alerts()
        assert alert.device_id == "gw-revoked" and alert.severity == pki.Severity.CRITICAL
        assert revoked_cert.facts.serial_hex in alert.summary
        assert alert.labels["cert"] == revoked_cert.facts.sha256[:16]
        assert not alerts_of("CRL_EXPIRING")  # the reissued CRL is fresh
        # The file half-written, then briefly gone, then an older CRL put back: the
        # last good CRL stands and the alert neither resolves nor flaps.
        older = fleet.pki.crl(fleet.devices_ca, this_update=fleet.pki.now - timedelta(days=1),
                              next_update=fleet.pki.now + timedelta(days=60), number=1)
        for trouble, logged in ((b"-----BEGIN X509 CRL-----\ntruncat", "no CRL found"),
                                (None, "cannot read CRL"), (older, "is older than")):
            if trouble is None:
                crl_path.unlink()
            elif isinstance(trouble, bytes):
                crl_path.write_bytes(trouble)
            else:
                write_crls(crl_path, [trouble])
            # Its warning proves a sweep has read it.
            def read_it(message: str = logged) -> bool:
                return swept() and message in caplog.text

            assert wait_until(read_it, 10), logged
            assert [a.device_id for a in revoked_alerts()] == ["gw-revoked"], logged
        assert [a.started_at for a in store.alert_history("gw-revoked")
                if a.rule == "CERT_REVOKED"] == [alert.started_at]  # fired once, never resolved
        # Re-read at every sweep: a newer CRL without it (say, a mistaken revocation
        # undone) resolves the alert.
        write_crls(crl_path, [fleet.pki.crl(
            fleet.devices_ca, this_update=fleet.pki.now,
            next_update=fleet.pki.now + timedelta(days=60), number=3)])
        assert wait_until(lambda: swept() and not revoked_alerts(), 10), revoked_alerts()
    finally:
        for a in agents:
            a.shutdown()


def test_a_forged_crl_is_not_believed_and_no_crl_means_no_rule(fleet_broker: Fleet) -> None:
    fleet = fleet_broker
    leaf = fleet.pki.leaf(fleet.devices_ca, "gw-x", name="gw-x-forged")
    facts = pki.parse_bundle(leaf.cert_pem(), "x").certs[0].facts
    held = [HeldCert("gw-x", facts.sha256, facts.subject, facts.issuer, facts.serial_hex)]
    cas = pki.parse_bundle(fleet.devices_ca.cert_pem(), "ca").certs
    impostor = fleet.pki.root("fleet-devices", name="forger")  # same name, another key
    now = fleet.pki.now

    def crls(**kw: Any) -> Any:
        crl = fleet.pki.crl(fleet.devices_ca, this_update=now, next_update=now + timedelta(days=1),
                            revoked=[leaf], **kw)
        return parse_crls(crl.public_bytes(serialization.Encoding.PEM), "fleet.crl", cas).crls

    assert [a.rule for a in revoked_cert_alerts(held, crls())] == ["CERT_REVOKED"]
    assert revoked_cert_alerts(held, crls(signer=impostor.key)) == []
    assert revoked_cert_alerts(held, ()) == []
