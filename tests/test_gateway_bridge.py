"""A gateway that talks through a local broker (issue 16): the agent publishes to a
Mosquitto on the gateway (loopback), which bridges the device's topics to the central
broker over mTLS with the device's certificate; the agent, in broker-host mode on the
gateway's own mosquitto.conf, judges the bridge's TLS files and reports the chain the
bridge's remote — the central broker — presents, by probing it itself.

Real parts: the central Mosquitto in the documented configuration (its device ACL lets
the bridge, logged in as the device, write only that device's topics), the gateway's
Mosquitto with a real bridge, the agent service, a collector on SQLite. The status the
collector stores is the agent's own signed JWS, verified end to end: the bridge only
carries it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet, MosquittoFactory, collector_config
from kit.broker import Listener, Mosquitto, wait_until

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import pki
from certmon import wire as p
from certmon.config import loads
from collector.service import CollectorService, Periodic
from collector.web.api import FleetApi
from collector.web.metrics import FleetCollector
from collector.wiring import build_collector

DEVICE = "gw-br-01"


@pytest.fixture
def central(fleet_broker: Fleet, mosquitto_factory: MosquittoFactory,
            tmp_path: Path) -> Mosquitto:
    documented = fleet_broker.documented(tmp_path / "central")
    return mosquitto_factory(documented.listeners, extra_conf=documented.global_conf)


@pytest.fixture
def collector(fleet_broker: Fleet, central: Mosquitto,
              tmp_path: Path) -> Iterator[CollectorService]:
    service = build_collector(collector_config(fleet_broker, tmp_path, **{
        "mqtt.broker": f"mqtts://127.0.0.1:{central.listeners[1].port}"}), web=False,
        periodic=Periodic(beacon_every_s=0.2, silence_every_s=0.2, summary_every_s=0.2))
    service.start()
    assert service.link.wait_connected(10)
    yield service
    service.close()


def test_a_gateway_behind_a_local_bridge_is_verified_and_reports_the_remote_chain(
        fleet_broker: Fleet, central: Mosquitto, collector: CollectorService,
        mosquitto_factory: MosquittoFactory, tmp_path: Path) -> None:
    creds = fleet_broker.device_credentials(DEVICE, tmp_path / "dev", days=365)
    prefix = p.DEFAULT_PREFIX
    bridge = "\n".join([
        "connection central",
        f"address 127.0.0.1:{central.listeners[0].port}",
        "bridge_protocol_version mqttv50",
        f"bridge_cafile {creds.ca_bundle_path}",
        f"bridge_certfile {creds.cert_path}",
        f"bridge_keyfile {creds.key_path}",
        f"remote_clientid {DEVICE}",
        "try_private false",
        "cleansession false",
        "notifications false",  # its $SYS state topic: not the device's to write
        f"topic {prefix}/devices/{DEVICE}/# out 1",
        f"topic {p.beacon_topic(prefix)} in 0",
    ])
    gateway = mosquitto_factory([Listener(allow_anonymous=True, extra=bridge)])
    # The bridge is up once the central broker accepted it (as the device: the CN).
    assert wait_until(lambda: f"Received CONNACK on connection local.{DEVICE}"
                      in gateway.log_text(), 10), gateway.log_text()[-3000:]
    config = loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtt://127.0.0.1:{gateway.port}",  # the local broker, loopback
        "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "agent.state_dir": str(tmp_path / "state"),
        "agent.interval_s": "60", "broker.config": str(gateway.conf_path)})
    agent = AgentService(config)
    try:
        agent.connect(10)
        result = agent.report_once()
        assert agent.wait_delivered(15)
    finally:
        agent.shutdown()

    # What the agent reported of its gateway broker: the bridge, its files, and the
    # remote's chain as the agent's own probe saw it (the central broker's leaf).
    part = result.status.broker_host
    assert part is not None
    (link,) = [e for e in part.endpoints if e.kind == "bridge"]
    assert link.name == "bridge central" and link.is_tls and link.port == central.listeners[0].port
    assert {f.directive for f in link.files} >= {"bridge_cafile", "bridge_certfile",
                                                 "bridge_keyfile"}
    served = pki.parse_bundle(fleet_broker.files.certfile.read_bytes(), "central").certs[0]
    assert link.served is not None and link.served.ref == p.cert_ref(served.facts.sha256)
    assert link.is_reloaded is None  # a remote's leaf is not the bridge's certfile

    # Through the bridge, the collector verified the agent's own signature and stored it.
    store = collector.store
    assert wait_until(lambda: (row := store.device(DEVICE)) is not None
                      and row.seq == result.status.seq, 15), collector.ingestor.rejected
    assert collector.ingestor.rejected_counts() == {}
    row = store.device(DEVICE)
    assert row is not None and row.status_json is not None and '"broker_host"' in row.status_json
    # On /metrics the remote's certificate has its own family, not the served one's.
    text = FleetCollector(store).exposition(
        FleetApi(store, now=lambda: row.last_received_at, snapshot_ttl_s=0).snapshot()).decode()
    assert (f'certmon_broker_bridge_remote_not_after_seconds{{bridge="bridge central",'
            f'device="{DEVICE}"}}') in text
    assert f'certmon_broker_served_not_after_seconds{{device="{DEVICE}"' not in text
