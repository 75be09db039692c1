"""The store goes away under load and comes back: the collector holds on (issue 19).

The operator's story: a collector on PostgreSQL ingests a fleet that reports every
2 s when the database is restarted (`pg_ctl stop -m fast`, down for OUTAGE_S, start).
Devices keep reporting; what they publish meanwhile is far more than Mosquitto's
in-flight window (`max_inflight_messages 20`, its default), so the broker stops
sending once the collector holds 20 unacknowledged messages and queues the rest for
its session. Our own PostgreSQL (tests/kit/postgres.py, a free loopback port; the
machine's server is not touched), a real Mosquitto, a collector built by
`collector.wiring.build_collector`, statuses signed with real device keys.

What must hold afterwards: every status published is stored exactly once, in order per
device (by arrival), and the device rows show the newest; nothing is rejected; no
alive device was declared offline (no DEVICE_OFFLINE, no "silence" history) although
the outage is longer than their offline threshold (3 × 2 s); a device that really
went silent before the outage is declared offline after the store is back, at most the
outage's length late; `certmon_collector_store_up` said 0 during the outage and 1
after; /api/health and the outage record (`report`) tell the story. The figures are
printed (run with -s) for docs/reliability.md.

A second test does the same with SQLite on a full disk (a small tmpfs), freed again.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import Fleet, collector_config, missing
from kit.broker import Listener, Mosquitto, wait_until
from kit.fleet import SimCA, SimDevice, cert_message, make_devices, signed_status
from kit.postgres import PostgresServer, find_pg_bin
from prometheus_client.parser import text_string_to_metric_families

from certmon import wire as p
from collector.cli import build_report, render_report
from collector.service import CollectorService, Periodic
from collector.store import Store, StoreError, open_store
from collector.wiring import build_collector

DEVICES = 30
INTERVAL_S = 2
FACTOR = 3  # ingest.offline_after_intervals: offline after 6 s of silence
# 20 s by default; docs/reliability.md also quotes longer ones run with this variable.
OUTAGE_S = float(os.environ.get("CERTMON_TEST_OUTAGE_S", "20"))
WINDOW = 20  # Mosquitto's default max_inflight_messages
PREFIX = p.DEFAULT_PREFIX


@pytest.fixture(scope="module")
def pg_bin() -> Path:
    found = find_pg_bin()
    if found is None:
        missing("PostgreSQL server binaries not found (apt install postgresql)")
    return found


@pytest.fixture
def pg(pg_bin: Path) -> Iterator[PostgresServer]:
    with PostgresServer(pg_bin) as server:
        yield server


@pytest.fixture
def broker(fleet_broker: Fleet, mosquitto_factory: Any, tmp_path: Path) -> Mosquitto:
    """The documented listeners (the collector on the operations one) with Mosquitto's
    default in-flight window of 20, and a plain listener for the publisher."""
    documented = fleet_broker.documented(tmp_path / "broker")
    conf = re.sub(r"^max_inflight_messages \d+$", f"max_inflight_messages {WINDOW}",
                  documented.global_conf, flags=re.MULTILINE)
    assert f"max_inflight_messages {WINDOW}" in conf and "max_queued_messages" in conf
    return mosquitto_factory(  # type: ignore[no-any-return]
        [*documented.listeners, Listener(allow_anonymous=True)], extra_conf=conf)


class Fleetlet:
    """Devices publishing a signed status every INTERVAL_S on the plain listener."""

    def __init__(self, port: int, fleet: Fleet, n: int, prefix: str) -> None:
        now = datetime.now(UTC)
        ca = SimCA(fleet.devices_ca.cert, fleet.devices_ca.key)  # type: ignore[arg-type]
        self.devices: list[SimDevice] = make_devices(ca, n, now, prefix=prefix)
        self.dead = self.devices[-1].device_id  # stops reporting before the outage
        self.silenced = threading.Event()
        self.published: dict[str, list[int]] = {d.device_id: [] for d in self.devices}
        self.published_at: list[float] = []  # monotonic instant of every status
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{prefix}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def certs(self) -> None:
        infos = [self.client.publish(p.cert_topic(PREFIX, d.device_id), cert_message(d), qos=1,
                                     retain=True) for d in self.devices]
        for info in infos:
            info.wait_for_publish(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            infos = []
            for dev in self.devices:
                if dev.device_id == self.dead and self.silenced.is_set():
                    continue
                seq = len(self.published[dev.device_id]) + 1
                token = signed_status(dev, seq, datetime.now(UTC), interval_s=INTERVAL_S)
                infos.append(self.client.publish(p.status_topic(PREFIX, dev.device_id), token,
                                                 qos=1))
                self.published[dev.device_id].append(seq)
                self.published_at.append(time.monotonic())
            for info in infos:
                info.wait_for_publish(10)  # the broker has it: from here on it is ours
            self._stop.wait(max(0.0, INTERVAL_S - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(20)

    def close(self) -> None:
        self.stop()
        self.client.disconnect()
        self.client.loop_stop()


class Notifications:
    """The service manager's side of sd_notify: a datagram socket, each message kept
    with the monotonic instant it arrived."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.got.append((time.monotonic(), data.decode()))

    def between(self, start: float, end: float) -> list[str]:
        return [m for at, m in list(self.got) if start <= at <= end]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def scrape(url: str) -> dict[str, float]:
    """Every unlabelled sample of /metrics, by name."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if not s.labels}


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def stored_seqs(store: Store, device_id: str) -> list[int]:
    """The device's stored seqs in arrival order (received_at), as the store keeps them."""
    return [seq for _boot, seq in store.seen_seqs(device_id)]  # type: ignore[attr-defined]


