"""A consumer of the collector's fleet topics can tell the collector's words from a
forgery: the signature names the topic, chains to the operations CA and covers every
byte of the payload."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kit.pki import PKIFactory

from certmon.errors import PKIError, ProtocolError
from certmon.fleetsig import SIG_PROPERTY, FleetSigner, verify_fleet

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TOPIC = "certmon/v2/fleet/summary"
PAYLOAD = b'{"counts":{"ok":3},"ts":"2026-12-01T12:00:00Z"}'


@pytest.fixture(scope="module")
def pki() -> PKIFactory:
    return PKIFactory(NOW)


def test_a_summary_signed_by_the_collector_verifies_against_the_operations_ca(pki):
    ops = pki.root("certmon operations CA", key_type="p256")
    collector = pki.leaf(ops, "collector", key_type="p256")
    signer = FleetSigner(collector.key, collector.cert)
    (name, sig), = signer.user_properties(TOPIC, PAYLOAD)
    assert name == SIG_PROPERTY
    assert sig.count(".") == 2 and sig.split(".")[1] == ""  # payload detached
    assert verify_fleet(TOPIC, PAYLOAD, sig, [ops.cert], NOW) == collector.cert


def test_forgeries_and_misuse_are_refused_with_a_reason(pki):
    ops = pki.root("certmon operations CA", key_type="p256")
    fleet = pki.root("certmon fleet CA", key_type="p256")
    collector = pki.leaf(ops, "collector", key_type="p256")
    device_named_collector = pki.leaf(fleet, "collector", key_type="p256",
                                      name="fleet-collector")
    sig = FleetSigner(collector.key, collector.cert).sign(TOPIC, PAYLOAD)

    def reason(*args: object) -> str:
        with pytest.raises(ProtocolError) as err:
            verify_fleet(*args)  # type: ignore[arg-type]
        return err.value.reason

    assert reason(TOPIC, PAYLOAD, None, [ops.cert], NOW) == "unsigned"
    assert reason(TOPIC, PAYLOAD + b" ", sig, [ops.cert], NOW) == "bad_signature"
    assert reason("certmon/v2/alerts", PAYLOAD, sig, [ops.cert], NOW) == "topic_mismatch"
    assert reason(TOPIC, PAYLOAD, "garbage", [ops.cert], NOW) == "not_jws"
    # A fleet-CA device certificate with CN "collector" signs perfectly well, but
    # does not chain to the operations CA.
    forged = FleetSigner(device_named_collector.key, device_named_collector.cert)
    assert reason(TOPIC, PAYLOAD, forged.sign(TOPIC, PAYLOAD), [ops.cert], NOW) == \
        "untrusted_cert"
    # The signer's certificate is judged at the consumer's instant.
    assert reason(TOPIC, PAYLOAD, sig, [ops.cert], NOW + timedelta(days=400)) == \
        "untrusted_cert"


def test_a_key_that_does_not_match_the_certificate_fails_at_start(pki):
    ops = pki.root("certmon operations CA", key_type="p256")
    collector = pki.leaf(ops, "collector", key_type="p256")
    other = pki.leaf(ops, "other", key_type="p256")
    with pytest.raises(PKIError):
        FleetSigner(other.key, collector.cert)
