"""Heartbeats (`agent.heartbeat`, issue 14): a compact signed message while nothing but
time and counters changed, a full status on any change and every `full_every_s`.

Real parts: the fleet Mosquitto over mTLS, the real agent (`AgentService`, its clock
injected so that "an hour later" is a skip, not a sleep) and real collectors built by
`collector.wiring.build_collector` on SQLite. What must hold: the collector refreshes
liveness, sequence and clock offset from heartbeats without rewriting the status; a
new collector with an empty store learns the full state from the retained status and
accepts the heartbeats after it; a replayed heartbeat changes nothing; a heartbeat
naming a status the collector never saw is counted, never stored.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import statistics
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
from conftest import DeviceCreds, Fleet, collector_config
from kit.broker import wait_until
from kit.mqttprobe import MqttProbe

from agent.config import AgentConfig
from agent.service import AgentService, CycleResult
from certmon import wire as p
from certmon.config import loads
from certmon.errors import ProtocolError
from collector.service import CollectorService, Periodic
from collector.wiring import build_collector


class SkipClock:
    """The real clocks, plus what the test skips ahead (`skip`) or shifts the wall by."""

    def __init__(self) -> None:
        self.skipped_s = 0.0
        self.wall_shift = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.wall_shift + timedelta(seconds=self.skipped_s)

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped_s

    def skip(self, seconds: float) -> None:
        self.skipped_s += seconds


def agent(creds: DeviceCreds, port: int, state: Path, clock: SkipClock,
          **settings: str) -> AgentService:
    config = loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{port}", "tls.ca_bundle": str(creds.ca_bundle_path),
        "tls.cert": str(creds.cert_path), "tls.key": str(creds.key_path),
        "agent.state_dir": str(state), "agent.interval_s": "60", **settings})
    return AgentService(config, clock=clock, runner=lambda argv: None)


def report(a: AgentService) -> CycleResult:
    result = a.report_once()
    assert a.wait_delivered(15), a.link.state.last_error if a.link else "no link"
    return result


def clear_retained(fleet: Fleet, creds: DeviceCreds) -> None:
    """Empty the device's retained topics: the fleet broker is shared by the whole
    session, and a later test's collector must not meet these statuses."""
    probe = MqttProbe(f"clear-{creds.device_id}", ca_certs=str(creds.ca_bundle_path),
                      certfile=str(creds.cert_path), keyfile=str(creds.key_path))
    probe.connect(fleet.mtls_port)
    try:
        for kind in p.TopicKind:
            probe.publish_acked(p.device_topic(p.DEFAULT_PREFIX, creds.device_id, kind), b"",
                                retain=True)
    finally:
        probe.close()


def row_seq(c: CollectorService, device_id: str) -> int | None:
    row = c.store.device(device_id)
    return row.seq if row is not None and row.status_json else None


