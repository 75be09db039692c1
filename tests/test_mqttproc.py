"""The collector's MQTT link in a child process (certmon.mqttproc), on a real Mosquitto.

The operator's worries, each a test: every message arrives and is acknowledged only
when told; a link process that dies (killed, OOM) is replaced and nothing is lost —
what it had received but not acknowledged comes again, and its successor never
acknowledges the dead one's packet ids; a collector killed with -9 leaves no link
process behind holding its session; a stop is a clean DISCONNECT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from kit.broker import Listener, Mosquitto, wait_until

from certmon.errors import TransportError
from certmon.mqtt import Incoming, LinkSettings
from certmon.mqttproc import GENERATION, ProcessLink


@pytest.fixture
def broker(mosquitto_factory: Any) -> Mosquitto:
    return mosquitto_factory([Listener(allow_anonymous=True)])  # type: ignore[no-any-return]


def settings(port: int, client_id: str = "rx-test") -> LinkSettings:
    return LinkSettings(host="127.0.0.1", port=port, client_id=client_id, is_tls=False,
                        manual_ack=True, clean_start=False, session_expiry_s=300)


class Inbox:
    def __init__(self) -> None:
        self.got: list[Incoming] = []
        self.lock = threading.Lock()

    def __call__(self, batch: Sequence[Incoming]) -> None:
        with self.lock:
            self.got.extend(batch)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [m.payload for m in self.got]


def publish(port: int, topic: str, payloads: Sequence[bytes]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for info in [client.publish(topic, data, qos=1) for data in payloads]:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def link(broker: Mosquitto) -> Iterator[tuple[ProcessLink, Inbox]]:
    inbox = Inbox()
    rx = ProcessLink(settings(broker.port), on_messages=inbox)
    rx.subscribe("t/#", 1)
    rx.start()
    assert rx.wait_connected(10), rx.state.last_error
    subscribed(broker, "rx-test")
    yield rx, inbox
    rx.stop()


def subscribed(broker: Mosquitto, client_id: str, times: int = 1) -> None:
    """Connected is not subscribed: wait for the broker to have the SUBSCRIBE."""
    assert wait_until(lambda: broker.log_text().count(f"{client_id} 1 t/#") >= times, 10)


def child_pid(rx: ProcessLink) -> int:
    assert rx._proc is not None
    return rx._proc.pid


def test_messages_arrive_in_order_and_are_acknowledged_only_when_told(
        broker: Mosquitto, link: tuple[ProcessLink, Inbox]) -> None:
    rx, inbox = link
    # Unacknowledged, the broker holds back all but its in-flight window (Mosquitto's
    # max_inflight_messages, 20 by default): acking as they come lets the rest flow.
    sent = [b"%d" % i for i in range(500)]
    acked = 0

    def ack_what_came() -> bool:
        nonlocal acked
        got = list(inbox.got)
        rx.ack(got[acked:])
        acked = len(got)
        return acked >= 500

    threading.Thread(target=publish, args=(broker.port, "t/a", sent), daemon=True).start()
    assert wait_until(ack_what_came, 20), len(inbox.got)
    assert inbox.payloads() == sent  # in order, each once
    assert all(m.connection == GENERATION + 1 for m in inbox.got)
    publish(broker.port, "t/a", [b"kept-%d" % i for i in range(5)])
    assert wait_until(lambda: len(inbox.got) == 505, 10)
    # Those five not acknowledged: a restarted link gets them again (persistent session).
    rx.stop()
    again = Inbox()
    rx2 = ProcessLink(settings(broker.port), on_messages=again)
    rx2.subscribe("t/#", 1)
    rx2.start()
    try:
        assert wait_until(lambda: len(again.got) >= 5, 10)
        assert again.payloads() == [b"kept-%d" % i for i in range(5)]
        assert all(m.dup for m in again.got)
        rx2.ack(again.got)
        time.sleep(0.3)  # the PUBACKs reach the broker before the clean DISCONNECT
    finally:
        rx2.stop()
    # Acknowledged: nothing comes a third time.
    third = Inbox()
    rx3 = ProcessLink(settings(broker.port), on_messages=third)
    rx3.subscribe("t/#", 1)
    rx3.start()
    try:
        assert rx3.wait_connected(10)
        subscribed(broker, "rx-test", 3)
        publish(broker.port, "t/a", [b"fresh"])
        assert wait_until(lambda: third.payloads() == [b"fresh"], 10), third.payloads()
        rx3.ack(third.got)
    finally:
        rx3.stop()


def test_a_killed_link_process_is_replaced_and_nothing_is_lost(
        broker: Mosquitto, link: tuple[ProcessLink, Inbox]) -> None:
    rx, inbox = link
    publish(broker.port, "t/a", [b"one", b"two"])
    assert wait_until(lambda: len(inbox.got) == 2, 10), inbox.payloads()
    first = list(inbox.got)
    old = child_pid(rx)
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: not rx.is_connected, 10)
    with pytest.raises(TransportError):
        rx.publish("t/x", b"while down")
    assert wait_until(lambda: rx.is_connected, 15), rx.state.last_error
    assert child_pid(rx) != old and rx.state.connects == 2
    subscribed(broker, "rx-test", 2)
    # The dead child's deliveries are not acknowledged by its successor, not even
    # by a worker that computed their acks before the restart (their packet ids
    # belong to a connection that no longer exists) ...
    rx.ack(first)
    rx._send(("ack", 1, [(m.mid, m.qos, 1) for m in first]))  # a stalled worker's
    # ... so the broker delivers them again, on the new connection, and they are
    # acknowledged there.
    assert wait_until(lambda: len(inbox.got) == 4, 10), inbox.payloads()
    again = inbox.got[2:]
    assert [m.payload for m in again] == [b"one", b"two"]
    assert all(m.connection == 2 * GENERATION + 1 for m in again)
    rx.ack(again)
    publish(broker.port, "t/a", [b"three"])
    assert wait_until(lambda: inbox.payloads()[-1:] == [b"three"], 10)


def test_publish_goes_out_through_the_child(broker: Mosquitto,
                                            link: tuple[ProcessLink, Inbox]) -> None:
    rx, inbox = link
    rx.publish("t/self", b"hello", qos=1, user_properties=[("k", "v")])
    assert wait_until(lambda: b"hello" in inbox.payloads(), 10)
    (msg,) = [m for m in inbox.got if m.payload == b"hello"]
    assert msg.user_properties == (("k", "v"),)


def test_no_link_process_outlives_a_killed_collector(broker: Mosquitto, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from certmon.mqtt import LinkSettings
        from certmon.mqttproc import ProcessLink
        rx = ProcessLink(LinkSettings(host="127.0.0.1", port={broker.port},
                                      client_id="orphan", is_tls=False, manual_ack=True))
        rx.subscribe("t/#", 1)
        rx.start()
        assert rx.wait_connected(10)
        print(rx._proc.pid, flush=True)
        time.sleep(60)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        parent.kill()
        parent.wait()
        # The socket to the parent is closed: the child disconnects and exits (a
        # zombie until init reaps it counts as gone).
        assert wait_until(lambda: not child.is_running()
                          or child.status() == psutil.STATUS_ZOMBIE, 10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    assert wait_until(lambda: "orphan" in broker.log_text()
                      and "Client orphan disconnected" in broker.log_text(), 5)


def test_sigterm_to_the_group_leaves_the_stop_to_the_parent(
        broker: Mosquitto, link: tuple[ProcessLink, Inbox]) -> None:
    rx, _ = link
    pid = child_pid(rx)
    os.kill(pid, signal.SIGTERM)  # what systemd sends every process of the unit
    time.sleep(0.3)
    assert psutil.pid_exists(pid) and rx.is_connected
    rx.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert wait_until(lambda: "Client rx-test disconnected." in broker.log_text(), 5)


def test_a_publish_paho_refuses_ends_nothing(broker: Mosquitto,
                                            link: tuple[ProcessLink, Inbox]) -> None:
    rx, inbox = link
    pid = child_pid(rx)
    rx.publish("t/bad/#", b"a wildcard is no topic")  # paho raises ValueError in the child
    rx.publish("t/after", b"still here")
    assert wait_until(lambda: b"still here" in inbox.payloads(), 10)
    assert child_pid(rx) == pid and rx.state.connects == 1


def test_unusable_tls_files_fail_at_once_and_a_later_loss_is_said(
        broker: Mosquitto, mosquitto_factory: Any, fleet_broker: Any, tmp_path: Path) -> None:
    creds = fleet_broker.device_credentials("rx-tls", tmp_path / "creds")
    tls_broker = mosquitto_factory([Listener(tls=True, certfile=fleet_broker.files.certfile,
                                             keyfile=fleet_broker.files.keyfile,
                                             allow_anonymous=True)])
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("garbage")
    with pytest.raises(TransportError):  # as the collector starts: one clear line
        ProcessLink(LinkSettings(host="127.0.0.1", port=tls_broker.port, client_id="rx-tls",
                                 ca_bundle=str(bad), manual_ack=True))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(Path(creds.ca_bundle_path).read_bytes())
    rx = ProcessLink(LinkSettings(host="127.0.0.1", port=tls_broker.port, client_id="rx-tls",
                                  ca_bundle=str(ca), manual_ack=True), on_messages=Inbox())
    rx.start()
    try:
        assert rx.wait_connected(10), rx.state.last_error
        ca.write_text("garbage")  # gone bad while running: the next child cannot start
        os.kill(child_pid(rx), signal.SIGKILL)
        assert wait_until(lambda: rx.state.last_error is not None
                          and "ca.pem" in rx.state.last_error, 10), rx.state.last_error
        assert not rx.is_connected
        ca.write_bytes(Path(creds.ca_bundle_path).read_bytes())  # mended: it comes back
        assert wait_until(lambda: rx.is_connected, 40), rx.state.last_error
    finally:
        rx.stop()
