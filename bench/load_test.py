"""Load test: a paced fleet against one collector on SQLite, through a real Mosquitto.

N simulated devices (real P-256 keys and certificates, tests/kit/fleet.py) each publish
one signed status per interval, spread evenly over the interval, for M minutes; one
collector runs as a real subprocess (`python -m collector.cli run`, SQLite in WAL) on
the broker's mTLS listener. The publisher (a child process, on the plain listener)
signs each status just before publishing it and records the publish instant per
(device, seq). Afterwards:

- publish→stored lag per status: the device row's `last_received_at` (the status's
  arrival at the collector; read while the run goes on, as each status becomes the
  device's current one) minus the publish instant — p50, p90, p99, max;
- completeness: every published (device, seq) is in the store, none twice;
- rejections: none (every message is valid);
- the collector's RSS and CPU over time (psutil, every --sample-s seconds).

Defaults are the brief's: 10 000 devices, 60 s interval, 10 minutes. Smoke:
`.venv/bin/python bench/load_test.py --devices 2000 --minutes 1`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit (bench/README.md)

import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402
from fleetsim import bench_fleet  # noqa: E402
from kit.broker import Mosquitto, wait_until  # noqa: E402
from kit.fleet import SimDevice, cert_message, signed_status  # noqa: E402

from certmon import wire as p  # noqa: E402


def publisher(port: int, devices: list[SimDevice], interval_s: float, rounds: int,
              record: Path, ready: mp.Event, go: mp.Event) -> None:
    """Child process: cert messages first, then each device once per interval, spread
    evenly (device i at i × interval / N within each round), signed at publish time."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"load-pub-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(p.cert_topic(p.DEFAULT_PREFIX, d.device_id), cert_message(d),
                            qos=1, retain=True) for d in devices]
    for info in infos:
        info.wait_for_publish(120)
    ready.set()
    go.wait()
    n = len(devices)
    published: list[tuple[str, int, float]] = []
    behind_max_s = 0.0
    start = time.monotonic()
    pending = []
    for k in range(rounds):
        for i, dev in enumerate(devices):
            due = start + k * interval_s + i * interval_s / n
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                behind_max_s = max(behind_max_s, -delay)
            seq = k + 1
            token = signed_status(dev, seq, datetime.now(UTC), interval_s=int(interval_s))
            pending.append(client.publish(p.status_topic(p.DEFAULT_PREFIX, dev.device_id), token,
                                          qos=1, retain=True))
            published.append((dev.device_id, seq, time.time()))
            if len(pending) > 5000:
                pending = [i for i in pending if not i.is_published()]
    for info in pending:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()
    record.write_text(json.dumps({"published": published, "behind_max_s": behind_max_s}))


