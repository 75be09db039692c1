"""Hostile input through the real broker: forged, replayed, mis-addressed, malformed
and oversized messages are each rejected with the right counted reason, and the
collector keeps ingesting good messages afterwards.

The attacker publishes on the broker's plain listener, where the test ACL lets an
anonymous client write anything: exactly the situation signatures exist for.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet
from cryptography.hazmat.primitives import hashes, serialization
from kit.broker import wait_until
from kit.mqttprobe import MqttProbe

from certmon import wire as p

PREFIX = p.DEFAULT_PREFIX


@pytest.fixture
def attacker(fleet_broker: Fleet) -> Iterator[MqttProbe]:
    probe = MqttProbe("attacker").connect(fleet_broker.plain_port)
    yield probe
    probe.client.disconnect()
    probe.client.loop_stop()


def device(fleet: Fleet, tmp: Path, device_id: str, *, ca: Any = None) -> dict[str, Any]:
    issuer = ca or fleet.devices_ca
    leaf = fleet.pki.leaf(issuer, device_id, name=f"adv-{device_id}")
    chain = [c.cert for c in leaf.chain()[:-1]]
    cert_msg = p.encode_message(p.CertMessage(
        device_id=device_id, sha256=leaf.cert.fingerprint(hashes.SHA256()).hex(),
        x5c=tuple(base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                  for c in chain)))
    return {"id": device_id, "key": leaf.key, "cert": leaf.cert, "cert_msg": cert_msg}


def status_payload(device_id: str, seq: int, *, boot_id: str = "boot-1") -> bytes:
    status = p.Status(
        device_id=device_id, boot_id=boot_id, seq=seq, ts=datetime.now(UTC), mono_s=10.0,
        interval_s=60, client=None, client_chain=None, trust_store=None, broker=None,
        clock=p.ClockSummary(synced=True, source="chrony", offset_s=0.0, maxerror_s=0.01,
                             plausible=True, beacon=None),
        findings=(), agent=p.AgentSelf(version="test", uptime_s=1.0, rss_bytes=None,
                                       last_publish_ok_at=None, spool_depth=0,
                                       spool_dropped=0))
    return p.encode_status(status)


def signed(dev: dict[str, Any], payload: bytes) -> bytes:
    return p.sign_jws(payload, dev["key"], dev["cert"])


def publish(attacker: MqttProbe, topic: str, payload: bytes) -> None:
    info = attacker.client.publish(topic, payload, qos=1)
    info.wait_for_publish(10)


def test_every_kind_of_bad_message_is_rejected_with_its_reason(
    fleet_broker: Fleet, collector: Any, attacker: MqttProbe, tmp_path: Path
) -> None:
    alice = device(fleet_broker, tmp_path, "gw-alice")
    bob = device(fleet_broker, tmp_path, "gw-bob")
    rogue_root = fleet_broker.pki.root("Rogue Root", name="rogue-root")
    mallory = device(fleet_broker, tmp_path, "gw-mallory", ca=rogue_root)
    for dev in (alice, bob, mallory):
        publish(attacker, p.cert_topic(PREFIX, dev["id"]), dev["cert_msg"])
    good_payload = status_payload("gw-alice", 1)
    good = signed(alice, good_payload)
    publish(attacker, p.status_topic(PREFIX, "gw-alice"), good)
    assert wait_until(lambda: collector.store.device("gw-alice") is not None, 10), \
        collector.ingestor.rejected

    unknown_key = fleet_broker.pki.leaf(fleet_broker.devices_ca, "gw-carol", name="adv-carol")
    bad = {
        # forged: a certificate from another CA
        "untrusted_cert": (p.status_topic(PREFIX, "gw-mallory"),
                           signed(mallory, status_payload("gw-mallory", 1))),
        # Alice's valid key claiming Bob's id, on Bob's topic
        "identity_mismatch": (p.status_topic(PREFIX, "gw-bob"),
                              signed(alice, status_payload("gw-bob", 7))),
        # Alice's own status, published on Bob's topic
        "topic_mismatch": (p.status_topic(PREFIX, "gw-bob"),
                           signed(alice, status_payload("gw-alice", 8))),
        # Alice's key, another status under her stored (boot_id, seq). (A verbatim copy
        # of `good` is a duplicate, below: what an agent's resend looks like.)
        "replay": (p.status_topic(PREFIX, "gw-alice"), signed(alice, p.encode_status(
            dataclasses.replace(p.decode_status(good_payload), mono_s=11.0)))),
        "not_jws": (p.status_topic(PREFIX, "gw-alice"), good[: len(good) // 2].replace(b".", b"")),
        "bad_base64": (p.status_topic(PREFIX, "gw-alice"), b"!!!." + good.split(b".", 1)[1]),
        "not_json": (p.status_topic(PREFIX, "gw-alice"), signed(alice, b"\x00 not json")),
        "bad_schema": (p.status_topic(PREFIX, "gw-alice"),
                       signed(alice, b'{"v":1,"device_id":"gw-alice"}')),
        "oversized": (p.status_topic(PREFIX, "gw-alice"), b"A" * (10 * 1024 * 1024)),
        "unknown_cert": (p.status_topic(PREFIX, "gw-carol"),
                         p.sign_jws(status_payload("gw-carol", 1), unknown_key.key,
                                       unknown_key.cert)),
        # a reserved id: matches the subscription, is no device's topic
        "bad_topic": (f"{PREFIX}/devices/_collector/status", good),
    }
    duplicates = collector.ingestor.duplicates
    for topic, payload in bad.values():
        publish(attacker, topic, payload)
    publish(attacker, p.status_topic(PREFIX, "gw-alice"), good)
    # ... and the collector still ingests good messages afterwards.
    publish(attacker, p.status_topic(PREFIX, "gw-bob"), signed(bob, status_payload("gw-bob", 1)))
    store = collector.store
    expected = set(bad)
    # Mallory's certificate message was refused too: untrusted_cert counts it.
    want = {**{r: 1 for r in expected}, "untrusted_cert": 2}

    ours = ("/gw-alice/", "/gw-bob/", "/gw-mallory/", "/gw-carol/", "/_collector/")

    def counted() -> dict[str, int]:
        # The session broker may hold other stories' retained messages: count ours.
        out: dict[str, int] = {}
        for sample in store.rejection_samples(limit=1000):
            if any(part in sample.topic for part in ours):
                out[sample.reason] = out.get(sample.reason, 0) + 1
        return out

    assert wait_until(lambda: counted() == want and store.device("gw-bob") is not None, 15), \
        counted()
    samples = store.rejection_samples("identity_mismatch")
    assert samples and samples[0].topic == p.status_topic(PREFIX, "gw-bob")
    assert len(samples[0].sample) <= 512
    assert store.seen_count("gw-alice") == 1 and store.seen_count("gw-bob") == 1
    assert wait_until(lambda: collector.ingestor.duplicates >= duplicates + 1, 5)
    assert store.device("gw-mallory") is None
    assert collector.link.is_connected and collector._worker.is_alive()


def test_reject_samples_sets_how_many_rejected_messages_are_kept(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    from conftest import collector_config

    from certmon.mqtt import Incoming
    from collector.wiring import build_collector

    service = build_collector(collector_config(fleet_broker, tmp_path,
                                               **{"ingest.reject_samples": "3"}), web=False)
    try:
        topic = p.status_topic(PREFIX, "gw-noisy")
        service.ingestor.process([Incoming(topic, b"not a jws %d" % i, False, 1)
                                  for i in range(10)])
        assert service.ingestor.rejected["not_jws"] == 10  # every one counted
        kept = service.store.rejection_samples("not_jws")
        assert [s.sample for s in kept] == [b"not a jws 9", b"not a jws 8", b"not a jws 7"]
    finally:
        service.close()
