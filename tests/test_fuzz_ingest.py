"""Hostile bytes straight into the ingest path: whatever arrives, nothing escapes.

The collector's promise (collector/ingest.py): every status message ends as "stored"
or "rejected: <reason>", and no input crashes the pipeline. These tests drive
`Ingestor.process` with a real SQLite store and a `CertCache` that knows three real
device certificates (one with a non-ASCII CN), and feed it, one message at a time:
mutated valid statuses (byte flips, truncation, JWS part swaps, edited headers),
random bytes, huge and deeply nested JSON and wrongly typed fields *signed with a real
device key* (so they get past the signature and reach the decoder), and unicode in
device ids and topics. For each input the sum accepted + rejected + duplicates grows
by exactly one, and no input is counted as `internal_error` (an exception the
pipeline did not expect: a bug, even though it was contained).

`bench/fuzz_ingest.py` runs the same idea as a long seeded campaign (≥ 100 000 cases).
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.fleet import SimDevice, make_ca, make_device, make_devices, status
from kit.mutate import b64url, json_paths

from certmon import wire as p
from certmon.mqtt import Incoming
from collector.admission import Budget
from collector.ingest import Ingestor
from collector.store import Store, open_store
from collector.verify import REASONS, CertCache

PREFIX = p.DEFAULT_PREFIX
# Every reason a rejection may carry; "internal_error" is deliberately not in it.
KNOWN_REASONS = {*REASONS, "oversized"}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class World:
    """One collector's ingest path, a fleet of three known devices, a seq source."""

    store: Store
    ingestor: Ingestor
    devices: list[SimDevice]
    now: datetime
    _seq: Iterator[int]

    def total(self) -> int:
        ing = self.ingestor
        return ing.accepted + sum(ing.rejected.values()) + ing.duplicates

    def token(self, dev: SimDevice, payload: bytes) -> bytes:
        return p.sign_jws(payload, dev.key, dev.cert)

    def fresh_status(self, dev: SimDevice) -> dict[str, Any]:
        return json.loads(p.encode_status(status(dev, next(self._seq), self.now)))

    def fresh_token(self, dev: SimDevice) -> bytes:
        return self.token(dev, p.encode_status(status(dev, next(self._seq), self.now)))

    def feed(self, topic: str, payload: bytes, *, retained: bool = False) -> int:
        """Process one message; return how much accepted+rejected+duplicates grew."""
        before = self.total()
        self.ingestor.process([Incoming(topic, payload, retained, 1)])
        return self.total() - before


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    now = datetime.now(UTC)
    root = make_ca("fuzz fleet root", now)
    devices = [*make_devices(root, 2, now, prefix="fz"),
               make_device(root, "gw-ünïcødé-☃", now, days=90)]
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}")
    store.migrate()
    cache = CertCache([root.cert])
    for dev in devices:
        cache.add([dev.cert, *dev.chain], now)
    # No admission budget: every mutation must reach verification (test_flood.py
    # covers the budget).
    ingestor = Ingestor(store, cache, prefix=PREFIX, now=lambda: datetime.now(UTC),
                        budget=Budget(rate_per_s=1e9, burst=1e9))
    yield World(store, ingestor, devices, now, iter(range(1, 10**9)))
    store.close()


def assert_counted_once(world: World, grew: int) -> None:
    assert grew == 1, (grew, world.ingestor.rejected)
    assert "internal_error" not in world.ingestor.rejected, world.store.rejection_samples(
        "internal_error")
    assert set(world.ingestor.rejected) <= KNOWN_REASONS


def test_an_empty_status_payload_clears_a_retained_topic_and_is_not_counted(
    world: World,
) -> None:
    # A zero-length retained publish is how MQTT deletes a retained message (an
    # operator retiring a device): it is not a status, so no counter moves.
    for retained in (True, False):
        assert world.feed(p.status_topic(PREFIX, "fz-00000"), b"", retained=retained) == 0
    assert "internal_error" not in world.ingestor.rejected


def test_a_valid_status_is_stored_and_each_device_counts_once(world: World) -> None:
    replays, duplicates = world.ingestor.rejected["replay"], world.ingestor.duplicates
    for dev in world.devices:
        before = world.ingestor.accepted
        seq = next(world._seq)
        token = world.token(dev, p.encode_status(status(dev, seq, world.now)))
        assert world.feed(p.status_topic(PREFIX, dev.device_id), token) == 1
        assert world.ingestor.accepted == before + 1
        assert world.store.device(dev.device_id) is not None
        # The same bytes again: a duplicate, live (the agent resending what it could
        # not know the broker had) or retained (on resubscribe).
        assert world.feed(p.status_topic(PREFIX, dev.device_id), token) == 1
        assert world.feed(p.status_topic(PREFIX, dev.device_id), token, retained=True) == 1
        # Other content under the same (boot_id, seq): a replay.
        other = world.token(dev, p.encode_status(status(dev, seq, world.now + timedelta(
            seconds=1))))
        assert world.feed(p.status_topic(PREFIX, dev.device_id), other) == 1
    n = len(world.devices)
    assert world.ingestor.rejected["replay"] == replays + n
    assert world.ingestor.duplicates == duplicates + 2 * n


