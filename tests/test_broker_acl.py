"""The documented broker configuration holds against device certificates with hostile CNs.

Issue 19: in the v1 configuration a fleet-CA certificate with CN `collector` got the
collector's rights, and `pattern write certmon/v1/%u/#` let CNs `fleet`, `alerts`
and `_collector` publish — retained — a forged fleet summary, alert and time beacon.
Here the broker runs packaging/mosquitto/ exactly as shipped (kit.brokerconf; the
`fleet_broker` fixture): devices on a listener trusting the fleet CA, the collector
on one trusting only the operations CA. Each test is the operator's question "what
can a certificate the fleet CA issued do?", answered by real Mosquitto.

Also here: the migration from certmon/v1 — the shipped ACLs' migration rules and
the collector's `mqtt.legacy_v1_topics`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import DeviceCreds, Fleet, MosquittoFactory, start_collector
from cryptography.hazmat.primitives.asymmetric import ec
from kit.broker import Mosquitto, wait_until
from kit.brokerconf import DEVICE_ACL, OPERATIONS_ACL, PACKAGING_DIR, documented_acl
from kit.fleet import SimDevice, cert_message, signed_status
from kit.mqttprobe import MqttProbe

from certmon import wire as p
from certmon.config import loads
from certmon.errors import ConfigError, ProtocolError
from certmon.fleetsig import SIG_PROPERTY, verify_fleet
from collector.config import CollectorConfig
from collector.service import CollectorService

TIMEOUT_S = 5.0
PREFIX = p.DEFAULT_PREFIX
NOT_AUTHORIZED = 135  # MQTT v5 PUBACK reason code
# The CNs that named collector topics in v1 (and the collector's identity itself).
HOSTILE_CNS = ("collector", "fleet", "alerts", "_collector")
# Every topic only the collector may write: what dashboards, alert consumers and
# (the beacon) every agent's clock check read.
COLLECTOR_TOPICS = (
    p.fleet_summary_topic(PREFIX), p.fleet_device_topic(PREFIX, "gw-acl-victim"),
    p.alerts_topic(PREFIX), p.alerts_topic(PREFIX, "gw-acl-victim"), p.beacon_topic(PREFIX),
)


def accepted(reason: object) -> bool:
    """A PUBACK reason below 128: success, or "no matching subscribers" (16)."""
    return not getattr(reason, "is_failure", True)


def probe(name: str, creds: DeviceCreds) -> MqttProbe:
    return MqttProbe(name, ca_certs=str(creds.ca_bundle_path), certfile=str(creds.cert_path),
                     keyfile=str(creds.key_path))


@pytest.fixture
def operations(fleet_broker: Fleet, tmp_path: Path) -> Iterator[MqttProbe]:
    """The collector's view: an operations-CA certificate, CN collector, reading all."""
    watcher = probe("acl-operations", fleet_broker.collector_credentials(tmp_path / "ops"))
    watcher.connect(fleet_broker.operations_port)
    watcher.subscribe(f"{PREFIX}/#")
    yield watcher
    watcher.close()


@pytest.fixture
def victim(fleet_broker: Fleet, tmp_path: Path) -> Iterator[MqttProbe]:
    """An honest device with a retained status: what a hostile one must not read."""
    device = probe("gw-acl-victim",
                   fleet_broker.device_credentials("gw-acl-victim", tmp_path / "victim"))
    device.connect(fleet_broker.mtls_port)
    reason = device.publish_acked(p.status_topic(PREFIX, "gw-acl-victim"), b"victim-retained",
                                  retain=True)
    assert accepted(reason), reason
    yield device
    # The broker is the whole session's: a later collector must not meet (and count
    # as rejected) this stand-in status. An empty retained message clears it.
    assert accepted(device.publish_acked(p.status_topic(PREFIX, "gw-acl-victim"), b"",
                                         retain=True))
    device.close()


def retained_under(fleet: Fleet, tmp: Path, topic_filter: str) -> list[tuple[str, bytes]]:
    """Every retained message under `topic_filter`, read by a fresh operations client.
    The broker queues retained messages right after the SUBACK, so a message the
    client publishes once it has the SUBACK arrives after all of them."""
    with probe("acl-retained", fleet.collector_credentials(tmp / "retained")) as reader:
        reader.connect(fleet.operations_port)
        marker = f"{PREFIX}/fleet/acl-marker"
        reader.subscribe(marker)
        reader.subscribe(topic_filter)
        reader.client.publish(marker, b"end", qos=1)
        assert wait_until(lambda: reader.received(marker), TIMEOUT_S)
        return [(t, m) for t, m, retained in list(reader.messages) if retained]


# --------------------------------------------------------------------------- shipped


