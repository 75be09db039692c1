"""The broker goes away under steady traffic: what survives, and what cannot.

Four gateways run the real agent code in-process (each interval stepped by calling
`report_once()` + `flush()`), and one collector (service threads, SQLite) is
connected to a private Mosquitto that the test restarts (SIGTERM) or kills (SIGKILL)
and starts again on the same port. Neither side is told: the agents' and the
collector's MQTT links reconnect by themselves, and the collector re-subscribes on
every connect.

What "nothing lost" means here (docs/reliability.md): an agent keeps each status in
its on-disk spool until the broker PUBACKs it, so a status produced while the broker
is down, or in flight when it dies, is sent again after the reconnect; the broker
hands it to every *connected, subscribed* collector. A broker without persistence
forgets sessions when it restarts, so statuses that reach it after the restart but
before the collector has re-subscribed are not queued for anyone: of those, only the
newest per device survives, as the retained message the collector receives when it
subscribes. The last test shows that limit rather than hiding it; the restart and
kill tests run the broker as production should (persistence on, saved on every change)
with a persistent collector session, where nothing is lost in any reconnect order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, start_collector
from kit.broker import Mosquitto, wait_until

from agent.config import AgentConfig
from agent.service import AgentService
from certmon.config import loads
from collector.service import CollectorService

DEVICES = ("gw-bf-1", "gw-bf-2", "gw-bf-3", "gw-bf-4")


def private_broker(fleet: Fleet, factory: Any, tmp: Path,
                   persist_in: Path | None = None) -> Mosquitto:
    """A private broker in the documented configuration on the fleet's PKI: device
    listener first, operations (the collector's) second. With `persist_in`, it keeps
    sessions on disk as production brokers should (docs/mosquitto.md), saving on
    every change so even a SIGKILL keeps them."""
    documented = fleet.documented(tmp / "broker-conf")
    extra = documented.global_conf
    if persist_in is not None:
        persist_in.mkdir(parents=True, exist_ok=True)
        extra += (f"persistence true\npersistence_location {persist_in}/\n"
                  "autosave_on_changes true\nautosave_interval 1\n")
    return factory(documented.listeners, extra_conf=extra)  # type: ignore[no-any-return]


def make_agent(fleet: Fleet, broker: Mosquitto, tmp: Path, device_id: str) -> AgentService:
    creds = fleet.device_credentials(device_id, tmp / device_id)
    config = loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{broker.port}",
        "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "agent.state_dir": str(tmp / device_id / "state"),
        "agent.interval_s": "10"})
    agent = AgentService(config)
    assert agent.connect(10), agent.link.state.last_error if agent.link else "no link"
    return agent


class Fleet4:
    """Four agents and the seqs each has produced (every one signed and spooled)."""

    def __init__(self, agents: list[AgentService]) -> None:
        self.agents = agents
        self.produced: dict[str, list[int]] = {a.device_id or "": [] for a in agents}

    def interval(self) -> None:
        """One reporting interval: each agent reports and hands its spool to the link."""
        for agent in self.agents:
            result = agent.report_once()
            self.produced[result.status.device_id].append(result.status.seq)
            agent.flush()

    def deliver(self, timeout_s: float = 30) -> None:
        for agent in self.agents:
            assert agent.wait_delivered(timeout_s), agent.link.state.last_error  # type: ignore[union-attr]

    def all_connected(self) -> bool:
        return all(a.link is not None and a.link.is_connected for a in self.agents)


@pytest.fixture
def fleet4(fleet_broker: Fleet, mosquitto_factory: Any, tmp_path: Path,
           request: pytest.FixtureRequest) -> Iterator[tuple[Mosquitto, Fleet4]]:
    persistent = request.node.get_closest_marker("persistent_broker") is not None
    broker = private_broker(fleet_broker, mosquitto_factory, tmp_path,
                            tmp_path / "broker-db" if persistent else None)
    agents = [make_agent(fleet_broker, broker, tmp_path, d) for d in DEVICES]
    yield broker, Fleet4(agents)
    for agent in agents:
        agent.shutdown()


def subscribes_since_last_start(broker: Mosquitto, client_id: str) -> int:
    log = broker.log_text().rsplit("--- starting", 1)[-1]
    return log.count(f"Received SUBSCRIBE from {client_id}")


def stored_seqs(collector: CollectorService, device_id: str) -> list[int]:
    return sorted(seq for _, seq in collector.store.seen_seqs(device_id))


@pytest.mark.persistent_broker
@pytest.mark.parametrize("how", ["restart", "kill9"])
def test_broker_restart_mid_traffic_loses_no_status(
    fleet_broker: Fleet, fleet4: tuple[Mosquitto, Fleet4], tmp_path: Path, how: str
) -> None:
    # The production set-up: a broker that persists sessions and a collector with a
    # persistent session. Then the order in which agents and collector reconnect does
    # not matter (paho re-sends an agent's in-flight statuses the moment it is back,
    # possibly before the collector is): the broker queues them for the collector.
    broker, fleet = fleet4
    collector = start_collector(fleet_broker, broker, tmp_path / "collector",
                                **{"mqtt.session_expiry_s": "3600",
                                   "mqtt.client_id": f"collector-bf-{how}"})
    client_id = collector.link.settings.client_id
    try:
        for _ in range(3):  # steady traffic
            fleet.interval()
        # The broker goes away with the last interval's statuses possibly still in
        # flight (handed to paho, PUBACK not yet back): they stay in the spools.
        fleet.interval()
        broker.stop() if how == "restart" else broker.kill()
        assert wait_until(lambda: not collector.link.is_connected
                          and not any(a.link.is_connected for a in fleet.agents), 10)  # type: ignore[union-attr]
        for _ in range(2):  # two intervals without a broker: spooled
            fleet.interval()
        assert all(a.spool.depth >= 2 for a in fleet.agents)
        broker.start()
        # Nobody is told: every link reconnects by itself, the collector re-subscribes.
        assert wait_until(lambda: collector.link.is_connected and fleet.all_connected(), 30), \
            broker.log_text()[-2000:]
        assert wait_until(lambda: subscribes_since_last_start(broker, client_id) >= 4, 10)
        fleet.deliver()
        for _ in range(2):  # traffic goes on after the outage
            fleet.interval()
        fleet.deliver()
        assert collector.link.state.connects == 2
        assert all(a.link.state.connects == 2 for a in fleet.agents)  # type: ignore[union-attr]
        for device_id, seqs in fleet.produced.items():
            assert wait_until(lambda d=device_id, s=seqs: stored_seqs(collector, d) == s, 15), (
                device_id, stored_seqs(collector, device_id), seqs)
        # A status resent because its PUBACK was lost is stored once: a duplicate when
        # the collector recognises the copy, else a counted replay (docs/reliability.md).
        assert set(collector.ingestor.rejected) <= {"replay"}, collector.ingestor.rejected
        assert collector.store.integrity_check()
    finally:
        collector.close()


def test_a_broker_without_persistence_keeps_only_the_newest_status_for_a_collector_that_was_away(
    fleet_broker: Fleet, fleet4: tuple[Mosquitto, Fleet4], tmp_path: Path
) -> None:
    """The documented limit. The collector is down (persistent session, fixed client
    id) while the broker restarts; the agents deliver their spools to the restarted
    broker, which has forgotten the collector's session. When the collector comes
    back it receives each device's retained newest status, and the statuses in
    between are gone: the agents got their PUBACKs, so nobody resends them."""
    broker, fleet = fleet4
    overrides = {"mqtt.session_expiry_s": "3600", "mqtt.client_id": "collector-away"}
    collector = start_collector(fleet_broker, broker, tmp_path / "c", **overrides)
    fleet.interval()
    fleet.deliver()
    assert wait_until(lambda: all(stored_seqs(collector, d) == [1] for d in DEVICES), 15)
    collector.close()
    broker.restart()
    assert wait_until(fleet.all_connected, 30)
    for _ in range(3):
        fleet.interval()
    fleet.deliver()  # PUBACKed by the broker: the spools are empty
    assert all(a.spool.depth == 0 for a in fleet.agents)
    collector = start_collector(fleet_broker, broker, tmp_path / "c", **overrides)
    try:
        assert wait_until(lambda: all(stored_seqs(collector, d) == [1, 4] for d in DEVICES),
                          15), {d: stored_seqs(collector, d) for d in DEVICES}
        assert collector.store.device("gw-bf-1").seq == 4  # type: ignore[union-attr]
    finally:
        collector.close()
