"""Healthy devices in a process of their own, for load stories that time a collector.

Owns one thing: simulated devices that report every `interval_s` and a watcher that
notes when each of their statuses is in the collector's store — both outside the
collector's process, so neither the publisher's paho thread nor the watcher's store
polling takes the collector's interpreter lock while it is being timed (the collector
then runs as alone as `certmon-collector run` does). It must not judge anything: it
prints what it saw and the test decides.

Protocol (parent ↔ child, one line each): the parent writes a JSON spec to stdin; the
child prints `ready` once every device has a stored status, then keeps reporting until
the parent writes `stop`; it prints one JSON line `{"lags": [...], "unstored": N}` —
publish-to-stored seconds, CLOCK_MONOTONIC in both processes — and exits.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from certmon import wire as p

from .fleet import SimCA, cert_message, make_devices, signed_status

POLL_S = 0.02


def spec_for(*, port: int, db: Path, ca_cert_pem: bytes, ca_key_pem: bytes, count: int,
             interval_s: float, prefix: str = "healthy") -> str:
    """The spec line the parent writes."""
    return json.dumps({"port": port, "db": str(db), "ca_cert": ca_cert_pem.decode(),
                       "ca_key": ca_key_pem.decode(), "count": count,
                       "interval_s": interval_s, "prefix": prefix})


def run(spec: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC)
    ca = SimCA(x509.load_pem_x509_certificate(spec["ca_cert"].encode()),
               load_pem_private_key(spec["ca_key"].encode(), None))  # type: ignore[arg-type]
    devices = make_devices(ca, spec["count"], now, prefix=spec["prefix"])
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{spec['prefix']}-pub",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", spec["port"])
    client.loop_start()
    for d in devices:
        client.publish(p.cert_topic(p.DEFAULT_PREFIX, d.device_id), cert_message(d), qos=1,
                       retain=True).wait_for_publish(10)
    published: dict[tuple[str, int], float] = {}
    stored: dict[tuple[str, int], float] = {}
    stop = threading.Event()

    def report() -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            for d in devices:
                token = signed_status(d, seq, datetime.now(UTC),
                                      interval_s=max(1, round(spec["interval_s"])))
                published[(d.device_id, seq)] = time.monotonic()
                client.publish(p.status_topic(p.DEFAULT_PREFIX, d.device_id), token, qos=1)
            stop.wait(spec["interval_s"])

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    db = sqlite3.connect(f"file:{spec['db']}?mode=ro", uri=True, timeout=5)
    ids = [d.device_id for d in devices]
    marks = ",".join("?" * len(ids))
    ready = False
    deadline = float("inf")
    stdin_done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stdin_done.set()),
                     daemon=True).start()
    while True:
        try:
            rows = db.execute(f"SELECT device_id, seq FROM devices WHERE device_id IN ({marks})",
                              ids).fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            rows = []
        at = time.monotonic()
        for device_id, seq in rows:
            for s in range(1, (seq or 0) + 1):
                stored.setdefault((device_id, s), at)
        if not ready and len({d for d, s in rows if s}) == len(ids):
            ready = True
            print("ready", flush=True)
        if stdin_done.is_set() and not stop.is_set():
            stop.set()
            reporter.join(10)
            deadline = time.monotonic() + 5
        if stop.is_set() and (len(stored) >= len(published) or time.monotonic() > deadline):
            break
        time.sleep(POLL_S)
    client.disconnect()
    client.loop_stop()
    lags = sorted(stored[k] - published[k] for k in published if k in stored)
    return {"lags": lags, "unstored": len(published) - len(lags)}


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    print(json.dumps(run(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
