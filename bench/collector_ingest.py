"""Collector ingest throughput through a real Mosquitto: verified-and-stored msgs/s.

Builds a fleet CA and N simulated devices (real P-256 keys and certificates), pre-signs
S statuses per device, starts one mosquitto on loopback (a plain listener for the
publisher, an mTLS listener for the collector), then measures:

1. the ceiling: a bare paho subscriber that only counts the same status messages;
2. one collector (in this process) on SQLite: every status verified (JWS signature,
   chain to the fleet CA, identity, topic) and stored (replay-checked, one
   transaction per batch);
3. the same on PostgreSQL at 127.0.0.1:5432 (database `test`, a throw-away schema).

Both are measured the same way, as a drain: the subscriber has a persistent MQTT v5
session, is offline while the publisher sends everything (Mosquitto queues it), then
connects and takes the backlog; the rate is messages / (connect → last one handled).
That keeps the publisher's CPU out of the measurement on this 2-core machine: the
figure is what the consumer can do, which is the question.
Run: `.venv/bin/python bench/collector_ingest.py [--devices 10000] [--per-device 3]`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit (bench/README.md)

import paho.mqtt.client as mqtt  # noqa: E402
from fleetsim import bench_fleet  # noqa: E402
from kit.broker import wait_until  # noqa: E402
from kit.fleet import cert_message, signed_status  # noqa: E402

from certmon import wire as p  # noqa: E402
from certmon.config import loads  # noqa: E402
from collector.config import CollectorConfig  # noqa: E402
from collector.wiring import build_collector  # noqa: E402


def publish_all(port: int, messages: Sequence[tuple[str, bytes]], ready: mp.Event,
                go: mp.Event) -> None:
    """Child process: publish QoS 1 as fast as the broker takes it, wait for PUBACKs."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    ready.set()
    go.wait()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def run_publisher(port: int, messages: Sequence[tuple[str, bytes]]) -> tuple[mp.Process, float]:
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=publish_all, args=(port, messages, ready, go))
    proc.start()
    ready.wait(30)
    start = time.perf_counter()
    go.set()
    return proc, start


def _session(port: int, client_id: str, *, tls: dict[str, str] | None = None) -> None:
    """Create a persistent session with the status/cert subscriptions, then leave."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    if tls:
        client.tls_set(ca_certs=tls["ca"], certfile=tls["cert"], keyfile=tls["key"])
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_start()
    for topic in (p.device_topic_filter(p.DEFAULT_PREFIX, p.TopicKind.STATUS),
                  p.device_topic_filter(p.DEFAULT_PREFIX, p.TopicKind.CERT)):
        client.subscribe(topic, qos=1)
    time.sleep(0.5)  # SUBACKs; a bench, not a test
    client.disconnect()
    client.loop_stop()


def publish_and_wait(port: int, messages: Sequence[tuple[str, bytes]]) -> None:
    proc, _ = run_publisher(port, messages)
    proc.join(600)


def bare_subscriber_rate(port: int, pub_port: int, creds: dict[str, Path],
                         messages: Sequence[tuple[str, bytes]]) -> float:
    """A paho subscriber on the collector's own listener (mTLS, same certificate) that
    only counts: the most any Python MQTT consumer can take here."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    tls = {k: str(v) for k, v in creds.items()}
    _session(port, "bare-sub", tls=tls)
    publish_and_wait(pub_port, messages)
    count = 0
    last = 0.0

    def on_message(_c: object, _u: object, _m: object) -> None:
        nonlocal count, last
        last = time.perf_counter()
        count += 1

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bare-sub", protocol=mqtt.MQTTv5)
    sub.tls_set(ca_certs=tls["ca"], certfile=tls["cert"], keyfile=tls["key"])
    sub.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    start = time.perf_counter()
    sub.connect("127.0.0.1", port, clean_start=False, properties=props)
    sub.loop_start()
    wait_until(lambda: count >= len(messages), 300)
    sub.disconnect()
    sub.loop_stop()
    return count / (last - start)