def all_stored(url: str, fleet: Fleetlet) -> bool:
    try:
        store = open_store(url)
    except StoreError:
        return False
    try:
        return all(store.seen_count(d) == len(seqs)  # type: ignore[attr-defined]
                   for d, seqs in fleet.published.items())
    except StoreError:
        return False
    finally:
        store.close()


def offline_alerts(store: Store) -> dict[str, datetime]:
    return {a.device_id: a.started_at for a in store.alert_history(limit=1000)
            if a.rule == "DEVICE_OFFLINE" and a.device_id}


def run_outage(service: CollectorService, fleet: Fleetlet, store_url: str,
               stop_store: Any, start_store: Any, *, broker: Mosquitto) -> dict[str, Any]:
    """Warm up, take the store away for OUTAGE_S under load, bring it back, drain.
    Returns what was observed (metric samples, timings) for the assertions."""
    assert service.web_url is not None
    web = service.web_url
    # The service loop as systemd runs it: WATCHDOG_USEC=1 s makes it tick every 0.5 s.
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    seen: dict[str, Any] = {"store_up": [], "backlog": []}
    try:
        assert service.link.wait_connected(10)
        # A new session: statuses published before the broker has the collector's
        # subscriptions are delivered to nobody, so the devices start only after them.
        client_id = service.link.settings.client_id
        assert wait_until(lambda: broker.log_text().count(
            f"Received SUBSCRIBE from {client_id}") >= 4, 10), "collector never subscribed"
        fleet.certs()
        fleet.thread.start()
        assert wait_until(lambda: all(len(s) >= 3 for s in fleet.published.values())
                          and all_stored(store_url, fleet), 30), "warm-up: not all stored"
        fleet.silenced.set()  # the dead device's last status is stored before the outage
        time.sleep(0.5)
        assert wait_until(lambda: all_stored(store_url, fleet), 10)
        store = open_store(store_url)
        try:  # not yet silent for long enough: 6 s
            dead = store.device(fleet.dead)
            assert dead is not None and dead.is_online
        finally:
            store.close()
        published_before = sum(len(s) for s in fleet.published.values())
        seen["store_up"].append(scrape(web)["certmon_collector_store_up"])
        down_at = time.monotonic()
        stop_store()
        assert wait_until(lambda: scrape(web)["certmon_collector_store_up"] == 0.0, 10), \
            "the outage was not noticed"
        seen["noticed_after_s"] = time.monotonic() - down_at
        seen["store_up"].append(0.0)
        health_code, health = get_json(web + "/api/health")
        summary_code, summary = get_json(web + "/api/summary")
        device_code, _ = get_json(web + f"/api/devices/{fleet.devices[0].device_id}")
        seen.update(health_code=health_code, health=health, summary_code=summary_code,
                    summary=summary, device_code=device_code)
        while time.monotonic() - down_at < OUTAGE_S:
            seen["backlog"].append(scrape(web)["certmon_collector_ingest_backlog_messages"])
            time.sleep(0.5)
        seen["published_during"] = sum(len(s) for s in fleet.published.values()) \
            - published_before
        start_store()
        up_at = time.monotonic()
        seen["outage_s"] = up_at - down_at
        assert wait_until(lambda: scrape(web)["certmon_collector_store_up"] == 1.0, 30), \
            "the store's return was not noticed"
        seen["store_up"].append(1.0)
        # Devices keep reporting after the return. Watch for: every status published
        # up to the return stored (caught up), the dead device's DEVICE_OFFLINE.
        owed = {d: len(s) for d, s in fleet.published.items()}
        store = open_store(store_url)
        try:
            while time.monotonic() - up_at < 30 and (
                    "caught_up_after_s" not in seen or "dead_alert_after_s" not in seen
                    or time.monotonic() - up_at < 3 * INTERVAL_S):
                if "caught_up_after_s" not in seen and all(
                        store.seen_count(d) >= n for d, n in owed.items()):  # type: ignore[attr-defined]
                    seen["caught_up_after_s"] = time.monotonic() - up_at
                if "dead_alert_after_s" not in seen and fleet.dead in offline_alerts(store):
                    seen["dead_alert_after_s"] = time.monotonic() - up_at
                time.sleep(0.2)
            assert "caught_up_after_s" in seen, "the backlog was not drained in 30 s"
            assert "dead_alert_after_s" in seen, \
                "the device that really went silent was never declared offline"
            fleet.stop()
            assert wait_until(lambda: all_stored(store_url, fleet), 60), "not drained"
            assert wait_until(lambda: bool(store.store_outages()), 15)  # the tick records it
        finally:
            store.close()
        seen["metrics_after"] = scrape(web)
        seen["health_after"] = get_json(web + "/api/health")[1]
        seen["down_at"], seen["up_at"] = down_at, up_at
    finally:
        service.stop()
        runner.join(30)
    return seen


