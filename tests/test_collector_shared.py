"""Several collectors, one PostgreSQL: MQTT v5 shared subscriptions split the statuses
between two collector processes, and the store makes every state transition happen
once. Every status is stored once; every alert reaches the webhook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import Fleet
from kit.broker import wait_until

from agent.config import AgentConfig
from agent.service import AgentService
from certmon.config import loads
from collector.store import open_store

PG = os.environ.get("CERTMON_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    try:
        import psycopg

        conn = psycopg.connect(PG, autocommit=True, connect_timeout=5)
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG} is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL at {PG}: {exc}")
    schema = f"shared_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG}?options=-csearch_path%3D{schema}"
    finally:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
        conn.close()


class Receiver(BaseHTTPRequestHandler):
    alerts: ClassVar[list[dict[str, Any]]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.alerts.extend(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    Receiver.alerts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/v2/alerts", Receiver.alerts
    server.shutdown()
    server.server_close()


def start_collector(fleet: Fleet, tmp: Path, name: str, db: str, hook: str,
                    group: str = "collectors") -> subprocess.Popen[str]:
    creds = fleet.collector_credentials(tmp / name)
    fleet_ca = tmp / "fleet-ca.pem"
    fleet_ca.write_bytes(fleet.root.cert_pem())
    return subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "run", "--broker",
         f"mqtts://127.0.0.1:{fleet.operations_port}", "--ca-bundle", str(creds.ca_bundle_path),
         "--cert", str(creds.cert_path), "--key", str(creds.key_path),
         "--fleet-ca", str(fleet_ca), "--db", db, "--share-group", group,
         "--client-id", f"{name}-{tmp.name}", "--listen", "127.0.0.1:0", "--webhook-url", hook],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc: subprocess.Popen[str], needle: str, out: list[str]) -> bool:
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if needle in line:
            threading.Thread(target=lambda: out.extend(proc.stdout or ()), daemon=True).start()
            return True
    return False


def accepted_by(log_lines: list[str]) -> int:
    """This collector process's accepted-status counter, from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = next(line.split("dashboard at ")[1].strip() for line in list(log_lines)
               if "dashboard at " in line)
    with urllib.request.urlopen(url + "metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "certmon_ingest_messages_total" and \
                    sample.labels.get("result") == "accepted":
                return int(sample.value)
    return 0


def test_two_collectors_share_the_load_and_every_alert_reaches_the_receiver(
    fleet_broker: Fleet, tmp_path: Path, pg_url: str, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    hook_url, received = webhook
    logs: dict[str, list[str]] = {"a": [], "b": []}
    procs = {n: start_collector(fleet_broker, tmp_path, f"collector-{n}", pg_url, hook_url)
             for n in logs}
    agents: list[AgentService] = []
    try:
        for n, proc in procs.items():
            assert wait_for_line(proc, "connected to", logs[n]), "".join(logs[n])
        devices = [f"gw-shared-{i}" for i in range(6)]
        for i, device_id in enumerate(devices):
            # Every other device's certificate expires in 3 days: one alert each.
            creds = fleet_broker.device_credentials(device_id, tmp_path / device_id,
                                                    days=3 if i % 2 else 365)
            config = loads(AgentConfig, "", overrides={
                "mqtt.broker": f"mqtts://127.0.0.1:{fleet_broker.mtls_port}",
                "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
                "tls.key": str(creds.key_path), "agent.state_dir": str(tmp_path / device_id / "s"),
                "agent.interval_s": "60"})
            agent = AgentService(config, runner=lambda argv: None)
            agent.connect(10)
            agents.append(agent)
        for _ in range(3):
            for agent in agents:
                agent.report_once()
            for agent in agents:
                assert agent.wait_delivered(15)
        store = open_store(pg_url)
        try:
            assert wait_until(lambda: all(store.seen_count(d) == 3 for d in devices), 20), \
                {d: store.seen_count(d) for d in devices}
            for device_id in devices:
                assert [seq for _, seq in sorted(store.seen_seqs(device_id))] == [1, 2, 3]
            expiring = {d for i, d in enumerate(devices) if i % 2}
            assert wait_until(lambda: {a.device_id for a in store.active_alerts()
                                       if a.rule == "CERT_EXPIRING"} == expiring, 15)
            # Nothing of this story was rejected (the session broker may still hold
            # other stories' retained messages, which are not this test's business).
            ours = [s for s in store.rejection_samples(limit=500) if "/gw-shared-" in s.topic]
            assert ours == []
        finally:
            store.close()

        def firing_expiry() -> list[dict[str, Any]]:
            return [a for a in list(received) if a["labels"]["alertname"] == "CERT_EXPIRING"]

        assert wait_until(lambda: len(firing_expiry()) >= len(expiring), 15), received
        # Every alert reached the receiver. Alertmanager receivers are fed the whole
        # active set every resend interval by each collector (it dedups by labels),
        # so "once" is not the contract here: the set is.
        assert {a["labels"]["device"] for a in firing_expiry()} == expiring
        # Both collectors did part of the work: the broker shares round-robin.
        # (The totals also count other stories' retained statuses on the session broker.)
        accepted = {n: accepted_by(logs[n]) for n in logs}
        assert all(accepted.values()), accepted
        assert "Traceback" not in "".join(logs["a"]) + "".join(logs["b"])
    finally:
        for agent in agents:
            agent.shutdown()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def test_one_collector_of_the_group_killed_mid_stream_the_other_carries_on(
    fleet_broker: Fleet, tmp_path: Path, pg_url: str, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    """Two collectors share the statuses; collector a is killed -9 mid-stream. b goes on
    storing its share; a's share (what the broker had sent it unacknowledged, and what
    it goes on dealing to a's persistent session) waits in a's session and arrives when
    a comes back with its client id (systemd's Restart=): in the end every status is
    stored exactly once."""
    import os
    import signal
    import time
    from datetime import UTC, datetime

    import paho.mqtt.client as mqtt
    from kit.fleet import SimCA, cert_message, make_devices, signed_status

    from certmon import wire as p

    hook_url, _ = webhook
    logs: dict[str, list[str]] = {"a": [], "b": []}
    # A group of their own: the broker deals a share to every member's session, and the
    # sessions of other tests' (stopped) collectors persist for an hour.
    group = f"kill-{tmp_path.name[-12:]}"
    procs = {n: start_collector(fleet_broker, tmp_path, f"collector-{n}", pg_url, hook_url,
                                group) for n in logs}
    now = datetime.now(UTC)
    ca = SimCA(fleet_broker.devices_ca.cert, fleet_broker.devices_ca.key)  # type: ignore[arg-type]
    devices = make_devices(ca, 10, now, prefix="share-kill")
    per_device = 40
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{tmp_path.name}",
                      protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", fleet_broker.plain_port)
    pub.loop_start()
    store = open_store(pg_url)
    killed: list[subprocess.Popen[str]] = []

    def stored() -> int:
        return sum(store.seen_count(d.device_id) for d in devices)  # type: ignore[attr-defined]

    def publish(seqs: range) -> None:
        for seq in seqs:
            infos = [pub.publish(p.status_topic(p.DEFAULT_PREFIX, d.device_id),
                                 signed_status(d, seq, datetime.now(UTC)), qos=1)
                     for d in devices]
            for info in infos:
                info.wait_for_publish(10)
            time.sleep(0.05)  # a stream, not one burst

    try:
        for n, proc in procs.items():
            assert wait_for_line(proc, "connected to", logs[n]), "".join(logs[n])
        for info in [pub.publish(p.cert_topic(p.DEFAULT_PREFIX, d.device_id), cert_message(d),
                                 qos=1, retain=True) for d in devices]:
            info.wait_for_publish(10)
        publish(range(1, 11))
        assert wait_until(lambda: stored() == 10 * len(devices), 20), stored()
        stream = threading.Thread(target=publish, args=(range(11, per_device + 1),))
        stream.start()
        assert wait_until(lambda: stored() >= 15 * len(devices), 20), stored()
        os.kill(procs["a"].pid, signal.SIGKILL)  # mid-stream: statuses are flowing
        procs["a"].wait(10)
        killed_at = stored()
        stream.join(60)
        total = per_device * len(devices)
        # b carries on: it stores its share of what is published after the kill. The
        # broker (Mosquitto 2.0) still deals a's share to a's session, which persists
        # (mqtt.session_expiry_s): it waits there, unacknowledged, not lost.
        after_kill = total - killed_at
        assert wait_until(lambda: stored() >= killed_at + 0.4 * after_kill, 30), \
            (killed_at, stored(), "".join(logs["b"])[-2000:])
        last, quiet_since = stored(), time.monotonic()
        while time.monotonic() - quiet_since < 2:  # until b has stored all it was given
            time.sleep(0.2)
            if stored() != last:
                last, quiet_since = stored(), time.monotonic()
        held_by_a = total - last
        killed.append(procs["a"])  # its stdout is closed at the end, once drained
        procs["a"] = start_collector(fleet_broker, tmp_path, "collector-a", pg_url, hook_url,
                                     group)
        logs["a"] = []
        assert wait_for_line(procs["a"], "connected to", logs["a"]), "".join(logs["a"])
        assert wait_until(lambda: stored() == total, 30), (stored(), total, held_by_a)
        for dev in devices:
            seqs = [seq for _, seq in store.seen_seqs(dev.device_id)]  # type: ignore[attr-defined]
            assert sorted(seqs) == list(range(1, per_device + 1)), (dev.device_id, seqs)
        ours = [s for s in store.rejection_samples(limit=500)  # type: ignore[attr-defined]
                if "/share-kill-" in s.topic]
        assert {s.reason for s in ours} <= {"replay"}, ours  # a re-sent unacked copy at most
        assert "Traceback" not in "".join(logs["b"])
        print(f"\nshare group: a killed after {killed_at}/{total} stored; b stored "
              f"{total - killed_at - held_by_a} of the {total - killed_at} not yet stored then; "
              f"a's session held {held_by_a}, all stored once a returned")
    finally:
        store.close()
        pub.disconnect()
        pub.loop_stop()
        for proc in procs.values():
            proc.terminate()
        for proc in [*procs.values(), *killed]:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