# --------------------------------------------------------------------------- mutations

def with_header(token: bytes, change: dict[str, Any]) -> bytes:
    header_b64, payload_b64, sig = token.split(b".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + b"=" * (-len(header_b64) % 4)))
    for key, value in change.items():
        if value is DELETE:
            header.pop(key, None)
        else:
            header[key] = value
    return b".".join([b64url(json.dumps(header).encode()), payload_b64, sig])


DELETE = object()
HEADER_VALUES = st.one_of(
    st.just(DELETE), st.none(), st.booleans(), st.integers(), st.text(max_size=60),
    st.sampled_from(["none", "HS256", "ES256", "ES384", "Ed25519", "EdDSA", "PS256", "RS256"]),
    st.lists(st.text(max_size=20), max_size=3),
    st.just("A" * 43), st.just(["MIIB" + "A" * 40]),
)
# Positions are drawn independently of the token's length (which varies with seq), so
# hypothesis replays an example exactly.
POSITION = st.integers(0, 2**20)
HEADER_KEYS = st.sampled_from(["alg", "typ", "x5t#S256", "x5c", "crit", "b64", "kid", "jku"])


@st.composite
def mutated_token(draw: st.DrawFn, world: World) -> bytes:
    dev = draw(st.sampled_from(world.devices))
    token = bytearray(world.fresh_token(dev))
    how = draw(st.sampled_from(["flip", "truncate", "swap", "header", "splice", "dots"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(POSITION) % len(token)
            token[i] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        del token[1 + draw(POSITION) % (len(token) - 1):]  # empty: see the test below
    elif how == "swap":  # a part taken from another device's (or the same) valid token
        other = world.fresh_token(draw(st.sampled_from(world.devices))).split(b".")
        parts = bytes(token).split(b".")
        i = draw(st.integers(0, 2))
        parts[i] = other[draw(st.integers(0, 2))]
        token = bytearray(b".".join(parts))
    elif how == "header":
        changes = draw(st.dictionaries(HEADER_KEYS, HEADER_VALUES, min_size=1, max_size=3))
        token = bytearray(with_header(bytes(token), changes))
    elif how == "splice":  # arbitrary bytes inserted somewhere
        i = draw(POSITION) % (len(token) + 1)
        token[i:i] = draw(st.binary(min_size=1, max_size=64))
    else:  # the structure itself: too many or too few parts
        token = bytearray(bytes(token).replace(b".", draw(st.sampled_from([b"", b"..", b".."
                                                                           b"."])), 1))
    return bytes(token)


@given(data=st.data())
@FUZZ
def test_mutated_valid_messages_are_stored_or_rejected_never_crash(
    world: World, data: st.DataObject
) -> None:
    token = data.draw(mutated_token(world))
    dev_id = data.draw(st.sampled_from([d.device_id for d in world.devices]))
    assert_counted_once(world, world.feed(p.status_topic(PREFIX, dev_id), token))


@given(payload=st.binary(min_size=1, max_size=4096), retained=st.booleans())
@FUZZ
def test_random_bytes_are_rejected_with_a_reason(
    world: World, payload: bytes, retained: bool
) -> None:
    before = world.ingestor.accepted
    assert_counted_once(world, world.feed(p.status_topic(PREFIX, "fz-00000"), payload,
                                          retained=retained))
    assert world.ingestor.accepted == before


# --------------------------------------------------------------------------- signed junk

def nested(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


@given(depth=st.integers(1, 100_000), kind=st.sampled_from(["list", "dict"]),
       wrap=st.booleans())
@FUZZ
def test_deeply_nested_json_signed_by_a_real_device_is_rejected(
    world: World, depth: int, kind: str, wrap: bool
) -> None:
    dev = world.devices[0]
    body = nested(depth, kind)
    if wrap:  # nested inside an otherwise valid status, in an unknown field
        doc = json.dumps(world.fresh_status(dev))
        body = doc[:-1] + ',"extra":' + body + "}"
    assert_counted_once(world, world.feed(p.status_topic(PREFIX, dev.device_id),
                                          world.token(dev, body.encode())))


@given(size=st.integers(1_000, 200_000), where=st.sampled_from(["string", "array", "number"]))
@settings(FUZZ, max_examples=40)
def test_huge_json_signed_by_a_real_device_is_rejected(
    world: World, size: int, where: str
) -> None:
    dev = world.devices[1]
    doc = world.fresh_status(dev)
    doc["agent"]["version"] = {"string": "v" * size, "array": [1] * size,
                               "number": int("9" * min(size, 4000))}[where]
    body = json.dumps(doc).encode()
    grew = world.feed(p.status_topic(PREFIX, dev.device_id), world.token(dev, body))
    assert_counted_once(world, grew)


def replace(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for step in path[:-1]:
        doc = doc[step]
    doc[path[-1]] = value


WRONG_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                         max_size=2),
    st.sampled_from(["", "2026-13-45T99:99:99Z", "1970-01-01T00:00:00Z", "0" * 64, "Z" * 64,
                     "fleet", "_collector", "a/b", "+", "#", "\x00", "\ud7ff" * 3]),
)


@given(data=st.data())
@FUZZ
def test_wrong_types_in_every_field_of_a_signed_status_are_rejected_or_stored(
    world: World, data: st.DataObject
) -> None:
    dev = data.draw(st.sampled_from(world.devices))
    doc = world.fresh_status(dev)
    path = data.draw(st.sampled_from(list(json_paths(doc))))
    replace(doc, path, data.draw(WRONG_VALUES))
    body = json.dumps(doc, ensure_ascii=data.draw(st.booleans())).encode()
    assert_counted_once(world, world.feed(p.status_topic(PREFIX, dev.device_id),
                                          world.token(dev, body)))


def test_every_field_of_a_status_is_type_checked(world: World) -> None:
    """Deterministic sweep: each path of a healthy status, set to a string and to
    null, signed; a wrong type is rejected as bad_schema, a nullable field accepted."""
    dev = world.devices[0]
    template = world.fresh_status(dev)
    for path in list(json_paths(template)):
        for value in ("x", None, [], {}):
            doc = world.fresh_status(dev)
            replace(doc, path, value)
            before = dict(world.ingestor.rejected)
            grew = world.feed(p.status_topic(PREFIX, dev.device_id),
                              world.token(dev, json.dumps(doc).encode()))
            assert_counted_once(world, grew)
            new = {r for r, n in world.ingestor.rejected.items() if n > before.get(r, 0)}
            assert new <= {"bad_schema", "unknown_version", "identity_mismatch",
                           "topic_mismatch"}, (path, value, new)


# --------------------------------------------------------------------------- unicode

@given(device_id=st.text(min_size=1, max_size=80), signer=st.integers(0, 2),
       kind=st.sampled_from(["status", "cert", "online", "inventory", "nope", ""]))
@FUZZ
def test_unicode_device_ids_and_topics_never_crash(
    world: World, device_id: str, signer: int, kind: str
) -> None:
    dev = world.devices[signer]
    doc = world.fresh_status(dev)
    doc["device_id"] = device_id
    token = world.token(dev, json.dumps(doc, ensure_ascii=False).encode())
    # Raw, not the builders (they refuse bad ids): the layout of docs/protocol.md.
    topic = f"{PREFIX}/devices/{device_id}/{kind}" if kind else f"{PREFIX}/devices/{device_id}"
    grew = world.feed(topic, token)
    is_device_status = p.parse_device_topic(PREFIX, topic) is not None and kind == "status"
    # A status (or anything on a non-device topic) is counted once. Cert, online and
    # inventory topics that hold a message of the wrong kind are counted once too;
    # a well-formed message of those kinds is not a status and moves no counter.
    assert grew == 1 or (not is_device_status and grew == 0), (topic, grew)
    assert "internal_error" not in world.ingestor.rejected
    if device_id != dev.device_id:
        assert world.store.device(device_id) is None or device_id in {
            d.device_id for d in world.devices}


def test_the_unicode_device_is_stored_under_its_own_id(world: World) -> None:
    dev = world.devices[2]
    assert world.feed(p.status_topic(PREFIX, dev.device_id), world.fresh_token(dev)) == 1
    row = world.store.device(dev.device_id)
    assert row is not None and row.device_id == "gw-ünïcødé-☃"


def test_a_mixed_batch_counts_every_message_once(world: World) -> None:
    """A batch (one store transaction) of good and bad messages: each counted once,
    the good ones stored, however they are interleaved."""
    rng = random.Random(7)
    batch: list[Incoming] = []
    good = 0
    for i in range(200):
        dev = world.devices[i % 3]
        token = world.fresh_token(dev)
        if i % 3 == 0:
            good += 1
        else:
            pos = rng.randrange(len(token))
            token = token[:pos] + bytes([token[pos] ^ 0x41]) + token[pos + 1:]
        batch.append(Incoming(p.status_topic(PREFIX, dev.device_id), token, False, 1))
    before_total, before_ok = world.total(), world.ingestor.accepted
    world.ingestor.process(batch)
    assert world.total() - before_total == len(batch)
    assert world.ingestor.accepted - before_ok == good  # every flipped byte is signed
    assert "internal_error" not in world.ingestor.rejected
    assert world.store.integrity_check()
