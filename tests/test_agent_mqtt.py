"""The agent against a real Mosquitto over mTLS: what a fleet operator relies on.

Each test builds device credentials from the fleet PKI, runs the real agent code
(in-process where time must be stepped, as `certmon-agent` subprocesses where signals
matter) and watches the broker with a collector-certificate subscriber.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import DeviceCreds, Fleet
from cryptography import x509
from kit.broker import wait_until
from kit.mqttprobe import MqttProbe

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import wire as p
from certmon.config import loads

PREFIX = p.DEFAULT_PREFIX


def agent_config(creds: DeviceCreds, port: int, state_dir: Path, **extra: str) -> AgentConfig:
    overrides: dict[str, object] = {
        "mqtt.broker": f"mqtts://127.0.0.1:{port}", "tls.ca_bundle": str(creds.ca_bundle_path),
        "tls.cert": str(creds.cert_path), "tls.key": str(creds.key_path),
        "agent.state_dir": str(state_dir), "agent.interval_s": "10", **extra,
    }
    return loads(AgentConfig, "", overrides=overrides)


def watcher(fleet: Fleet, tmp: Path, port: int | None = None) -> MqttProbe:
    """The collector's view: its operations-CA certificate on the operations listener."""
    creds = fleet.collector_credentials(tmp)
    probe = MqttProbe("test-collector", ca_certs=str(creds.ca_bundle_path),
                      certfile=str(creds.cert_path), keyfile=str(creds.key_path))
    probe.connect(port or fleet.operations_port)
    probe.subscribe(f"{PREFIX}/#")
    return probe


def statuses(probe: MqttProbe, device_id: str) -> list[p.Status]:
    topic = p.status_topic(PREFIX, device_id)
    return [p.decode_status(p.parse_jws(payload, p.MAX_STATUS_JWS_BYTES).payload)
            for t, payload, _ in list(probe.messages) if t == topic]


def last_payload(probe: MqttProbe, topic: str) -> bytes | None:
    found = [payload for t, payload, _ in list(probe.messages) if t == topic]
    return found[-1] if found else None


def run_once(fleet: Fleet, creds: DeviceCreds, state: Path, *extra: str,
             timeout_s: int = 20) -> subprocess.CompletedProcess[str]:
    """`certmon-agent once` as a user runs it, against the fleet broker's mTLS port."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "once", "--broker",
         f"mqtts://127.0.0.1:{fleet.mtls_port}", "--ca-bundle", str(creds.ca_bundle_path),
         "--cert", str(creds.cert_path), "--key", str(creds.key_path),
         "--state-dir", str(state), "--timeout-s", str(timeout_s), *extra],
        capture_output=True, text=True, timeout=60)


def stop(probe: MqttProbe) -> None:
    probe.client.disconnect()
    probe.client.loop_stop()


def test_once_delivers_a_status_that_verifies_with_the_published_cert(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("gw-once", tmp_path, days=200)
    probe = watcher(fleet_broker, tmp_path)
    try:
        done = run_once(fleet_broker, creds, tmp_path / "state")
        assert done.returncode == 0, done.stderr
        assert "delivered status seq=1 for gw-once" in done.stdout
        status_topic = p.status_topic(PREFIX, "gw-once")
        assert wait_until(lambda: last_payload(probe, status_topic) is not None, 5)
        assert wait_until(lambda: last_payload(probe, p.cert_topic(PREFIX, "gw-once")), 5)
        token = last_payload(probe, status_topic)
        cert_msg = p.decode_message(p.CertMessage,
                                    last_payload(probe, p.cert_topic(PREFIX, "gw-once")))  # type: ignore[arg-type]
        signing_cert = cert_msg.certificates()[0]
        parsed = p.parse_jws(token, p.MAX_STATUS_JWS_BYTES)  # type: ignore[arg-type]
        assert parsed.cert_sha256 == cert_msg.sha256
        p.verify_jws(parsed, signing_cert.public_key())
        status = p.decode_status(parsed.payload)
        leaf = x509.load_pem_x509_certificates(creds.cert_path.read_bytes())[0]
        assert status.device_id == "gw-once" and status.seq == 1
        assert status.client is not None
        assert status.client.not_after == leaf.not_valid_after_utc
        assert status.client.key_matches is True and status.client.key_mode == "0600"
        assert status.client_chain is not None and status.client_chain.valid_now
        assert status.trust_store is not None and status.trust_store.count == 2
        assert status.broker is not None and status.broker.valid_now is True
        assert status.broker.chain[0].subject == "localhost"  # the CN names it
        assert len(status.broker.chain) >= 1
        print(f"status JWS bytes: {len(token)}")  # type: ignore[arg-type]
        # The first status of a connection carries the signing chain in its header
        # (mqtt.status_x5c, ~1.4 KB); with the ~120-byte plain header it is under 2 KB.
        header_b64 = token.split(b".", 1)[0]  # type: ignore[union-attr]
        assert parsed.x5c and len(token) - len(header_b64) + 120 < 2048  # type: ignore[arg-type]
        assert wait_until(
            lambda: last_payload(probe, p.inventory_topic(PREFIX, "gw-once")), 5)
    finally:
        stop(probe)


def test_a_device_cannot_publish_under_another_devices_topic(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("gw-honest", tmp_path)
    probe = watcher(fleet_broker, tmp_path)
    try:
        done = run_once(fleet_broker, creds, tmp_path / "s", "--device-id", "gw-victim",
                        timeout_s=10)
        assert done.returncode == 2
        assert "the broker refused status seq=1 for gw-victim" in done.stderr
        assert last_payload(probe, p.status_topic(PREFIX, "gw-victim")) is None
    finally:
        stop(probe)


@pytest.fixture
def own_broker(fleet_broker: Fleet, mosquitto_factory: Any, tmp_path: Path) -> Any:
    """A private broker in the documented configuration (device listener first, then
    operations), on the fleet's PKI: this test stops and kills it."""
    documented = fleet_broker.documented(tmp_path / "own-broker")
    return mosquitto_factory(documented.listeners, extra_conf=documented.global_conf)


