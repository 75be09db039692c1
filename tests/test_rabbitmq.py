"""certmon on a second broker implementation: RabbitMQ's MQTT plugin (Debian 12:
RabbitMQ 3.10, MQTT 3.1.1 only), a private node started by kit.rabbitmq.

The agent connects over mutual TLS (`mqtt.ssl_cert_login`: the certificate's CN is
the user) with `mqtt.protocol = "v311"` and publishes its status, cert message and
will as on Mosquitto. It must be told: RabbitMQ 3.10 answers a v5 CONNECT by closing
the connection ("MQTT cannot parse a frame"), not with the CONNACK "unacceptable
protocol version" that the agent's automatic fallback recognises. Here the collector
keeps its default MQTT v5 (shared subscriptions, signed fleet views), which RabbitMQ
3.10 does not speak, so it reads the node through a Mosquitto bridge (the documented
Mosquitto configuration plus a `connection` to RabbitMQ as an MQTT 3.1.1 client,
`certmon/v2/#` in): agent → RabbitMQ → bridge → collector, and the collector stores
the status it verified. tests/test_rabbitmq_cluster.py connects a collector in its
3.1.1 mode to a RabbitMQ cluster directly. docs/brokers.md records what differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet, MosquittoFactory, missing, start_collector
from kit.broker import wait_until
from kit.pki import write_bundle
from kit.rabbitmq import RabbitMQ, find_rabbitmq_server

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import wire as p
from certmon.config import loads

BRIDGE_CN = "certmon-bridge"


@pytest.fixture
def rabbitmq(fleet_broker: Fleet, tmp_path: Path) -> Iterator[RabbitMQ]:
    binary = find_rabbitmq_server()
    if binary is None:
        missing("rabbitmq-server (Debian package rabbitmq-server) is not installed")
    fleet = fleet_broker
    # Devices chain to the fleet root, the bridge (a collector-side client) to the
    # operations CA: RabbitMQ has one cacertfile for its listener, so both.
    cafile = write_bundle(tmp_path / "rabbit-clients-ca.pem", [fleet.root, fleet.operations_ca])
    node = RabbitMQ(tmp_path / "rabbitmq", cacertfile=cafile, certfile=fleet.files.certfile,
                    keyfile=fleet.files.keyfile, users=["gw-rabbit", BRIDGE_CN],
                    binary=binary)
    with node:
        yield node


def test_agent_on_rabbitmq_reaches_the_collector_through_a_bridge(
    fleet_broker: Fleet, rabbitmq: RabbitMQ, mosquitto_factory: MosquittoFactory,
    tmp_path: Path
) -> None:
    fleet = fleet_broker
    bridge = fleet.collector_credentials(tmp_path / "bridge", cn=BRIDGE_CN)
    documented = fleet.documented(tmp_path / "mosquitto-conf")
    bridge_conf = "\n".join([
        "connection rabbitmq",
        f"address 127.0.0.1:{rabbitmq.mqtts_port}",
        "bridge_protocol_version mqttv311",
        "try_private false",  # RabbitMQ refuses Mosquitto's private protocol bit
        "notifications false",
        "cleansession true",
        f"remote_clientid {BRIDGE_CN}",
        f"bridge_cafile {fleet.ca_bundle_path}",
        f"bridge_certfile {bridge.cert_path}",
        f"bridge_keyfile {bridge.key_path}",
        f"topic {p.DEFAULT_PREFIX}/# in 1",
    ])
    mosquitto = mosquitto_factory(documented.listeners,
                                  extra_conf=documented.global_conf + "\n" + bridge_conf)
    assert wait_until(lambda: "Received CONNACK on connection" in mosquitto.log_text(), 20), \
        mosquitto.log_text()[-2000:]
    collector = start_collector(fleet, mosquitto, tmp_path / "collector")
    creds = fleet.device_credentials("gw-rabbit", tmp_path / "device")
    agent = AgentService(loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{rabbitmq.mqtts_port}",
        "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "agent.state_dir": str(tmp_path / "state"),
        "agent.interval_s": "10", "mqtt.protocol": "v311"}))
    try:
        result = agent.report_once()
        assert agent.link is not None and agent.link.wait_connected(20), \
            (agent.link.state.last_error, rabbitmq.log_text()[-3000:])
        assert agent.wait_delivered(20), agent.link.state.last_error
        # The status itself, not just the device row (its online message makes that).
        assert wait_until(lambda: collector.store.seen_seqs("gw-rabbit") != [], 20), \
            (collector.ingestor.rejected, mosquitto.log_text()[-2000:])
        seqs = sorted(seq for _, seq in collector.store.seen_seqs("gw-rabbit"))
        assert seqs == [result.status.seq]
        assert sum(collector.ingestor.rejected.values()) == 0, collector.ingestor.rejected
    finally:
        agent.shutdown()
        collector.close()
