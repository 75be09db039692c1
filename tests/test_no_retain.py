"""A broker without retained messages: the collector learns a device's certificate
from the status's `x5c` header instead of the retained `cert` topic.

A private Mosquitto in the documented configuration plus `retain_available false`
(what some managed brokers and RabbitMQ set-ups amount to): it disconnects a client
that sets the retain flag and refuses a retained will, so the agent runs with
`mqtt.retain = false`; the collector's link drops the flag by itself because the v5
CONNACK says "Retain Available: 0". Nothing retained exists, so the cert message an
agent publishes reaches only collectors connected at that moment, once.

`mqtt.status_x5c` (docs/brokers.md) is tested by its effect: "on_change" puts the
signing chain in the first status of each connection (so a collector restarted with
an empty store learns the certificate at the agent's next reconnect), "always" in
every status, "never" in none (the collector then rejects as `unknown_cert`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, MosquittoFactory, start_collector
from kit.broker import Mosquitto, wait_until
from kit.mqttprobe import MqttProbe

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import wire as p
from certmon.config import loads
from collector.service import CollectorService

PREFIX = p.DEFAULT_PREFIX


@pytest.fixture
def no_retain_broker(fleet_broker: Fleet, mosquitto_factory: MosquittoFactory,
                     tmp_path: Path) -> Mosquitto:
    documented = fleet_broker.documented(tmp_path / "broker-conf")
    return mosquitto_factory(documented.listeners,
                             extra_conf=documented.global_conf + "\nretain_available false\n")


def make_agent(fleet: Fleet, broker: Mosquitto, tmp: Path, device_id: str,
               **extra: str) -> AgentService:
    creds = fleet.device_credentials(device_id, tmp / device_id)
    config = loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{broker.port}",
        "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "agent.state_dir": str(tmp / device_id / "state"),
        "agent.interval_s": "10", "mqtt.retain": "false", **extra})
    return AgentService(config)


def report(agent: AgentService) -> bytes:
    """One interval: sign, spool, deliver; the token sent."""
    token = agent.report_once().token
    assert agent.link is not None and agent.link.wait_connected(10), \
        agent.link.state.last_error if agent.link else "no link"
    assert agent.wait_delivered(10), agent.link.state.last_error
    return token


def has_x5c(token: bytes) -> bool:
    return bool(p.parse_jws(token, p.MAX_STATUS_JWS_BYTES).x5c)


def subscribed_since_start(broker: Mosquitto, client_id: str) -> bool:
    return f"Received SUBSCRIBE from {client_id}" in broker.log_text().rsplit("--- starting", 1)[-1]


def stored_seqs(collector: CollectorService, device_id: str) -> list[int]:
    return sorted(seq for _, seq in collector.store.seen_seqs(device_id))


def test_collector_stores_statuses_from_a_broker_without_retained_messages(
    fleet_broker: Fleet, no_retain_broker: Mosquitto, tmp_path: Path
) -> None:
    collector = start_collector(fleet_broker, no_retain_broker, tmp_path / "collector")
    agent = make_agent(fleet_broker, no_retain_broker, tmp_path, "gw-noretain")
    try:
        assert not collector.link.state.is_retain_available  # the CONNACK said so
        # on_change: the first, signed before the link existed, and the first of the
        # connection carry the chain; the next on the same connection does not.
        tokens = [report(agent) for _ in range(3)]
        assert [has_x5c(t) for t in tokens] == [True, True, False]
        assert wait_until(lambda: stored_seqs(collector, "gw-noretain") == [1, 2, 3], 10), \
            (collector.ingestor.rejected, no_retain_broker.log_text()[-3000:])
        assert sum(collector.ingestor.rejected.values()) == 0, collector.ingestor.rejected
        # Nothing was kept retained: a subscriber arriving now receives nothing retained
        # (live publishes, e.g. the collector's beacon, may pass by), and both links
        # are still up (a retained publish would have cost the connection).
        assert agent.link is not None and agent.link.state.connects == 1
        assert collector.link.state.connects == 1
        creds = fleet_broker.collector_credentials(tmp_path / "late")
        late = MqttProbe("late-subscriber", ca_certs=str(creds.ca_bundle_path),
                         certfile=str(creds.cert_path), keyfile=str(creds.key_path))
        late.connect(no_retain_broker.listeners[1].port)
        try:
            late.subscribe(f"{PREFIX}/#")
            assert not wait_until(lambda: [m for m in list(late.messages) if m[2]], 0.5), \
                late.messages
        finally:
            late.close()
    finally:
        agent.shutdown()
        collector.close()


def test_a_collector_restarted_empty_learns_the_certificate_at_the_agents_reconnect(
    fleet_broker: Fleet, no_retain_broker: Mosquitto, tmp_path: Path
) -> None:
    first = start_collector(fleet_broker, no_retain_broker, tmp_path / "first")
    agent = make_agent(fleet_broker, no_retain_broker, tmp_path, "gw-relearn")
    second: Any = None
    try:
        report(agent)  # signed before the link existed, so with x5c
        assert has_x5c(report(agent))  # the first of its connection
        assert wait_until(lambda: stored_seqs(first, "gw-relearn") == [1, 2], 10)
        first.close()
        # A new collector with an empty cache and store: no cert topic to read, and the
        # agent's next status on the same connection carries no x5c.
        second = start_collector(fleet_broker, no_retain_broker, tmp_path / "second")
        assert not has_x5c(report(agent))
        assert wait_until(lambda: second.ingestor.rejected["unknown_cert"] == 1, 10)
        no_retain_broker.restart()  # the agent reconnects: x5c rides again
        client_id = second.link.settings.client_id
        assert wait_until(lambda: agent.link is not None and agent.link.state.connects == 2
                          and subscribed_since_start(no_retain_broker, client_id), 30)
        assert has_x5c(report(agent))
        assert wait_until(lambda: stored_seqs(second, "gw-relearn") == [4], 10), \
            second.ingestor.rejected
    finally:
        agent.shutdown()
        if second is not None:
            second.close()


@pytest.mark.parametrize(("mode", "expected"), [("always", [True, True, True, True]),
                                                ("never", [False, False, False, False]),
                                                ("on_change", [True, True, False, True])])
def test_status_x5c_setting_decides_which_statuses_carry_the_chain(
    fleet_broker: Fleet, no_retain_broker: Mosquitto, tmp_path: Path, mode: str,
    expected: list[bool]
) -> None:
    """A status signed before the link exists, one on the new connection, both before
    any collector runs (the cert message reaches nobody), a third once a collector has started on the same session, then
    one signed while the broker is down (it reaches the broker on a later session,
    maybe ahead of any other): only x5c can teach that collector the certificate."""
    device = f"gw-x5c-{mode.replace('_', '-')}"
    agent = make_agent(fleet_broker, no_retain_broker, tmp_path, device,
                       **{"mqtt.status_x5c": mode})
    collector = None
    try:
        tokens = [report(agent), report(agent)]
        collector = start_collector(fleet_broker, no_retain_broker, tmp_path / "collector")
        tokens.append(report(agent))
        if mode == "always":
            assert wait_until(lambda: stored_seqs(collector, device) == [3], 10), \
                collector.ingestor.rejected
        else:
            assert wait_until(lambda: collector.ingestor.rejected["unknown_cert"] == 1, 10)
            assert stored_seqs(collector, device) == []
        no_retain_broker.stop()
        assert wait_until(lambda: agent.link is not None and not agent.link.is_connected, 10)
        tokens.append(agent.report_once().token)
        assert [has_x5c(t) for t in tokens] == expected
    finally:
        agent.shutdown()
        if collector is not None:
            collector.close()


def test_mqtt_retain_true_is_refused_by_a_broker_without_retained_messages(
    fleet_broker: Fleet, no_retain_broker: Mosquitto, tmp_path: Path
) -> None:
    """The effect of `mqtt.retain`: with the default (true) the retained will alone
    makes Mosquitto refuse the CONNECT, so nothing is delivered."""
    agent = make_agent(fleet_broker, no_retain_broker, tmp_path, "gw-retain-on",
                       **{"mqtt.retain": "true"})
    try:
        assert not agent.connect(3)
        assert agent.link is not None
        assert agent.link.state.connack_reason == "Retain not supported"
        agent.report_once()
        agent.flush()
        assert agent.spool.depth == 1  # kept, not lost
    finally:
        agent.shutdown()