def test_the_fleet_broker_runs_the_shipped_files(fleet_broker: Fleet) -> None:
    """What the suite runs is packaging/mosquitto/ as shipped: every setting of
    certmon.conf (paths replaced) and both ACL files byte for byte."""
    running = fleet_broker.broker.conf_text()
    shipped = (PACKAGING_DIR / "certmon.conf").read_text()
    settings = [line for line in shipped.splitlines() if line and not line.startswith("#")]
    assert len(settings) > 15
    for line in settings:
        key, _, value = line.partition(" ")
        if key == "listener":
            continue
        if value.startswith("/etc/mosquitto/"):
            assert re.search(rf"^{key} /\S+$", running, re.MULTILINE), line
        else:
            assert re.search(rf"^{re.escape(line)}$", running, re.MULTILINE), line
    acl_files = re.findall(r"^acl_file (\S+)$", running, re.MULTILINE)
    assert [Path(f).read_text() for f in acl_files] == [
        (PACKAGING_DIR / DEVICE_ACL).read_text(), (PACKAGING_DIR / OPERATIONS_ACL).read_text()]


def test_docs_show_the_shipped_files_verbatim() -> None:
    docs = (PACKAGING_DIR.parents[1] / "docs" / "mosquitto.md").read_text()
    for name in ("certmon.conf", DEVICE_ACL, OPERATIONS_ACL):
        assert (PACKAGING_DIR / name).read_text() in docs, (
            f"docs/mosquitto.md no longer shows packaging/mosquitto/{name} as shipped")


def test_migration_rules_are_the_commented_v1_lines_only() -> None:
    for name in (DEVICE_ACL, OPERATIONS_ACL):
        shipped, migrating = documented_acl(name), documented_acl(name, migration=True)
        added = set(migrating.splitlines()) - set(shipped.splitlines())
        assert added and all(" certmon/v1/" in line for line in added), (name, added)


# --------------------------------------------------------------------------- hostile CNs


@pytest.mark.parametrize("cn", HOSTILE_CNS)
def test_a_fleet_ca_certificate_cannot_read_another_devices_status(
    fleet_broker: Fleet, victim: MqttProbe, operations: MqttProbe, tmp_path: Path, cn: str
) -> None:
    with probe(f"acl-read-{cn}", fleet_broker.device_credentials(cn, tmp_path)) as hostile:
        hostile.connect(fleet_broker.mtls_port)
        hostile.subscribe(p.device_topic_filter(PREFIX, p.TopicKind.STATUS))
        hostile.subscribe("#")
        # A live status after the subscriptions, then a beacon (which devices may
        # read): the broker queued any delivery of the status before the victim's
        # PUBACK, so once the beacon is in, the status would have been too.
        assert accepted(victim.publish_acked(p.status_topic(PREFIX, "gw-acl-victim"), b"live"))
        assert accepted(operations.publish_acked(p.beacon_topic(PREFIX), b"beacon"))
        assert wait_until(lambda: hostile.received(p.beacon_topic(PREFIX)), TIMEOUT_S)
        assert [t for t, _, _ in hostile.messages] == [p.beacon_topic(PREFIX)]


@pytest.mark.parametrize("cn", HOSTILE_CNS)
def test_a_fleet_ca_certificate_cannot_publish_any_collector_topic(
    fleet_broker: Fleet, operations: MqttProbe, tmp_path: Path, cn: str
) -> None:
    creds = fleet_broker.device_credentials(cn, tmp_path)
    with probe(f"acl-write-{cn}", creds) as hostile:
        hostile.connect(fleet_broker.mtls_port)
        for topic in COLLECTOR_TOPICS:
            for retain in (False, True):
                reason = hostile.publish_acked(topic, f"forged by {cn}".encode(), retain=retain)
                assert reason == NOT_AUTHORIZED, (topic, retain, reason)
                hostile.client.publish(topic, b"forged qos0", qos=0, retain=retain)
        # Its own device topic is the one it may write; one publisher's messages
        # arrive in order, so once this is in, the forged ones would have been too.
        own = f"{PREFIX}/devices/{cn}/status"  # literal: certmon's builders refuse `fleet`
        assert accepted(hostile.publish_acked(own, b"marker"))
        assert wait_until(lambda: operations.received(own), TIMEOUT_S)
    forged = [t for t, payload, _ in operations.messages if b"forged" in payload]
    assert forged == []
    assert [t for t, _ in retained_under(fleet_broker, tmp_path, f"{PREFIX}/#")
            if t in COLLECTOR_TOPICS] == []


