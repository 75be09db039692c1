"""certmon across a two-node RabbitMQ 3.10 cluster: the agent on node A, the collector
on node B, no bridge.

`kit.rabbitmq.RabbitMQCluster` boots two private nodes side by side (one per-test
Erlang cookie, one private epmd, each node its own ports and directory) and joins B
to A with `rabbitmqctl join_cluster`. The users (certificate CNs) are defined on A
only: B's database is reset when it joins, so B's certificate logins prove the users
are the cluster's. The collector runs in its MQTT 3.1.1 mode (`mqtt.protocol =
"v311"`; RabbitMQ 3.10 closes its default v5 CONNECT) with a persistent session.

The story: the agent (`certmon-agent run --mqtt-protocol v311`) on A publishes; the
collector on B verifies and stores the status (RabbitMQ routes A's publishes into
B's session queue); the agent is killed and its will, fired by A, marks it offline
on B; the collector is away while the agent reports, and finds those statuses in its
session when it returns. Beside it: the default v5 collector is refused; each node
keeps its own retained messages, and none reaches a wildcard subscription; a
`$share/…` filter is a plain binding that receives nothing; and the collector's
session is a queue on its node, out of reach while that node is down (the last
test, which stops node B). docs/brokers.md records what differs.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, collector_config, missing
from kit.broker import wait_until
from kit.pki import write_bundle
from kit.rabbitmq import RabbitMQ, RabbitMQCluster, find_rabbitmq_server

from certmon import wire as p
from certmon.mqtt import Incoming, LinkSettings, MqttLink

DEVICE = "gw-east"
PROBE_CN = "rabbit-probe"


@pytest.fixture(scope="module")
def cluster(fleet_broker: Fleet,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQCluster]:
    binary = find_rabbitmq_server()
    if binary is None:
        missing("rabbitmq-server (Debian package rabbitmq-server) is not installed")
    fleet = fleet_broker
    workdir = tmp_path_factory.mktemp("rabbitmq-cluster")
    # Devices chain to the fleet root, the collector to the operations CA: one
    # cacertfile per listener, so both.
    cafile = write_bundle(workdir / "clients-ca.pem", [fleet.root, fleet.operations_ca])
    nodes = RabbitMQCluster(workdir, count=2, cacertfile=cafile,
                            certfile=fleet.files.certfile, keyfile=fleet.files.keyfile,
                            users=[DEVICE, "collector", PROBE_CN], binary=binary)
    with nodes:
        print(f"two-node RabbitMQ cluster up in {nodes.started_in_s:.1f} s "
              f"(nodes booted in {[round(n.started_in_s or 0, 1) for n in nodes.nodes]} s)")
        yield nodes


def node_url(node: RabbitMQ) -> str:
    return f"mqtts://127.0.0.1:{node.mqtts_port}"


def start_collector_on(fleet: Fleet, node: RabbitMQ, tmp: Path, **overrides: str) -> Any:
    from collector.service import Periodic
    from collector.wiring import build_collector

    config = collector_config(fleet, tmp, **{"mqtt.broker": node_url(node), **overrides})
    service = build_collector(config, web=False, periodic=Periodic(
        beacon_every_s=3600, silence_every_s=3600, summary_every_s=3600))
    service.start()
    return service


def agent_args(fleet: Fleet, node: RabbitMQ, tmp: Path) -> list[str]:
    creds = fleet.device_credentials(DEVICE, tmp / "device")
    return ["--broker", node_url(node), "--ca-bundle", str(creds.ca_bundle_path),
            "--cert", str(creds.cert_path), "--key", str(creds.key_path),
            "--state-dir", str(tmp / "state"), "--mqtt-protocol", "v311"]


def bindings(node: RabbitMQ, client_id: str) -> list[str]:
    """The routing keys bound to `client_id`'s subscription queue (`/` is `.` there)."""
    rows = json.loads(node.ctl("list_bindings", "destination_name", "routing_key",
                               "--formatter", "json"))
    return [row["routing_key"] for row in rows
            if row["destination_name"].startswith(f"mqtt-subscription-{client_id}")]


def output_of(agent: subprocess.Popen[str]) -> str:
    """What the agent printed (killed first if it still runs): for failure messages."""
    if agent.poll() is None:
        agent.kill()
    return agent.communicate(timeout=10)[0]


def seqs_of(collector: Any) -> list[int]:
    return sorted(seq for _, seq in collector.store.seen_seqs(DEVICE))


def test_both_nodes_run_as_one_cluster(cluster: RabbitMQCluster) -> None:
    assert cluster.running_nodes() == sorted(n.nodename for n in cluster.nodes)


