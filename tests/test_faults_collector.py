"""The collector is killed (SIGKILL) mid-ingest while a publisher floods it.

The operator's story: `certmon-collector run` (a real subprocess, SQLite file, a fixed
--client-id, so its MQTT v5 session persists for mqtt.session_expiry_s = 3600 s by
default) is ingesting a flood of signed statuses from twenty simulated devices when
the OOM killer takes it. The publisher keeps going; the broker keeps the collector's
session and queues for it. The collector is started again with the same flags.

What must hold afterwards: the SQLite store passes `integrity_check()` (WAL, one
transaction per batch: a kill loses at most the open transaction, never corrupts);
every status is stored once (`status_seen` is the replay guard); and no published
(device, seq) is missing — what was published while the collector was down is
delivered from the persistent session.

Alerts: the devices report a CERT_EXPIRING finding from a seq of their own on (a
few before the kill, most after), and the collector feeds a real Alertmanager
(`--webhook-url`, tests/kit/alertmanager.py). Each alert firing in the store at the
end must be at Alertmanager, also one whose notification died with the killed
process: the restarted collector re-posts the store's active set at its first tick
and every `alerts.resend_interval_s` (docs/alerts.md, "Alertmanager").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import Fleet, missing
from kit.alertmanager import Alertmanager, find_alertmanager, label_set
from kit.broker import Listener, Mosquitto, wait_until
from kit.fleet import (
    SimCA,
    SimDevice,
    cert_message,
    expiring_finding,
    make_devices,
    signed_status,
)

from certmon import wire as p
from collector.store import open_store

DEVICES = 20
PER_DEVICE = 60  # 1 200 statuses: a few seconds of work for one collector
CLIENT_ID = "collector-kill9"


@pytest.fixture
def broker(fleet_broker: Fleet, mosquitto_factory: Any, tmp_path: Path) -> Mosquitto:
    """The documented device and operations listeners (the collector on the latter),
    plain for the publisher; room to queue the flood."""
    documented = fleet_broker.documented(tmp_path / "broker")
    return mosquitto_factory(  # type: ignore[no-any-return]
        [*documented.listeners, Listener(allow_anonymous=True)],
        extra_conf=documented.global_conf + "max_inflight_messages 100\n")


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    binary = find_alertmanager()
    if binary is None:
        missing("prometheus-alertmanager not found (apt install prometheus-alertmanager)")
    with Alertmanager(binary, tmp_path / "alertmanager") as am:
        yield am


def first_alerting_seq(i: int) -> int:
    """Device i reports CERT_EXPIRING from this seq on: 2, 5, 8 … 59."""
    return 2 + 3 * i


def open_alerts(db: Path) -> set[tuple[tuple[str, str], ...]]:
    store = open_store(f"sqlite:///{db}")
    try:
        return {label_set(r.labels) for r in store.active_alerts()}
    except Exception:  # tables not created yet
        return set()
    finally:
        store.close()


def assert_every_firing_alert_reached(db: Path, am: Alertmanager) -> None:
    firing = open_alerts(db)
    assert len(firing) == DEVICES  # every device reached its alerting seq
    # Alerts fired after the restart are posted at once; the ones fired before it at
    # the restarted collector's first tick (the resend cycle).
    assert wait_until(lambda: am.label_sets() == firing, 20), (
        sorted(firing - am.label_sets()), am.log_text()[-2000:])


class Collector:
    """`python -m collector.cli run` with flags, as systemd would start it."""

    def __init__(self, fleet: Fleet, broker: Mosquitto, tmp: Path,
                 alertmanager: Alertmanager) -> None:
        creds = fleet.collector_credentials(tmp / "creds")
        fleet_ca = tmp / "fleet-ca.pem"
        fleet_ca.write_bytes(fleet.root.cert_pem())
        self.db = tmp / "certmon.db"
        self.log = tmp / "collector.log"
        self.argv = [
            sys.executable, "-m", "collector.cli", "run",
            "--broker", f"mqtts://127.0.0.1:{broker.listeners[1].port}", "--ca-bundle",
            str(creds.ca_bundle_path), "--cert", str(creds.cert_path), "--key",
            str(creds.key_path), "--fleet-ca", str(fleet_ca), "--db", f"sqlite:///{self.db}",
            "--client-id", CLIENT_ID, "--listen", "127.0.0.1:0",
            "--webhook-url", alertmanager.alerts_url]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

    def start_subscribed(self, broker: Mosquitto) -> None:
        """Start, and wait until its four subscriptions reached the broker."""
        self.start()
        assert wait_until(lambda: broker.log_text().count(f"Received SUBSCRIBE from {CLIENT_ID}")
                          >= 4, 20), self.log.read_text()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stored(self) -> int:
        if not self.db.exists():
            return 0
        store = open_store(f"sqlite:///{self.db}")
        try:
            return sum(store.seen_count(f"flood-{i:05d}") for i in range(DEVICES))
        except Exception:  # tables not created yet
            return 0
        finally:
            store.close()


class Flood:
    """A publisher thread on the plain listener: cert messages, then every status."""

    def __init__(self, port: int, fleet: Fleet) -> None:
        now = datetime.now(UTC)
        ca = SimCA(fleet.devices_ca.cert, fleet.devices_ca.key)  # type: ignore[arg-type]
        self.devices: list[SimDevice] = make_devices(ca, DEVICES, now, prefix="flood")
        self.statuses = [
            (d.device_id, s, signed_status(d, s, now, findings=[expiring_finding(3, now)]
                                           if s >= first_alerting_seq(i) else []))
            for s in range(1, PER_DEVICE + 1) for i, d in enumerate(self.devices)]
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(50)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.sent = 0  # statuses PUBACKed by the broker, in order
        self.thread = threading.Thread(target=self.publish, daemon=True)

    def certs(self) -> None:
        infos = [self.client.publish(p.cert_topic(p.DEFAULT_PREFIX, d.device_id),
                                     cert_message(d), qos=1, retain=True) for d in self.devices]
        for info in infos:
            info.wait_for_publish(10)

    def publish(self, count: int | None = None) -> None:
        """Publish the next `count` statuses (all that are left by default)."""
        end = len(self.statuses) if count is None else self.sent + count
        for device_id, _seq, token in self.statuses[self.sent:end]:
            info = self.client.publish(p.status_topic(p.DEFAULT_PREFIX, device_id), token,
                                       qos=1, retain=True)
            info.wait_for_publish(30)  # paced by PUBACKs: a steady flood, not a burst
            self.sent += 1

    def close(self) -> None:
        self.thread.join(60)
        self.client.disconnect()
        self.client.loop_stop()


def settled(value: Any, target: int, quiet_s: float = 3.0, timeout_s: float = 60) -> int:
    """Poll `value()` until it equals `target` or stops changing for `quiet_s`."""
    last, changed_at = value(), time.monotonic()
    deadline = changed_at + timeout_s
    while last != target and time.monotonic() < deadline:
        time.sleep(0.1)
        now = value()
        if now != last:
            last, changed_at = now, time.monotonic()
        elif time.monotonic() - changed_at > quiet_s:
            break
    return last  # type: ignore[no-any-return]


@pytest.fixture
def flood(broker: Mosquitto, fleet_broker: Fleet) -> Iterator[Flood]:
    f = Flood(broker.ports[2], fleet_broker)
    yield f
    f.close()


def test_kill9_mid_ingest_loses_nothing_and_stores_each_status_once(
    fleet_broker: Fleet, broker: Mosquitto, flood: Flood, tmp_path: Path,
    alertmanager: Alertmanager
) -> None:
    collector = Collector(fleet_broker, broker, tmp_path, alertmanager)
    try:
        collector.start_subscribed(broker)
        flood.certs()
        flood.thread.start()
        total = len(flood.statuses)
        # Kill it in the middle of the flood, with a backlog in flight.
        assert wait_until(lambda: collector.stored() >= total // 5, 60), collector.log.read_text()
        collector.kill9()
        killed_at = collector.stored()
        assert killed_at < total
        # Alertmanager restarts meanwhile: what the killed collector told it is gone,
        # and the alerts fired before the kill are not fired again (already firing).
        fired_before = len(open_alerts(collector.db))
        alertmanager.restart(empty=True)
        # The flood goes on while it is down; the broker queues for its session.
        assert wait_until(lambda: flood.sent >= total * 0.6, 60)
        collector.start()
        assert wait_until(lambda: flood.sent == total, 60)
        settled(collector.stored, total)
        store = open_store(f"sqlite:///{collector.db}")
        try:
            assert store.integrity_check()
            missing = {}
            for dev in flood.devices:
                seqs = sorted(seq for _, seq in store.seen_seqs(dev.device_id))
                assert len(seqs) == len(set(seqs))  # stored once
                lost = sorted(set(range(1, PER_DEVICE + 1)) - set(seqs))
                if lost:
                    missing[dev.device_id] = lost
            assert not missing, (f"lost after kill -9 at {killed_at} stored: {missing}; "
                                 f"rejections {store.rejection_counts()}")
            assert set(store.rejection_counts()) <= {"replay"}
        finally:
            store.close()
        assert fired_before >= 1  # the kill came after some alerts fired
        assert_every_firing_alert_reached(collector.db, alertmanager)
    finally:
        collector.stop()


def test_a_collector_down_for_a_while_receives_what_was_published_meanwhile(
    fleet_broker: Fleet, broker: Mosquitto, flood: Flood, tmp_path: Path,
    alertmanager: Alertmanager
) -> None:
    """A clean stop (SIGTERM, nothing in flight), a flood while it is down, a restart:
    the persistent session delivers every status, each stored once, and every alert
    reaches Alertmanager."""
    collector = Collector(fleet_broker, broker, tmp_path, alertmanager)
    try:
        collector.start_subscribed(broker)
        flood.certs()
        flood.publish(DEVICES)  # one status each: the collector now knows every device
        assert wait_until(lambda: collector.stored() == DEVICES, 20), collector.log.read_text()
        collector.stop()
        assert collector.proc is not None and collector.proc.returncode == 0
        flood.thread.start()
        assert wait_until(lambda: flood.sent == len(flood.statuses), 60)
        collector.start()
        assert settled(collector.stored, len(flood.statuses)) == len(flood.statuses), (
            collector.stored(), collector.log.read_text()[-2000:])
        store = open_store(f"sqlite:///{collector.db}")
        try:
            assert store.integrity_check()
            for dev in flood.devices:
                assert sorted(s for _, s in store.seen_seqs(dev.device_id)) == list(
                    range(1, PER_DEVICE + 1))
            assert store.rejection_counts() == {}
        finally:
            store.close()
        assert_every_firing_alert_reached(collector.db, alertmanager)
    finally:
        collector.stop()