def collector_rate(mtls_port: int, plain_port: int, creds: dict[str, Path], url: str,
                   certs: Sequence[tuple[str, bytes]], statuses: Sequence[tuple[str, bytes]],
                   workers: int) -> tuple[float, dict[str, int]]:
    client_id = f"bench-collector-{uuid.uuid4().hex[:6]}"
    config = loads(CollectorConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{mtls_port}", "tls.ca_bundle": str(creds["ca"]),
        "tls.cert": str(creds["cert"]), "tls.key": str(creds["key"]),
        "tls.fleet_ca": str(creds["fleet_ca"]), "store.url": url, "mqtt.client_id": client_id,
        "ingest.verify_workers": str(workers)})
    _session(mtls_port, client_id, tls={k: str(v) for k, v in creds.items()})
    publish_and_wait(plain_port, [*certs, *statuses])
    # As `certmon-collector run` wires it (alert driver included), without the web face.
    service = build_collector(config, web=False)
    service.start()
    # The cert messages come first in the backlog (once per device, retained, rare in
    # steady state); the clock starts when the collector knows every certificate.
    wait_until(lambda: len(service.ingestor.certs) >= len(certs), 600, step_s=0.001)
    start = time.perf_counter()
    total = len(statuses)
    ok = wait_until(lambda: service.ingestor.accepted >= total, 600)
    elapsed = time.perf_counter() - start
    rejected = dict(service.ingestor.rejected)
    accepted = service.ingestor.accepted
    service.close()
    if not ok:
        print(f"  incomplete: {accepted} of {total}")
    return accepted / elapsed, rejected


def measure(backend: str, workers: int, work: Path, pg: str, mtls: int, plain: int,
            creds: dict[str, Path], certs: Sequence[tuple[str, bytes]],
            statuses: Sequence[tuple[str, bytes]], ceiling: float) -> None:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    if backend == "sqlite":
        url = f"sqlite:///{work / f'bench-{schema}.db'}"
    else:
        url = f"{pg}?options=-csearch_path%3D{schema}"
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    try:
        rate, rejected = collector_rate(mtls, plain, creds, url, certs, statuses, workers)
    finally:
        if backend != "sqlite":
            with psycopg.connect(pg, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(f"collector on {backend:10} verify_workers={workers}: {rate:7.0f} verified+stored "
          f"msgs/s ({rate / ceiling:.0%} of the ceiling; rejected: {rejected or 'none'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--per-device", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--workers", default="0,1",
                        help="verify_workers settings to measure (0: in-process)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with bench_fleet("bench", args.devices) as (site, devices):
        work, now = site.work, site.now
        certs = [(p.cert_topic(p.DEFAULT_PREFIX, d.device_id), cert_message(d)) for d in devices]
        t1 = time.perf_counter()
        statuses = [(p.status_topic(p.DEFAULT_PREFIX, d.device_id), signed_status(d, s, now))
                    for s in range(1, args.per_device + 1) for d in devices]
        t2 = time.perf_counter()
        print(f"fleet: {args.devices} devices ({t1 - t0:.1f} s to issue), {len(statuses)} "
              f"signed statuses ({t2 - t1:.1f} s to sign, {len(statuses[0][1])} bytes each)")
        creds = {"ca": site.ca_bundle, "cert": site.collector_cert, "key": site.collector_key,
                 "fleet_ca": site.fleet_ca}
        broker = site.broker
        with broker:
            plain, mtls = site.plain_port, site.collector_port
            ceiling = bare_subscriber_rate(mtls, plain, creds, [*certs, *statuses])
            print(f"bare paho subscriber (ceiling) : {ceiling:9.0f} msgs/s")
            for backend in args.backends.split(","):
                for workers in (int(w) for w in args.workers.split(",")):
                    measure(backend, workers, work, args.pg, mtls, plain, creds, certs,
                            statuses, ceiling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
