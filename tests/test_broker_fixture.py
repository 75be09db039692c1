"""The broker fixtures tell the truth: mTLS identity, the certmon ACLs, restarts.

Every later integration test leans on these properties; if one breaks, the failure
should point here and not at the agent or the collector.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import DeviceCreds, Fleet, MosquittoFactory, ScenarioBroker
from cryptography.hazmat.primitives.serialization import Encoding
from kit.broker import BrokerStartError, Listener, Mosquitto, wait_until
from kit.mqttprobe import MqttProbe
from kit.pki import PKIFactory

from certmon import wire as p

TIMEOUT_S = 5.0


def tls_args(creds: DeviceCreds) -> dict[str, str | None]:
    return {
        "ca_certs": str(creds.ca_bundle_path),
        "certfile": str(creds.cert_path),
        "keyfile": str(creds.key_path),
    }


def test_device_publishes_own_topic_and_collector_receives(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    device = fleet_broker.device_credentials("dev-own-topic", tmp_path)
    collector = fleet_broker.collector_credentials(tmp_path)
    with (
        MqttProbe("collector-1", **tls_args(collector)) as sub,
        MqttProbe("dev-own-topic", **tls_args(device)) as pub,
    ):
        sub.connect(fleet_broker.operations_port)
        sub.subscribe("certmon/v2/#")
        pub.connect(fleet_broker.mtls_port)
        own = p.status_topic(p.DEFAULT_PREFIX, "dev-own-topic")
        pub.client.publish(own, b"hello", qos=1)
        assert wait_until(lambda: sub.received(own), TIMEOUT_S)
        assert sub.received(own) == [b"hello"]


def test_device_cannot_write_another_devices_topic(fleet_broker: Fleet, tmp_path: Path) -> None:
    device = fleet_broker.device_credentials("dev-mallory", tmp_path)
    collector = fleet_broker.collector_credentials(tmp_path)
    with (
        MqttProbe("collector-2", **tls_args(collector)) as sub,
        MqttProbe("dev-mallory", **tls_args(device)) as pub,
    ):
        sub.connect(fleet_broker.operations_port)
        sub.subscribe("certmon/v2/#")
        pub.connect(fleet_broker.mtls_port)
        victim = p.status_topic(p.DEFAULT_PREFIX, "dev-victim")
        pub.client.publish(victim, b"forged", qos=1)
        pub.client.publish(p.fleet_summary_topic(p.DEFAULT_PREFIX), b"forged", qos=1)
        # One publisher's messages arrive in order, so once this marker is in, the
        # forged ones would have been too: no sleep needed to prove absence.
        marker = p.status_topic(p.DEFAULT_PREFIX, "dev-mallory")
        pub.client.publish(marker, b"marker", qos=1)
        assert wait_until(lambda: sub.received(marker), TIMEOUT_S)
        assert sub.received(victim) == []
        assert sub.received(p.fleet_summary_topic(p.DEFAULT_PREFIX)) == []


def test_collector_shared_subscription_passes_the_acl(fleet_broker: Fleet, tmp_path: Path) -> None:
    """DESIGN §5: N collectors share the load via `$share/<group>/…`; mosquitto 2.0
    checks the ACL against the topic filter without the `$share/<group>/` prefix."""
    device = fleet_broker.device_credentials("dev-shared", tmp_path)
    collector = fleet_broker.collector_credentials(tmp_path)
    with (
        MqttProbe("collector-shared", **tls_args(collector)) as sub,
        MqttProbe("dev-shared", **tls_args(device)) as pub,
    ):
        sub.connect(fleet_broker.operations_port)
        sub.subscribe("$share/collectors/" + p.device_topic_filter(p.DEFAULT_PREFIX,
                                                                   p.TopicKind.STATUS))
        assert [getattr(r, "is_failure", True) for r in sub.subscribed] == [False]
        pub.connect(fleet_broker.mtls_port)
        own = p.status_topic(p.DEFAULT_PREFIX, "dev-shared")
        pub.client.publish(own, b"s", qos=1)
        assert wait_until(lambda: sub.received(own), TIMEOUT_S)


@pytest.mark.parametrize("listener", ["mtls_port", "operations_port"])
def test_client_without_certificate_is_refused_on_mtls(fleet_broker: Fleet,
                                                       listener: str) -> None:
    with MqttProbe("no-cert", ca_certs=str(fleet_broker.ca_bundle_path)) as probe:
        assert probe.attempt(getattr(fleet_broker, listener)) is not None


def test_client_without_certificate_is_refused_on_mtls_tls12(fleet_broker: Fleet) -> None:
    with MqttProbe("no-cert-12", ca_certs=str(fleet_broker.ca_bundle_path)) as probe:
        probe.client._ssl_context.maximum_version = ssl.TLSVersion.TLSv1_2  # type: ignore[union-attr]
        assert "connect failed" in (probe.attempt(fleet_broker.mtls_port) or "")


def test_certificate_from_another_ca_is_refused(
    fleet_broker: Fleet, pki: PKIFactory, tmp_path: Path
) -> None:
    """A cert for a real device id, issued by the broker CA rather than the fleet CA."""
    rogue = pki.leaf(fleet_broker.broker_ca, "dev-rogue", name="dev-rogue-other-ca")
    cert_path, key_path = rogue.write(tmp_path)
    with MqttProbe(
        "dev-rogue", ca_certs=str(fleet_broker.ca_bundle_path),
        certfile=str(cert_path), keyfile=str(key_path),
    ) as probe:  # fmt: skip
        assert probe.attempt(fleet_broker.mtls_port) is not None


def test_tls_listener_serves_the_broker_cert_without_client_auth(fleet_broker: Fleet) -> None:
    with MqttProbe("tls-anon", ca_certs=str(fleet_broker.ca_bundle_path)) as probe:
        probe.connect(fleet_broker.tls_port)  # hostname 127.0.0.1 is in the server SAN


def test_restart_keeps_port_and_clients_reconnect(
    mosquitto_factory: MosquittoFactory,
) -> None:
    broker = mosquitto_factory([Listener()])
    port, first_pid = broker.port, broker.pid
    with MqttProbe("restart-probe") as probe:
        probe.connect(port)
        broker.restart()
        assert (broker.port, broker.running) == (port, True)
        assert broker.pid != first_pid
        assert wait_until(lambda: probe.disconnects >= 1 and probe.is_connected, TIMEOUT_S)
        probe.client.subscribe("t/restart", qos=1)
        assert wait_until(lambda: probe.is_connected, TIMEOUT_S)
        probe.client.publish("t/restart", b"again", qos=1)
        assert wait_until(lambda: probe.received("t/restart") == [b"again"], TIMEOUT_S)


def test_kill_then_start_on_same_port(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory([Listener()])
    port = broker.port
    broker.kill()
    assert not broker.running
    broker.start()
    with MqttProbe("after-kill") as probe:
        probe.connect(port)


def test_broken_config_fails_with_the_log(mosquitto_bin: str, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, [Listener()], extra_conf="no_such_option 1", binary=mosquitto_bin)
    with pytest.raises(BrokerStartError, match="no_such_option"):
        broker.start()
    assert not broker.running


def test_paho_speaks_v5_to_the_fixture(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory([Listener()])
    with MqttProbe("v5") as probe:
        probe.connect(broker.port)
        assert probe.client.protocol == mqtt.MQTTv5


def test_scenario_broker_presents_each_scenario_chain(scenario_broker: ScenarioBroker) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # observe first: expired and untrusted chains too
    for name, port in scenario_broker.ports.items():
        leaf = scenario_broker.scenarios[name].leaf
        with (
            socket.create_connection((scenario_broker.host, port), timeout=TIMEOUT_S) as sock,
            ctx.wrap_socket(sock) as tls,
        ):
            assert tls.getpeercert(binary_form=True) == leaf.cert.public_bytes(Encoding.DER), name


def test_global_acl_with_per_listener_settings_is_refused(
    mosquitto_bin: str, tmp_path: Path
) -> None:
    """Mosquitto would apply a global acl_file to no listener at all once listeners
    carry their own settings: the kit refuses the mix instead of running it."""
    with pytest.raises(ValueError, match="per listener"):
        Mosquitto(tmp_path, [Listener(allow_anonymous=True)], acl="topic read #",
                  binary=mosquitto_bin)