def test_rabbitmq_closes_the_collectors_default_v5_connect(
    fleet_broker: Fleet, cluster: RabbitMQCluster, tmp_path: Path
) -> None:
    """The reason for `mqtt.protocol = "v311"`: without it nothing connects."""
    node_b = cluster.nodes[1]
    before = node_b.log_text().count("MQTT cannot parse a frame")
    collector = start_collector_on(fleet_broker, node_b, tmp_path / "v5")
    try:
        assert wait_until(lambda: node_b.log_text().count("MQTT cannot parse a frame")
                          > before, 20), node_b.log_text()[-2000:]
        assert collector.link.state.connects == 0
    finally:
        collector.close()


def test_agent_on_node_a_reaches_the_collector_on_node_b(
    fleet_broker: Fleet, cluster: RabbitMQCluster, tmp_path: Path
) -> None:
    fleet = fleet_broker
    node_a, node_b = cluster.nodes
    session = {"mqtt.protocol": "v311", "mqtt.session_expiry_s": "3600",
               "mqtt.client_id": "collector-node-b"}
    collector = start_collector_on(fleet, node_b, tmp_path / "collector", **session)
    assert collector.link.wait_connected(20), (collector.link.state.last_error,
                                               node_b.log_text()[-2000:])
    # Its filters bound before the agent speaks: no retained message makes up for a
    # status published ahead of the SUBSCRIBE here.
    assert wait_until(lambda: len(bindings(node_b, "collector-node-b")) >= 5, 20, 0.5), \
        bindings(node_b, "collector-node-b")
    args = agent_args(fleet, node_a, tmp_path)
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", *args,
                              "--interval-s", "600"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Published on A, verified and stored on B: the status, and the device online.
        assert wait_until(lambda: seqs_of(collector) != [], 30), (
            f"{output_of(agent)[-3000:]}\n{collector.ingestor.rejected}\n{cluster.log_text()}")
        row = collector.store.device(DEVICE)
        assert row is not None and row.is_online
        assert sum(collector.ingestor.rejected.values()) == 0, collector.ingestor.rejected
        # Killed: A fires the will; the collector on B marks the device offline.
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(10)
        assert wait_until(lambda: not collector.store.device(DEVICE).is_online, 20), \
            node_a.log_text()[-2000:]
        stored_before = set(seqs_of(collector))
        collector.close()  # a clean DISCONNECT: its session queue stays on node B
        away = []
        for _ in range(2):
            done = subprocess.run([sys.executable, "-m", "agent.cli", "once", *args,
                                   "--timeout-s", "20", "--json"],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
            away.append(json.loads(done.stdout)["seq"])
        assert not set(away) & stored_before
        collector = start_collector_on(fleet, node_b, tmp_path / "collector", **session)
        # RabbitMQ sends no retained status through the collector's wildcard filters:
        # both statuses come from the session queue B kept while the collector was away.
        assert wait_until(lambda: set(away) <= set(seqs_of(collector)), 30), (
            away, seqs_of(collector), collector.ingestor.rejected)
        assert sum(collector.ingestor.rejected.values()) == 0, collector.ingestor.rejected
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.communicate(timeout=10)
        collector.close()


class Client:
    """A bare MQTT 3.1.1 client on one node (certmon's link), recording messages."""

    def __init__(self, fleet: Fleet, node: RabbitMQ, tmp: Path, name: str) -> None:
        creds = fleet.collector_credentials(tmp / name, cn=PROBE_CN)
        self.messages: list[Incoming] = []
        self.acked: set[int] = set()
        self._lock = threading.Lock()
        self.link = MqttLink(LinkSettings(
            host="127.0.0.1", port=node.mqtts_port, client_id=name,
            ca_bundle=str(creds.ca_bundle_path), cert=str(creds.cert_path),
            key=str(creds.key_path), protocol="v311", reconnect_max_s=2),
            on_message=self._got, on_published=self._acked)
        self.link.start()
        assert self.link.wait_connected(20), self.link.state.last_error

    def _got(self, msg: Incoming) -> None:
        with self._lock:
            self.messages.append(msg)

    def _acked(self, mid: int, ok: bool) -> None:
        with self._lock:
            self.acked.add(mid)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        mid = self.link.publish(topic, payload, qos=1, retain=retain)
        assert wait_until(lambda: mid in self.acked, 10), f"no PUBACK for {topic}"

    def has_seen(self, payload: bytes) -> bool:
        return (payload, False) in self.seen()

    def seen(self) -> list[tuple[bytes, bool]]:
        with self._lock:
            return [(m.payload, m.retained) for m in self.messages]


def test_retained_messages_stay_on_their_node_and_skip_wildcards(
    fleet_broker: Fleet, cluster: RabbitMQCluster, tmp_path: Path
) -> None:
    node_a, node_b = cluster.nodes
    topic = f"{p.DEFAULT_PREFIX}/devices/rabbit-probe/cert"
    clients = [Client(fleet_broker, node, tmp_path, name) for node, name in
               ((node_a, "publisher-a"), (node_a, "exact-a"), (node_a, "wildcard-a"),
                (node_b, "exact-b"))]
    publisher, exact_a, wildcard_a, exact_b = clients
    try:
        publisher.publish(topic, b"kept", retain=True)
        for client, topic_filter in ((exact_a, topic), (exact_b, topic),
                                     (wildcard_a, topic.rsplit("/", 2)[0] + "/+/cert")):
            client.link.subscribe(topic_filter, 1)
            # Published on the subscriber's own connection, after its SUBSCRIBE: any
            # retained message the node had for that filter arrived before it.
            client.publish(topic, b"marker")
            assert wait_until(functools.partial(client.has_seen, b"marker"), 10)
        assert exact_a.seen()[0] == (b"kept", True)  # the node it was published on
        assert exact_b.seen()[0] == (b"marker", False)  # the other node has none
        assert wildcard_a.seen()[0] == (b"marker", False)  # and never for a wildcard
    finally:
        publisher.publish(topic, b"", retain=True)  # the module's cluster lives on
        for client in clients:
            client.link.stop()


def test_a_share_filter_is_a_plain_binding_that_receives_nothing(
    fleet_broker: Fleet, cluster: RabbitMQCluster, tmp_path: Path
) -> None:
    """Why `mqtt.share_group` with v311 is a config error: RabbitMQ 3.10 takes
    `$share/<group>/…` as an ordinary filter, and no topic starts with `$share`."""
    node_a, node_b = cluster.nodes
    shared, after = (f"{p.DEFAULT_PREFIX}/devices/rabbit-probe/{kind}"
                     for kind in ("status", "online"))
    member = Client(fleet_broker, node_b, tmp_path, "share-member")
    publisher = Client(fleet_broker, node_a, tmp_path, "share-publisher")
    try:
        member.link.subscribe(f"$share/certmon/{shared}", 1)
        member.link.subscribe(after, 1)
        member.publish(after, b"subscribed")  # its SUBSCRIBEs are done by now
        assert wait_until(functools.partial(member.has_seen, b"subscribed"), 10)
        assert "$share.certmon." + shared.replace("/", ".") in bindings(node_b,
                                                                          "share-member")
        # One connection, in order, into the member's one queue: had the first
        # matched, it would arrive before the second.
        publisher.publish(shared, b"for the group")
        publisher.publish(after, b"after")
        assert wait_until(functools.partial(member.has_seen, b"after"), 10)
        assert member.seen() == [(b"subscribed", False), (b"after", False)]
    finally:
        member.link.stop()
        publisher.link.stop()


def test_the_collectors_session_stays_on_its_node(
    fleet_broker: Fleet, cluster: RabbitMQCluster, tmp_path: Path
) -> None:
    """Runs last in this module: it stops node B for good.

    The collector's persistent session is a durable classic queue on the node it
    connected to (`mqtt-subscription-<client id>qos1`). With that node down, the same
    client id on the other node is accepted and then closed as its queue is declared ("home
    node … of durable queue … is down"), again at every reconnect; a collector with
    another client id runs there at once."""
    node_a, node_b = cluster.nodes
    session = {"mqtt.protocol": "v311", "mqtt.session_expiry_s": "3600",
               "mqtt.client_id": "collector-moves"}
    collector = start_collector_on(fleet_broker, node_b, tmp_path / "moves", **session)
    assert wait_until(lambda: len(bindings(node_b, "collector-moves")) >= 5, 20, 0.5)
    collector.close()
    node_b.stop()
    moved = start_collector_on(fleet_broker, node_a, tmp_path / "moves", **session)
    fresh = start_collector_on(fleet_broker, node_a, tmp_path / "fresh", **{
        **session, "mqtt.client_id": "collector-fresh"})
    try:
        refusal = ("of durable queue 'mqtt-subscription-collector-movesqos1' in vhost '/' "
                   "is down or inaccessible")
        assert wait_until(lambda: refusal in node_a.log_text(), 20), node_a.log_text()[-2000:]
        assert wait_until(lambda: not moved.link.is_connected, 10)
        assert wait_until(lambda: len(bindings(node_a, "collector-fresh")) >= 5, 20, 0.5)
        assert fresh.link.is_connected
    finally:
        moved.close()
        fresh.close()