def check_notifications(notes: Notifications, seen: dict[str, Any]) -> None:
    """sd_notify stayed honest: the worker was waiting for the store, not stuck, so
    the watchdog kept being fed; STATUS said what was going on."""
    during = notes.between(seen["down_at"] + 1, seen["up_at"])
    pings = during.count("WATCHDOG=1")
    assert pings >= (seen["up_at"] - seen["down_at"] - 1) / 0.5 * 0.6, (pings, during)
    assert any(m.startswith("STATUS=store unavailable for ") and "none lost" in m
               for m in during), during
    after = notes.between(seen["up_at"], time.monotonic())
    assert any(m.startswith("STATUS=ingesting; last store outage ") for m in after), after
    assert notes.got[0][1] == "READY=1"


def check_outcome(store: Store, fleet: Fleetlet, seen: dict[str, Any], *,
                  reads_fail: bool) -> str:
    """The assertions both stores share; returns the figures line for the docs.
    `reads_fail`: the outage stopped reads too (a stopped server; a full disk does not)."""
    lost, twice, disorder = {}, {}, {}
    for dev, seqs in fleet.published.items():
        got = stored_seqs(store, dev)
        if sorted(set(got)) != seqs:
            lost[dev] = sorted(set(seqs) - set(got))
        if len(got) != len(set(got)):
            twice[dev] = got
        if got != sorted(got):
            disorder[dev] = got
        row = store.device(dev)
        assert row is not None and row.seq == seqs[-1], (dev, row)
    assert not lost and not twice and not disorder, (lost, twice, disorder)
    assert store.rejection_counts() == {}
    alive = {d for d in fleet.published if d != fleet.dead}
    alerts = offline_alerts(store)
    assert set(alerts) == {fleet.dead}, f"false DEVICE_OFFLINE for {set(alerts) - {fleet.dead}}"
    for dev in alive:
        silence = [h for h in store.history(dev) if h.kind == "online_change"
                   and h.detail.get("cause") == "silence"]
        assert silence == [], (dev, silence)
        row = store.device(dev)
        assert row is not None and row.is_online
    assert seen["published_during"] > WINDOW  # more than the broker's window was in flight
    assert seen["store_up"] == [1.0, 0.0, 1.0]
    assert seen["health_code"] == 200 and seen["health"]["store"]["up"] is False
    assert seen["health"]["store"]["error"]  # the driver's error class, no URL
    assert "postgresql://" not in json.dumps(seen["health"])
    assert seen["summary_code"] == 200  # from the snapshot, while the store is away
    if reads_fail:
        assert seen["summary"]["rejected"] is None  # the part read live waits
        assert seen["device_code"] == 503  # read from the store: unavailable, said so
    held_max = max(seen["backlog"])
    assert 0 < held_max <= WINDOW + 1, seen["backlog"]  # nothing more was taken from the broker
    after = seen["metrics_after"]
    assert after["certmon_collector_store_up"] == 1.0
    assert after["certmon_collector_store_outages_total"] == 1.0
    assert abs(after["certmon_collector_store_last_outage_seconds"] - seen["outage_s"]) < 5
    last = seen["health_after"]["store"]["last_outage"]
    assert last is not None and last["messages_held"] >= held_max
    (record,) = store.store_outages()
    assert record.messages_held == last["messages_held"]
    assert abs(record.duration_s - seen["outage_s"]) < 5
    out = io.StringIO()
    render_report(build_report(store, datetime.now(UTC), 30), out)
    assert "last store outage: " in out.getvalue(), out.getvalue()
    # The device that really went silent: declared after the store returned, no later
    # than the outage's length plus its threshold and the tick.
    assert seen["dead_alert_after_s"] < seen["outage_s"] + FACTOR * INTERVAL_S + 5
    stored = sum(len(s) for s in fleet.published.values())
    return (f"outage {seen['outage_s']:.1f} s (noticed after {seen['noticed_after_s']:.1f} s); "
            f"{seen['published_during']} statuses published during it, at most {held_max:.0f} "
            f"held by the collector (window {WINDOW}); stored {stored}/{stored}, lost 0, twice 0; "
            f"caught up {seen['caught_up_after_s']:.1f} s after the return; DEVICE_OFFLINE for the "
            f"dead device {seen['dead_alert_after_s']:.1f} s after the return, none for the "
            f"{len(alive)} alive ones")


