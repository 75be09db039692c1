"""The collector's MQTT 3.1.1 mode (`mqtt.protocol = "v311"`), by its effects, on the
documented Mosquitto: for brokers without MQTT v5 (RabbitMQ 3.10, where
tests/test_rabbitmq_cluster.py runs it against a real cluster).

What still works: the link speaks 3.1.1 (Mosquitto logs the client as `p2`), and with
`session_expiry_s > 0` it is a persistent session (`c0`, clean_session false; `0` is
`c1`): the statuses published while the collector was away are delivered when it
comes back, each one, not only the last retained one. What is lost, and said: a share group is
a config error naming `mqtt.share_group`; what the collector publishes carries no
`certmon-sig` user property (a v5 collector's does, on the same broker).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, MosquittoFactory, start_collector
from kit.broker import Mosquitto, wait_until
from kit.mqttprobe import MqttProbe

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import wire as p
from certmon.config import load
from certmon.config import loads as load_text
from certmon.errors import ConfigError
from certmon.fleetsig import SIG_PROPERTY
from collector.config import CollectorConfig

DATA = Path(__file__).resolve().parent / "data" / "config"
PREFIX = p.DEFAULT_PREFIX
V311 = {"mqtt.protocol": "v311"}


def test_a_share_group_needs_v5_and_the_error_names_the_key() -> None:
    name = "invalid-collector-share-group-v311.toml"
    with pytest.raises(ConfigError) as info:
        load(CollectorConfig, DATA / name, check_files=False)
    assert str(info.value).splitlines() == [
        f"{DATA / name}:5: mqtt.share_group: needs mqtt.protocol = \"v5\": shared "
        "subscriptions are MQTT v5; with \"v311\" run one collector per broker"]


def test_v5_is_the_default_and_v311_alone_is_accepted() -> None:
    base = {"mqtt.broker": "mqtts://b.example.net", "tls.ca_bundle": "/ca",
            "tls.cert": "/c", "tls.key": "/k", "tls.fleet_ca": "/f"}
    default = load_text(CollectorConfig, "", overrides=base, check_files=False)
    assert default.mqtt.protocol == "v5"
    v311 = load_text(CollectorConfig, "", overrides={**base, **V311}, check_files=False)
    assert (v311.mqtt.protocol, v311.mqtt.share_group) == ("v311", None)


@pytest.fixture
def broker(fleet_broker: Fleet, mosquitto_factory: MosquittoFactory,
           tmp_path: Path) -> Mosquitto:
    documented = fleet_broker.documented(tmp_path / "broker-conf")
    return mosquitto_factory(documented.listeners, extra_conf=documented.global_conf)


def client_line(broker: Mosquitto, client_id: str) -> str:
    """Mosquitto's "New client connected … as <id> (p<protocol>, c<clean>, …)"."""
    found = re.findall(rf"as {re.escape(client_id)} \((p\d, c\d)", broker.log_text())
    return found[-1] if found else ""


def device(fleet: Fleet, broker: Mosquitto, tmp: Path, device_id: str) -> AgentService:
    creds = fleet.device_credentials(device_id, tmp / "device")
    return AgentService(load_text(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{broker.listeners[0].port}",
        "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "agent.state_dir": str(tmp / "state"),
        "agent.interval_s": "10"}))


def seqs_of(collector: Any, device_id: str) -> list[int]:
    return sorted(seq for _, seq in collector.store.seen_seqs(device_id))


def test_v311_collector_keeps_a_persistent_session_across_a_restart(
    fleet_broker: Fleet, broker: Mosquitto, tmp_path: Path
) -> None:
    session = {**V311, "mqtt.session_expiry_s": "3600", "mqtt.client_id": "collector-311"}
    collector = start_collector(fleet_broker, broker, tmp_path / "collector", **session)
    agent = device(fleet_broker, broker, tmp_path, "gw-311")
    try:
        assert wait_until(lambda: client_line(broker, "collector-311"), 5), broker.log_text()
        assert client_line(broker, "collector-311") == "p2, c0"  # MQTT 3.1.1, persistent
        first = agent.report_once()
        assert agent.wait_delivered(20)
        assert wait_until(lambda: seqs_of(collector, "gw-311") == [first.status.seq], 20), \
            collector.ingestor.rejected
        collector.close()  # a clean DISCONNECT: the session stays on the broker
        away = [agent.report_once().status.seq for _ in range(2)]
        assert agent.wait_delivered(20)
        collector = start_collector(fleet_broker, broker, tmp_path / "collector", **session)
        # Both statuses sent meanwhile, not only the retained last one: the broker
        # queued them in the collector's session and delivers them now.
        assert wait_until(lambda: seqs_of(collector, "gw-311") == [first.status.seq, *away],
                          20), (seqs_of(collector, "gw-311"), collector.ingestor.rejected)
        assert sum(collector.ingestor.rejected.values()) == 0, collector.ingestor.rejected
    finally:
        agent.shutdown()
        collector.close()


def test_v311_collector_publishes_without_the_signature_property(
    fleet_broker: Fleet, broker: Mosquitto, tmp_path: Path
) -> None:
    creds = fleet_broker.collector_credentials(tmp_path / "board")
    board = MqttProbe("board-311", ca_certs=str(creds.ca_bundle_path),
                      certfile=str(creds.cert_path), keyfile=str(creds.key_path))
    board.connect(broker.listeners[1].port)
    topic = p.beacon_topic(PREFIX)
    board.subscribe(topic)
    v5 = start_collector(fleet_broker, broker, tmp_path / "v5")
    v311 = start_collector(fleet_broker, broker, tmp_path / "v311", **V311)
    try:
        sigs: list[str | None] = []
        for collector in (v5, v311):  # one beacon each, in turn
            collector.tick()
            assert wait_until(lambda: len(board.received(topic)) > len(sigs), 10)
            sigs.append(dict(board.user_properties[-1]).get(SIG_PROPERTY))
        assert sigs[0] is not None and sigs[0].count(".") == 2  # the v5 link carries it
        assert sigs[1] is None
        # session_expiry_s = 0 (the suite's collectors): a clean session in 3.1.1 too.
        assert client_line(broker, v311.link.settings.client_id) == "p2, c1"
    finally:
        board.close()
        v5.close()
        v311.close()