def test_heartbeats_stand_for_an_unchanged_status(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("gw-beat", tmp_path / "d", days=365)
    clock = SkipClock()
    a = agent(creds, fleet_broker.mtls_port, tmp_path / "s", clock,
              **{"agent.heartbeat": "true", "agent.full_every_s": "3600"})
    second: CollectorService | None = None
    try:
        assert a.connect(10)
        first = report(a)
        assert first.heartbeat is None  # nothing to stand for yet
        assert wait_until(lambda: row_seq(collector, "gw-beat") == first.status.seq, 15), \
            collector.ingestor.rejected
        stored = collector.store.device("gw-beat")
        assert stored is not None
        history = len(collector.store.history("gw-beat"))

        # Unchanged: heartbeats, each small, naming the stored status; the device
        # clock is shifted 2 minutes so the offset the collector samples is theirs.
        clock.wall_shift = timedelta(seconds=120)
        # A collector beacon heard now (as the uplink records one): the upper bound.
        a.uplink.beacon = p.BeaconEcho(beacon_ts=datetime.now(UTC).replace(microsecond=0),
                                       received_mono_s=clock.monotonic())
        beats = [report(a) for _ in range(5)]
        assert all(b.heartbeat is not None for b in beats)
        assert {b.heartbeat.status_digest for b in beats if b.heartbeat} == {
            p.status_digest(stored.status_json.encode())}  # type: ignore[union-attr]
        sizes = [len(b.token) for b in beats]
        assert statistics.median(sizes) <= 600, sizes
        assert wait_until(lambda: row_seq(collector, "gw-beat") == beats[-1].status.seq, 15), \
            collector.ingestor.rejected
        row = collector.store.device("gw-beat")
        assert row is not None and row.status_json == stored.status_json
        assert row.last_received_at and stored.last_received_at
        assert row.last_received_at >= stored.last_received_at
        assert row.clock_offset_lo_s is not None and 100 < row.clock_offset_lo_s < 125
        # The upper bound from the beacon echo: the shift, plus at most the test's pace.
        assert beats[-1].heartbeat is not None and beats[-1].heartbeat.beacon_ts is not None
        assert row.clock_offset_hi_s is not None and 115 < row.clock_offset_hi_s < 140
        assert len(collector.store.history("gw-beat")) == history  # no change, no alert
        # Nothing of this device was rejected (the session broker also holds other
        # stories' retained messages, which are not this test's business).
        assert [r for r in collector.store.rejection_samples(limit=500)
                if "/gw-beat/" in r.topic] == []
        clock.wall_shift = timedelta()

        # A replayed heartbeat (the broker's ACL lets only the device write its
        # topics: replayed here over the device's own session) changes nothing.
        refused = collector.ingestor.duplicates + collector.ingestor.rejected["replay"]
        assert a.link is not None
        a.link.publish(p.heartbeat_topic(a.prefix, "gw-beat"), beats[1].token, qos=1)
        assert wait_until(lambda: collector.ingestor.duplicates
                          + collector.ingestor.rejected["replay"] > refused, 15)
        assert row_seq(collector, "gw-beat") == beats[-1].status.seq

        # A change (a renewed certificate) is a full status at once.
        renewed = fleet_broker.device_credentials("gw-beat", tmp_path / "d2", days=300,
                                                  name="gw-beat-renewed")
        creds.cert_path.write_bytes(renewed.cert_path.read_bytes())
        creds.key_path.write_bytes(renewed.key_path.read_bytes())
        changed = report(a)
        assert changed.heartbeat is None
        # The renewed pair means a new session (a full status on it), then heartbeats.
        assert any(report(a).heartbeat is not None for _ in range(3))

        # full_every_s: an hour later the status goes out in full although unchanged
        # (on the same session: it is the age that made it full).
        assert a.link is not None
        connects = a.link.state.connects
        clock.skip(3600)
        due = report(a)
        assert due.heartbeat is None
        assert a.link.state.connects == connects
        assert wait_until(lambda: row_seq(collector, "gw-beat") == due.status.seq, 15)

        # A new collector with an empty store learns the full state from the retained
        # status and then accepts the device's heartbeats.
        second = build_collector(
            collector_config(fleet_broker, tmp_path / "second",
                             **{"mqtt.client_id": "collector-second"}),
            web=False, periodic=Periodic(beacon_every_s=3600, silence_every_s=3600,
                                         summary_every_s=3600))
        second.start()
        assert second.link.wait_connected(10)
        assert wait_until(lambda: row_seq(second, "gw-beat") == due.status.seq, 15), \
            second.ingestor.rejected
        beat = report(a)
        assert beat.heartbeat is not None
        assert wait_until(lambda: row_seq(second, "gw-beat") == beat.status.seq, 15), \
            second.ingestor.rejected
        assert "heartbeat_unknown_status" not in second.ingestor.rejected
        # A collector that did not verify the full status itself (a share group handed
        # it to another member; here: its memory emptied) finds it in the store.
        collector.ingestor._full.clear()
        again = report(a)
        assert again.heartbeat is not None
        assert wait_until(lambda: row_seq(collector, "gw-beat") == again.status.seq, 15), \
            collector.ingestor.rejected
        assert "heartbeat_unknown_status" not in collector.ingestor.rejected

        # A heartbeat naming a status no collector has seen is counted, not stored.
        assert a._last_full is not None
        a._last_full = type(a._last_full)("A" * 43, a._last_full.essence,
                                          a._last_full.at_mono_s, a._last_full.connects)
        stray = report(a)
        assert stray.heartbeat is not None
        assert wait_until(lambda: collector.ingestor.rejected["heartbeat_unknown_status"] == 1,
                          15), collector.ingestor.rejected
        assert row_seq(collector, "gw-beat") == again.status.seq
    finally:
        a.shutdown()
        if second is not None:
            second.close()
        clear_retained(fleet_broker, creds)


def test_heartbeats_are_off_by_default(fleet_broker: Fleet, tmp_path: Path) -> None:
    creds = fleet_broker.device_credentials("gw-plain", tmp_path / "d", days=365)
    a = agent(creds, fleet_broker.mtls_port, tmp_path / "s", SkipClock())
    try:
        assert a.connect(10)
        results = [report(a) for _ in range(3)]
        assert [r.heartbeat for r in results] == [None, None, None]
    finally:
        a.shutdown()
        clear_retained(fleet_broker, creds)


def test_heartbeat_wire_round_trip() -> None:
    beat = p.Heartbeat(device_id="gw-1", boot_id="b-1", seq=7,
                       ts=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), interval_s=300,
                       status_digest=p.status_digest(b"{}"),
                       beacon_ts=datetime(2026, 1, 2, 3, 4, 0, tzinfo=UTC), beacon_age_s=2.5)
    assert p.decode_heartbeat(p.encode_message(beat)) == beat
    bare = replace(beat, beacon_ts=None, beacon_age_s=None)
    assert b"beacon" not in p.encode_message(bare)
    with pytest.raises(ProtocolError, match="go together"):
        p.decode_heartbeat(p.encode_message(replace(beat, beacon_age_s=None)))
    assert p.parse_device_topic(p.DEFAULT_PREFIX, p.heartbeat_topic(p.DEFAULT_PREFIX, "gw-1")) \
        == ("gw-1", p.TopicKind.HEARTBEAT)


GOLDEN = Path(__file__).parent / "data" / "golden" / "heartbeat-v1.json"


def test_heartbeat_golden_bytes_and_schema() -> None:
    beat = p.Heartbeat(device_id="gw-golden", boot_id="9b0e6c1e-boot", seq=42,
                       ts=datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC), interval_s=300,
                       status_digest=p.status_digest(b'{"v":1}'),
                       beacon_ts=datetime(2026, 3, 1, 11, 59, 30, tzinfo=UTC),
                       beacon_age_s=29.5)
    data = p.encode_message(beat)
    if os.environ.get("CERTMON_UPDATE_GOLDEN") == "1":
        GOLDEN.write_bytes(data)
    assert data == GOLDEN.read_bytes()
    text = importlib.resources.files("certmon").joinpath("schemas/heartbeat-v1.json").read_text()
    validator = jsonschema.Draft202012Validator(json.loads(text))
    validator.validate(json.loads(data))
    validator.validate(json.loads(p.encode_message(replace(beat, beacon_ts=None,
                                                           beacon_age_s=None))))
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**json.loads(data), "status_digest": "a" * 64})  # hex: refused