def make_service(fleet_broker: Fleet, broker: Mosquitto, tmp_path: Path,
                 store_url: str) -> CollectorService:
    config = collector_config(fleet_broker, tmp_path, **{
        "mqtt.broker": f"mqtts://127.0.0.1:{broker.listeners[1].port}",
        "store.url": store_url, "mqtt.session_expiry_s": "3600",
        "ingest.offline_after_intervals": str(FACTOR), "ingest.store_retry_max_s": "1"})
    return build_collector(config, periodic=Periodic(
        beacon_every_s=1, silence_every_s=0.5, summary_every_s=5, fleet_sweep_every_s=5))


@pytest.fixture
def notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Notifications]:
    path = Path(tempfile.mkdtemp(prefix="notify-")) / "sock"  # short: AF_UNIX's 108 bytes
    n = Notifications(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield n
    n.close()
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.mark.postgres
def test_postgres_restart_under_load_loses_nothing_and_fires_no_false_offline(
    fleet_broker: Fleet, broker: Mosquitto, pg: PostgresServer, tmp_path: Path,
    notes: Notifications,
) -> None:
    service = make_service(fleet_broker, broker, tmp_path, pg.url)
    fleet = Fleetlet(broker.listeners[2].port, fleet_broker, DEVICES + 1, "pgout")
    try:
        seen = run_outage(service, fleet, pg.url, pg.stop, pg.start, broker=broker)
    finally:
        fleet.close()
    check_notifications(notes, seen)
    store = open_store(pg.url)
    try:
        print("\nPostgreSQL:", check_outcome(store, fleet, seen, reads_fail=True))
    finally:
        store.close()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        missing(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")


def test_sqlite_disk_full_under_load_loses_nothing_and_fires_no_false_offline(
    fleet_broker: Fleet, broker: Mosquitto, tmp_path: Path, notes: Notifications
) -> None:
    """The same story on SQLite: the database's file system fills up (SQLITE_FULL)
    and is freed again."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "24m")
    filler = disk / "filler"
    url = f"sqlite:///{disk / 'certmon.db'}"
    try:
        service = make_service(fleet_broker, broker, tmp_path, url)
        fleet = Fleetlet(broker.listeners[2].port, fleet_broker, DEVICES + 1, "sqfull")

        def fill() -> None:
            # Fill what is left, so the next WAL page cannot be written.
            with filler.open("wb", buffering=0) as f:  # unbuffered: close() has nothing left to flush
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                        f.flush()
                except OSError:
                    pass

        try:
            seen = run_outage(service, fleet, url, fill, filler.unlink, broker=broker)
        finally:
            fleet.close()
        check_notifications(notes, seen)
        store = open_store(url)
        try:
            assert store.integrity_check()  # type: ignore[attr-defined]
            print("\nSQLite:", check_outcome(store, fleet, seen, reads_fail=False))
        finally:
            store.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
