"""Bytes per device-day at a 5-minute interval: full statuses vs heartbeats, side by side.

Starts a Mosquitto on loopback with the documented certmon config (ACLs, mTLS) and a
generated fleet PKI, then runs two real agents (`agent.service.AgentService`, the code
`certmon-agent run` runs) on the same broker, one per mode, each with the system CA
bundle (/etc/ssl/certs/ca-certificates.crt) plus the fleet root as its trust store:
`agent.heartbeat = false` (every report a full status, as before) and `true`
(`full_every_s` 86400), each hearing a collector beacon before every report (so each
report carries the beacon echo, as in a fleet). A device-day is simulated, not waited
for: the agents' clock is injected and skips `--interval-s` (default 300) after each
report, so one day is 86400 / 300 = 288 reports. A watcher on the operations listener
subscribes to every topic of both devices and counts what crossed the broker as MQTT 5
PUBLISH packets (payload plus an estimate of fixed header, topic, packet id and the
message-expiry property). Printed per mode: messages by kind, the median status and
heartbeat payload, and bytes per device-day of reports (status + heartbeat topics:
what every day costs; goal ≤ 200 KB), beside the same with the side topics (cert,
inventory, online: sent once and on change, so on a first day only).

Run: `.venv/bin/python bench/heartbeat_bytes.py [--interval-s 300] [--reports 288]`
(about 30 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit (bench/README.md)

from kit.broker import Mosquitto, wait_until  # noqa: E402
from kit.brokerconf import BrokerFiles, documented_broker  # noqa: E402
from kit.mqttprobe import MqttProbe  # noqa: E402
from kit.pki import PKIFactory, write_bundle  # noqa: E402

from agent.config import AgentConfig  # noqa: E402
from agent.service import AgentService  # noqa: E402
from certmon import wire as p  # noqa: E402
from certmon.config import loads  # noqa: E402

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
GOAL_BYTES = 200_000


class SkipClock:
    """The real clocks plus the simulated time skipped so far."""

    def __init__(self) -> None:
        self.skipped_s = 0.0

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.skipped_s)

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped_s


def packet_bytes(topic: str, payload: bytes) -> int:
    """An MQTT 5 QoS 1 PUBLISH: 1 + remaining-length bytes, topic (2 + len), packet id
    (2), properties (length 1 + message expiry 5), payload."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + 5 + len(payload)
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3
    return 1 + length_bytes + remaining


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interval-s", type=int, default=300)
    ap.add_argument("--reports", type=int, default=0, help="default: one day's worth")
    args = ap.parse_args()
    reports = args.reports or 86400 // args.interval_s
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = PKIFactory(datetime.now(UTC))
        root = pki.root("heartbeat Fleet Root", name="hb-root")
        devices = pki.intermediate(root, "heartbeat devices", name="hb-devices")
        services = pki.root("heartbeat Operations CA", name="hb-operations")
        broker_ca = pki.root("heartbeat Broker CA", name="hb-broker-ca")
        server = pki.leaf(broker_ca, "localhost", name="hb-server", usage="server",
                          sans=("localhost", "127.0.0.1"))
        server_cert, server_key = server.write(work)
        watcher_cert, watcher_key = pki.leaf(services, "collector", name="hb-col").write(
            work, chain=True)
        fleet_root = write_bundle(work / "fleet-root.pem", [root])
        roots = write_bundle(work / "roots.pem", [root, broker_ca])
        bundle = work / "ca-bundle.pem"
        system = SYSTEM_BUNDLE.read_bytes() if SYSTEM_BUNDLE.exists() else b""
        bundle.write_bytes(system + roots.read_bytes())
        documented = documented_broker(work / "broker-conf", BrokerFiles(
            fleet_ca=fleet_root, operations_ca=write_bundle(work / "ops.pem", [services]),
            certfile=server_cert, keyfile=server_key))
        broker = Mosquitto(work / "broker", documented.listeners,
                           extra_conf=documented.global_conf)
        print(f"trust store: {bundle} ({system.count(b'BEGIN CERTIFICATE')} system CAs "
              f"+ 2 fleet roots); interval {args.interval_s} s; {reports} reports "
              f"= {reports * args.interval_s / 86400:.2f} device-days per mode")
        with broker:
            port, operations_port = broker.ports
            watcher = MqttProbe("hb-watcher", ca_certs=str(roots), certfile=str(watcher_cert),
                                keyfile=str(watcher_key)).connect(operations_port)
            rows = []
            for mode, heartbeat in (("full statuses", "false"), ("heartbeats", "true")):
                device_id = f"gw-bytes-{heartbeat}"
                cert, key = pki.leaf(devices, device_id, name=device_id).write(work, chain=True)
                watcher.subscribe(p.device_topic_filter(p.DEFAULT_PREFIX).replace(
                    "/+/", f"/{device_id}/"))
                clock = SkipClock()
                agent = AgentService(loads(AgentConfig, "", overrides={
                    "mqtt.broker": f"mqtts://127.0.0.1:{port}", "tls.ca_bundle": str(bundle),
                    "tls.cert": str(cert), "tls.key": str(key),
                    "agent.state_dir": str(work / f"state-{heartbeat}"),
                    "agent.interval_s": str(args.interval_s), "agent.heartbeat": heartbeat}),
                    clock=clock, runner=lambda argv: None)
                try:
                    assert agent.connect(10), "agent did not connect"
                    for _ in range(reports):
                        # A collector beacons every 30 s by default: each report
                        # echoes a fresh beacon (the clock upper bound), as in a fleet.
                        heard = agent.uplink.beacon
                        watcher.publish_acked(p.beacon_topic(p.DEFAULT_PREFIX), p.encode_message(
                            p.Beacon(ts=datetime.now(UTC).replace(microsecond=0))))
                        wait_until(lambda: agent.uplink.beacon is not heard, 5)  # noqa: B023
                        agent.report_once()
                        assert agent.wait_delivered(15)
                        clock.skipped_s += args.interval_s
                    prefix = f"{p.DEFAULT_PREFIX}/devices/{device_id}/"
                    wait_until(lambda: len(reported(watcher, prefix)) >= reports, 15)  # noqa: B023
                finally:
                    agent.shutdown()
                by_kind: dict[str, list[int]] = defaultdict(list)
                wire: dict[bool, int] = defaultdict(int)  # is a report (status/heartbeat)
                for topic, payload, _ in list(watcher.messages):
                    if topic.startswith(prefix):
                        kind = topic.rsplit("/", 1)[1]
                        by_kind[kind].append(len(payload))
                        wire[kind in REPORTS] += packet_bytes(topic, payload)
                rows.append((mode, by_kind, wire))
            watcher.close()
        days = reports * args.interval_s / 86400
        print(f"{'mode':<14} {'status':>7} {'beats':>6} {'median status':>14} "
              f"{'median beat':>12} {'reports/day':>12} {'+ side topics':>14}  goal ≤ 200 KB")
        for mode, by_kind, wire in rows:
            st, hb = by_kind.get("status", []), by_kind.get("heartbeat", [])
            per_day = wire[True] / days
            print(f"{mode:<14} {len(st):>7} {len(hb):>6} "
                  f"{statistics.median(st) if st else 0:>12.0f} B "
                  f"{statistics.median(hb) if hb else 0:>10.0f} B "
                  f"{per_day / 1000:>9.1f} KB {(wire[True] + wire[False]) / days / 1000:>11.1f} KB"
                  f"  {'ok' if per_day <= GOAL_BYTES else 'MISSED'}")
        others = {k: sum(v) for k, v in rows[1][1].items() if k not in REPORTS}
        print(f"reports/day: the status and heartbeat topics, what every day costs; side "
              f"topics (payload bytes, sent once and on change, not daily): {others}")
    return 0


REPORTS = ("status", "heartbeat")


def reported(watcher: MqttProbe, prefix: str) -> list[str]:
    return [t for t, _, _ in list(watcher.messages)
            if t.startswith(prefix) and t.rsplit("/", 1)[1] in REPORTS]


if __name__ == "__main__":
    raise SystemExit(main())