class StoredWatch:
    """Which (device, seq) the store made current, and when the collector received it.

    The replay guard keeps no row per status (docs/store.md, "Replay guard"), so the
    device rows are read while the test runs: each holds its newest status's seq and
    exact `last_received_at`, and a device reports once per interval — far longer
    than the poll period — so every status is seen as current at least once."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.seen: dict[tuple[str, int], float] = {}  # → arrival at the collector
        self.observed: dict[tuple[str, int], float] = {}  # → first poll that saw it stored

    def poll(self) -> int:
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as conn:
                rows = conn.execute("SELECT device_id, seq, last_received_at FROM devices "
                                    "WHERE seq IS NOT NULL").fetchall()
        except sqlite3.Error:
            return len(self.seen)
        polled_at = time.time()
        for device_id, seq, received_at in rows:
            key = (device_id, int(seq))
            if key not in self.seen and received_at:
                self.observed[key] = polled_at
                self.seen[key] = datetime.fromisoformat(
                    received_at.replace("Z", "+00:00")).timestamp()
        return len(self.seen)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--interval-s", type=float, default=60.0)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    parser.add_argument("--keep", type=Path, default=None, help="copy the database here")
    args = parser.parse_args()
    rounds = max(1, round(args.minutes * 60 / args.interval_s))
    t0 = time.perf_counter()
    with bench_fleet("load", args.devices) as (site, devices):
        work = site.work
        print(f"fleet: {args.devices} devices issued in {time.perf_counter() - t0:.1f} s; "
              f"{rounds} round(s) of {args.interval_s:g} s = "
              f"{args.devices / args.interval_s:.0f} statuses/s for {args.minutes:g} min",
              flush=True)
        broker = site.broker
        db = work / "load.db"
        with broker:
            plain, mtls = site.plain_port, site.collector_port
            log_path = work / "collector.log"
            with log_path.open("wb") as log:
                collector = subprocess.Popen(
                    [sys.executable, "-m", "collector.cli", "run",
                     "--broker", f"mqtts://127.0.0.1:{mtls}", "--ca-bundle", str(site.ca_bundle),
                     "--cert", str(site.collector_cert), "--key", str(site.collector_key),
                     "--fleet-ca", str(site.fleet_ca), "--db", f"sqlite:///{db}",
                     "--client-id", "load-collector", "--listen", "127.0.0.1:0"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                return run(args, rounds, broker, plain, collector, devices, work, db, log_path)
            finally:
                if collector.poll() is None:
                    collector.send_signal(signal.SIGTERM)
                    try:
                        collector.wait(30)
                    except subprocess.TimeoutExpired:
                        collector.kill()
                        collector.wait()
                if args.keep:
                    args.keep.write_bytes(db.read_bytes())


def run(args: argparse.Namespace, rounds: int, broker: Mosquitto, plain: int,
        collector: subprocess.Popen[bytes], devices: list[SimDevice], work: Path, db: Path,
        log_path: Path) -> int:
    # The collector subscribes on connect (four filters); wait for them before sending.
    if not wait_until(lambda: broker.log_text().count("Received SUBSCRIBE from load-collector")
                      >= 4 or collector.poll() is not None, 60, step_s=0.1):
        print("collector did not subscribe:\n" + log_path.read_text())
        return 1
    proc = psutil.Process(collector.pid)
    proc.cpu_percent()
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    record = work / "published.json"
    pub = ctx.Process(target=publisher, args=(plain, devices, args.interval_s, rounds, record,
                                              ready, go))
    pub.start()
    if not ready.wait(300):
        print("publisher never became ready")
        return 1
    # Warm-up: the collector verifies every device's certificate once (the retained
    # cert topics); the measurement starts when it has gone idle again.
    busy_until = time.monotonic() + 120
    while time.monotonic() < busy_until and proc.cpu_percent(interval=1.0) > 10:
        pass
    expected = rounds * len(devices)
    watch = StoredWatch(db)
    samples: list[tuple[float, int, float, int]] = []  # (t, rss, cpu%, stored)
    start = time.monotonic()
    go.set()
    next_sample = start
    while (count := watch.poll()) < expected or pub.is_alive():
        if collector.poll() is not None:
            print("collector exited:\n" + log_path.read_text()[-3000:])
            return 1
        if time.monotonic() >= next_sample:
            samples.append((time.monotonic() - start, proc.memory_info().rss,
                            proc.cpu_percent(), count))
            next_sample += args.sample_s
        if not pub.is_alive() and time.monotonic() - start > args.minutes * 60 + 120:
            break  # two minutes past the end: whatever is missing is missing
        time.sleep(0.2)
    pub.join()
    samples.append((time.monotonic() - start, proc.memory_info().rss, proc.cpu_percent(),
                    watch.poll()))
    data = json.loads(record.read_text())
    published = {(d, s): t for d, s, t in data["published"]}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rejections = dict(conn.execute("SELECT reason, count FROM rejections").fetchall())
    watch.poll()
    stored = watch.seen
    # Stored twice cannot happen by construction (the replay window admits each
    # (boot, seq) once); a second copy would show as a `replay` rejection here.
    duplicates = rejections.get("replay", 0)
    lags = [stored[k] - t for k, t in published.items() if k in stored]
    # An upper bound on publish→stored: the poll that first saw it (every 0.2 s).
    stored_lags = [watch.observed[k] - t for k, t in published.items() if k in stored]
    missing = [k for k in published if k not in stored]
    report(args, expected, published, stored, missing, duplicates, rejections, lags, samples,
           data["behind_max_s"], stored_lags)
    ok = not missing and not rejections and not duplicates and len(published) == expected
    return 0 if ok else 1


def report(args: argparse.Namespace, expected: int, published: dict[tuple[str, int], float],
           stored: dict[tuple[str, int], float], missing: list[tuple[str, int]], duplicates: int,
           rejections: dict[str, int], lags: list[float],
           samples: list[tuple[float, int, float, int]], behind_max_s: float,
           stored_lags: list[float]) -> None:
    mib = 1024 * 1024
    print(f"\nload test: {args.devices} devices × 1 status / {args.interval_s:g} s × "
          f"{args.minutes:g} min, one collector on SQLite (cores: {os.cpu_count()})")
    print(f"  published  {len(published):>9} of {expected} (publisher at most "
          f"{behind_max_s * 1000:.0f} ms behind schedule)")
    print(f"  stored     {len(stored):>9}   missing {len(missing)}   stored twice {duplicates}")
    print(f"  rejected   {sum(rejections.values()):>9}   {rejections or ''}")
    for label, values in (("lag publish→received", lags),
                          ("lag publish→stored (≤, polled every 0.2 s)", stored_lags)):
        if values:
            print(f"  {label}: p50 {percentile(values, 0.5) * 1000:.0f} ms   "
                  f"p90 {percentile(values, 0.9) * 1000:.0f} ms   "
                  f"p99 {percentile(values, 0.99) * 1000:.0f} ms   "
                  f"max {max(values) * 1000:.0f} ms   "
                  f"mean {statistics.fmean(values) * 1000:.0f} ms")
    print("\n  collector over time")
    print(f"  {'t (s)':>7}  {'RSS (MiB)':>9}  {'CPU %':>6}  {'stored':>9}")
    step = max(1, len(samples) // 24)
    for t, rss, cpu, count in [*samples[::step], samples[-1]]:
        print(f"  {t:7.0f}  {rss / mib:9.1f}  {cpu:6.1f}  {count:9}")
    rss = [s[1] for s in samples]
    print(f"\n  RSS min {min(rss) / mib:.1f} MiB, max {max(rss) / mib:.1f} MiB, "
          f"end {rss[-1] / mib:.1f} MiB; CPU mean "
          f"{statistics.fmean(s[2] for s in samples):.1f} % of one core")
    if missing:
        print(f"  first missing: {missing[:5]}")


if __name__ == "__main__":
    sys.exit(main())