def test_broker_outage_spools_and_delivers_everything_in_order(
    fleet_broker: Fleet, own_broker: Any, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("gw-outage", tmp_path)
    service = AgentService(agent_config(creds, own_broker.port, tmp_path / "state"))
    probe = watcher(fleet_broker, tmp_path, own_broker.listeners[1].port)
    try:
        service.report_once()
        assert service.link is not None and service.link.wait_connected(10)
        assert service.wait_delivered(10)
        own_broker.stop()
        assert wait_until(lambda: not service.link.is_connected, 10)  # type: ignore[union-attr]
        for _ in range(5):  # five intervals without a broker: each is one report
            service.report_once()
            service.flush()
        assert service.spool.depth == 5
        stop(probe)
        own_broker.start()
        probe = watcher(fleet_broker, tmp_path, own_broker.listeners[1].port)
        assert service.wait_delivered(20), service.link.state.last_error  # type: ignore[union-attr]
        assert wait_until(lambda: len(statuses(probe, "gw-outage")) >= 5, 10)
        seqs = [s.seq for s in statuses(probe, "gw-outage")]
        assert seqs == [2, 3, 4, 5, 6]  # in order, no gap, nothing lost
        assert statuses(probe, "gw-outage")[-1].agent.spool_depth == 4  # it was queued
    finally:
        service.shutdown()
        stop(probe)


def test_renewed_client_cert_is_reported_and_used_without_restart(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("gw-renew", tmp_path, days=5)
    service = AgentService(agent_config(creds, fleet_broker.mtls_port, tmp_path / "state"))
    probe = watcher(fleet_broker, tmp_path)
    try:
        first = service.report_once()
        assert service.wait_delivered(15)
        assert {f.code for f in first.status.findings} >= {"CERT_EXPIRING"}
        renewed = fleet_broker.device_credentials("gw-renew", tmp_path / "new", days=365,
                                                  name="gw-renew-2")
        creds.cert_path.write_bytes(renewed.cert_path.read_bytes())
        creds.key_path.write_bytes(renewed.key_path.read_bytes())
        second = service.report_once()
        assert service.wait_delivered(15)
        assert second.status.client is not None and first.status.client is not None
        assert second.status.client.sha256 != first.status.client.sha256
        assert "CERT_EXPIRING" not in {f.code for f in second.status.findings}
        assert wait_until(lambda: len(statuses(probe, "gw-renew")) >= 2, 5)
        assert statuses(probe, "gw-renew")[-1].client.sha256 == second.status.client.sha256  # type: ignore[union-attr]
        assert service.link is not None and service.link.state.connects == 1  # the new link
    finally:
        service.shutdown()
        stop(probe)


def start_agent(creds: DeviceCreds, port: int, state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--broker", f"mqtts://127.0.0.1:{port}",
         "--ca-bundle", str(creds.ca_bundle_path), "--cert", str(creds.cert_path),
         "--key", str(creds.key_path), "--state-dir", str(state), "--interval-s", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_leaving_is_visible_retained_on_the_online_topic(
    fleet_broker: Fleet, tmp_path: Path, how: str
) -> None:
    device = f"gw-leave-{how}"
    creds = fleet_broker.device_credentials(device, tmp_path)
    probe = watcher(fleet_broker, tmp_path)
    agent = start_agent(creds, fleet_broker.mtls_port, tmp_path / "state")
    online = p.online_topic(PREFIX, device)
    try:
        assert wait_until(lambda: last_payload(probe, online) == b'{"online":true}', 20)
        assert wait_until(lambda: statuses(probe, device), 20)
        agent.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        out, _ = agent.communicate(timeout=20)
        assert wait_until(lambda: last_payload(probe, online) == b'{"online":false}', 10), out
        if how == "sigterm":
            assert agent.returncode == 0, out
        assert "BEGIN" not in out and "PRIVATE" not in out  # no key material in logs
    finally:
        if agent.poll() is None:
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait()
        stop(probe)
    # Retained: a dashboard connecting later still sees it.
    late = watcher(fleet_broker, tmp_path)
    try:
        assert wait_until(lambda: last_payload(late, online) == b'{"online":false}', 5)
        retained = [r for t, _, r in late.messages if t == online]
        assert retained and retained[0] is True
    finally:
        stop(late)


def test_show_prints_the_unsigned_status_without_a_network(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("gw-show", tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "show", "--broker", "mqtts://127.0.0.1:9",
         "--ca-bundle", str(creds.ca_bundle_path), "--cert", str(creds.cert_path),
         "--key", str(creds.key_path), "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["device_id"] == "gw-show" and data["v"] == 1
    p.Status.from_json(data)


def test_run_speaks_sd_notify_and_reloads_its_config_on_sighup(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    """What systemd sees (a real AF_UNIX datagram socket as NOTIFY_SOCKET): READY once
    running, WATCHDOG pings, STOPPING on SIGTERM; and SIGHUP re-reads the TOML file."""
    import socket

    creds = fleet_broker.device_credentials("gw-systemd", tmp_path)
    config = tmp_path / "agent.toml"
    body = f"""[mqtt]
broker = "mqtts://127.0.0.1:{fleet_broker.mtls_port}"
[tls]
ca_bundle = "{creds.ca_bundle_path}"
cert = "{creds.cert_path}"
key = "{creds.key_path}"
[agent]
state_dir = "{tmp_path / 'state'}"
interval_s = 60
"""
    config.write_text(body)
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            env["WATCHDOG_PID"] = str(agent.pid)
            seen: list[bytes] = []
            while b"WATCHDOG=1" not in seen:
                seen.append(sock.recv(4096))
            assert b"READY=1" in seen
            assert agent.stdout is not None

            def read_until(needle: str) -> None:
                for line in agent.stdout:  # type: ignore[union-attr]
                    lines.append(line)
                    if needle in line:
                        return

            lines: list[str] = []
            config.write_text(body.replace("interval_s = 60", "interval_s = 120"))
            agent.send_signal(signal.SIGHUP)
            read_until("configuration reloaded")
            config.write_text(body + "bogus = 1\n")
            agent.send_signal(signal.SIGHUP)
            read_until("configuration not reloaded")
            agent.send_signal(signal.SIGTERM)
            while b"STOPPING=1" not in seen:
                seen.append(sock.recv(4096))
            rest, _ = agent.communicate(timeout=20)
            out = "".join(lines) + rest
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.communicate()
    assert agent.returncode == 0, out
    assert "configuration reloaded" in out
    # A broken file on reload keeps the running config and says exactly what is wrong.
    assert "configuration not reloaded, keeping the running one" in out
    assert f"{config}:10: agent.bogus: unknown key" in out


# paho 2.2 leaks the socket of a failed TLS handshake (its ResourceWarning is paho's).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("servername,connects", [("localhost", True), ("elsewhere.example", False)])
def test_servername_sets_sni_and_the_name_the_broker_certificate_must_carry(
    fleet_broker: Fleet, tmp_path: Path, servername: str, connects: bool
) -> None:
    from certmon.mqtt import LinkSettings, MqttLink

    creds = fleet_broker.device_credentials(f"gw-sni-{connects}", tmp_path)
    link = MqttLink(LinkSettings(
        host="127.0.0.1", port=fleet_broker.mtls_port, client_id=f"sni-{connects}",
        ca_bundle=str(creds.ca_bundle_path), cert=str(creds.cert_path),
        key=str(creds.key_path), servername=servername, reconnect_min_s=5))
    link.start()
    try:
        assert link.wait_connected(5 if connects else 1.5) is connects
    finally:
        link.stop()