def test_the_retained_check_sees_a_retained_message(
    fleet_broker: Fleet, victim: MqttProbe, tmp_path: Path
) -> None:
    """The control for the test above: `retained_under` does find retained messages."""
    assert (p.status_topic(PREFIX, "gw-acl-victim"), b"victim-retained") in retained_under(
        fleet_broker, tmp_path, p.device_topic_filter(PREFIX))


def test_a_fleet_ca_certificate_named_collector_cannot_log_in_as_the_collector(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    """The operations listener trusts only the operations CA: a fleet-CA certificate
    with CN collector is refused there, so the collector's ACL is out of its reach."""
    impostor = fleet_broker.device_credentials("collector", tmp_path / "impostor")
    with probe("acl-impostor", impostor) as client:
        assert client.attempt(fleet_broker.operations_port) is not None


def test_the_collectors_certificate_is_no_device_certificate(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    with probe("acl-ops-on-devices", fleet_broker.collector_credentials(tmp_path)) as client:
        assert client.attempt(fleet_broker.mtls_port) is not None


# --------------------------------------------------------------------------- end to end


def sim_device(fleet: Fleet, tmp: Path, device_id: str) -> tuple[SimDevice, DeviceCreds]:
    leaf = fleet.pki.leaf(fleet.devices_ca, device_id, name=f"acl-{device_id}")
    cert_path, key_path = leaf.write(tmp, chain=True)
    assert isinstance(leaf.key, ec.EllipticCurvePrivateKey)  # kit.pki's default: P-256
    dev = SimDevice(device_id, leaf.key, leaf.cert, (fleet.devices_ca.cert,))
    return dev, DeviceCreds(cert_path, key_path, fleet.ca_bundle_path, device_id)


def test_the_collector_on_the_operations_listener_works_end_to_end(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path
) -> None:
    """A device reports on the device listener; the collector (operations CA) stores
    it and publishes the device's fleet view, which a dashboard client reads."""
    dev, creds = sim_device(fleet_broker, tmp_path, "gw-acl-e2e")
    with (probe("gw-acl-e2e", creds) as device,
          probe("acl-dashboard", fleet_broker.collector_credentials(tmp_path / "d")) as board):
        board.connect(fleet_broker.operations_port)
        board.subscribe(p.fleet_device_topic(PREFIX, "gw-acl-e2e"))
        device.connect(fleet_broker.mtls_port)
        assert accepted(device.publish_acked(p.cert_topic(PREFIX, dev.device_id),
                                             cert_message(dev), retain=True))
        assert accepted(device.publish_acked(p.status_topic(PREFIX, dev.device_id),
                                             signed_status(dev, 1, datetime.now(UTC)),
                                             retain=True))
        assert wait_until(lambda: collector.store.device("gw-acl-e2e") is not None, 10), \
            collector.ingestor.rejected
        view_topic = p.fleet_device_topic(PREFIX, "gw-acl-e2e")
        assert wait_until(lambda: board.received(view_topic), 10)
        # The view carries the collector's signature; a dashboard that trusts the
        # operations CA can check it, whichever broker or bridge it reads through.
        i = next(i for i, (t, _m, _r) in enumerate(list(board.messages)) if t == view_topic)
        sig = dict(board.user_properties[i]).get(SIG_PROPERTY)
        signer = verify_fleet(view_topic, board.messages[i][1], sig,
                              [fleet_broker.operations_ca.cert], datetime.now(UTC))
        assert signer.subject.rfc4514_string() == "CN=collector"
        # The broker is the whole session's: a later collector must not meet these.
        for kind in (p.TopicKind.CERT, p.TopicKind.STATUS):
            assert accepted(device.publish_acked(p.device_topic(PREFIX, dev.device_id, kind),
                                                 b"", retain=True))


def test_a_forged_summary_from_a_wider_path_fails_the_consumers_check(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path
) -> None:
    """Anyone with write access the ACL does not see (here the anonymous test
    listener; in real life a bridge or a second broker) can put bytes on a fleet
    topic, but not the collector's signature over them."""
    topic = p.fleet_summary_topic(PREFIX)
    forged = b'{"counts":{"ok":1000},"v":1}'
    with (MqttProbe("acl-forger") as forger,
          probe("acl-board2", fleet_broker.collector_credentials(tmp_path / "b2")) as board):
        board.connect(fleet_broker.operations_port)
        board.subscribe(topic)
        forger.connect(fleet_broker.plain_port)
        forger.publish_acked(topic, forged, retain=False)
        assert wait_until(lambda: any(m == forged for t, m, _r in list(board.messages)
                                      if t == topic), 10)
        i = next(i for i, (_t, m, _r) in enumerate(list(board.messages)) if m == forged)
        with pytest.raises(ProtocolError) as err:
            verify_fleet(topic, forged, dict(board.user_properties[i]).get(SIG_PROPERTY),
                         [fleet_broker.operations_ca.cert], datetime.now(UTC))
        assert err.value.reason == "unsigned"


# --------------------------------------------------------------------------- migration


@pytest.fixture
def migrating_broker(fleet_broker: Fleet, mosquitto_factory: MosquittoFactory,
                     tmp_path: Path) -> Mosquitto:
    """The shipped configuration with its migration rules on (docs/mosquitto.md,
    "Migrating from certmon/v1"): device listener first, operations second."""
    documented = fleet_broker.documented(tmp_path / "migrating", migration=True)
    return mosquitto_factory(documented.listeners, extra_conf=documented.global_conf)


def test_legacy_v1_topics_stores_a_v1_agents_status_only_when_set(
    fleet_broker: Fleet, migrating_broker: Mosquitto, tmp_path: Path
) -> None:
    """Mid-migration: a v1 agent still publishes certmon/v1/<dev>/…, a v2 agent
    certmon/v2/devices/<dev>/…. The collector with mqtt.legacy_v1_topics = true
    stores both; the one without stores only the v2 agent."""
    legacy = start_collector(fleet_broker, migrating_broker, tmp_path / "legacy",
                             **{"mqtt.legacy_v1_topics": "true"})
    current = start_collector(fleet_broker, migrating_broker, tmp_path / "current")
    old_dev, old_creds = sim_device(fleet_broker, tmp_path, "gw-still-v1")
    new_dev, new_creds = sim_device(fleet_broker, tmp_path, "gw-now-v2")
    now = datetime.now(UTC)
    try:
        with probe("gw-still-v1", old_creds) as old, probe("gw-now-v2", new_creds) as new:
            old.connect(migrating_broker.port)
            new.connect(migrating_broker.port)
            for client, dev, topic in (
                    (old, old_dev, p.legacy_v1_device_topic),
                    (new, new_dev, functools.partial(p.device_topic, PREFIX))):
                assert accepted(client.publish_acked(topic(dev.device_id, p.TopicKind.CERT),
                                                     cert_message(dev), retain=True))
                assert accepted(client.publish_acked(topic(dev.device_id, p.TopicKind.STATUS),
                                                     signed_status(dev, 1, now), retain=True))
        assert wait_until(lambda: all(s.store.device("gw-now-v2") is not None
                                      for s in (legacy, current)), 10)
        assert wait_until(lambda: legacy.store.device("gw-still-v1") is not None, 10), \
            legacy.ingestor.rejected
        # The v1 agent's messages were acknowledged before the v2 agent's went out,
        # and the broker delivers in order: nothing more is coming for `current`.
        assert current.store.device("gw-still-v1") is None
        assert sum(current.ingestor.rejected.values()) == 0
    finally:
        legacy.close()
        current.close()


def test_legacy_v1_topics_refuses_a_v2_prefix_inside_the_v1_tree(tmp_path: Path) -> None:
    """`pattern write certmon/v1/%u/#` (on during the migration) would let a CN named
    like the next level write every device's v2 topics below certmon/v1/…."""
    files = {name: tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem")}
    for path in files.values():
        path.write_text("x")
    overrides: dict[str, Any] = {
        "mqtt.broker": "mqtts://broker.example", "tls.ca_bundle": str(files["ca.pem"]),
        "tls.cert": str(files["cert.pem"]), "tls.key": str(files["key.pem"]),
        "tls.fleet_ca": str(files["ca.pem"]), "mqtt.legacy_v1_topics": "true"}
    assert loads(CollectorConfig, "", overrides=overrides).mqtt.legacy_v1_topics is True
    for prefix in ("certmon/v1", "certmon/v1/site-a"):
        with pytest.raises(ConfigError, match="legacy_v1_topics: needs a topic_prefix outside "
                                              "certmon/v1"):
            loads(CollectorConfig, "", overrides={**overrides, "mqtt.topic_prefix": prefix})
    assert loads(CollectorConfig, "", overrides={
        **overrides, "mqtt.topic_prefix": "certmon/v1x"}).mqtt.topic_prefix == "certmon/v1x"


def test_a_v1_agent_cannot_report_once_the_migration_rules_are_gone(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    """The shipped (final) configuration refuses the v1 layout: a v1 agent's publish
    is answered "not authorized", so the operator sees who was not upgraded."""
    creds = fleet_broker.device_credentials("gw-forgotten", tmp_path)
    with probe("gw-forgotten", creds) as old:
        old.connect(fleet_broker.mtls_port)
        reason = old.publish_acked(p.legacy_v1_device_topic("gw-forgotten", p.TopicKind.STATUS),
                                   b"v1")
        assert reason == NOT_AUTHORIZED
