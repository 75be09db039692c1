"""The child half of `certmon.mqttproc.ProcessLink`: the process that holds the link.

Owns the child's side of the socketpair protocol: an `MqttLink` (paho's network
thread), a bounded buffer between paho's thread and the parent (4,096 messages; paho
waits when it is full, which is TCP back-pressure to the broker), batches of received
messages to the parent, and the parent's commands (ack — only of this child's
generation —, publish, stop). A command that fails is logged and ends nothing; a link
that cannot be built (unreadable TLS files) is said to the parent as "fatal" and the
child exits EXIT_FATAL. Must not: decide anything about messages, or outlive its
parent (EOF on the socket ends the link and the process).
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from .errors import TransportError
from .mqtt import Incoming, MqttLink
from .mqttproc import BATCH_MAX, BUFFER_MAX, EXIT_FATAL, _Start

log = logging.getLogger("certmon.mqttproc")


class _Child:
    """The child: an MqttLink, a buffer between paho's thread and the parent, and the
    parent's commands."""

    def __init__(self, conn: Connection, start: _Start) -> None:
        self.conn = conn
        self.send_lock = threading.Lock()
        self.cond = threading.Condition()
        self.buffer: list[tuple[Any, ...]] = []
        self.closed = False
        self.generation = start.generation
        self.link = MqttLink(start.settings, on_message=self.received,
                             on_connect=self.up, on_disconnect=self.down)
        for topic_filter, qos in start.subscriptions:
            self.link.subscribe(topic_filter, qos)

    def send(self, event: tuple[Any, ...]) -> None:
        data = pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self.send_lock:
                self.conn.send_bytes(data)
        except OSError:  # the parent is gone; commands() sees EOF and ends the link
            pass

    def received(self, m: Incoming) -> None:  # paho's thread
        row = (m.topic, m.payload, m.retained, m.qos, m.user_properties, m.received_mono_s,
               m.mid, m.dup, m.connection)
        with self.cond:
            while len(self.buffer) >= BUFFER_MAX and not self.closed:
                self.cond.wait(0.5)  # paho stops reading: back-pressure to the broker
            self.buffer.append(row)
            if len(self.buffer) == 1:
                self.cond.notify_all()

    def up(self) -> None:
        self.send(("up", self.link.state.connects, self.link.state.is_retain_available))

    def down(self, reason: str) -> None:
        self.send(("down", reason))

    def pump(self) -> None:  # batches to the parent, on its own thread
        while True:
            with self.cond:
                while not self.buffer and not self.closed:
                    self.cond.wait()
                if self.closed and not self.buffer:
                    return
                batch, self.buffer = self.buffer[:BATCH_MAX], self.buffer[BATCH_MAX:]
                self.cond.notify_all()
            self.send(("batch", batch))

    def commands(self) -> None:  # the parent's, on the main thread, until stop or EOF
        while True:
            try:
                command = pickle.loads(self.conn.recv_bytes())  # noqa: S301 — our parent
            except (EOFError, OSError):
                self.link.stop(timeout_s=1.0)
                return
            try:
                if self.command(command):
                    return
            except Exception:  # one bad command (a topic paho refuses) ends nothing
                log.exception("MQTT link process: %s failed", command[0])

    def command(self, command: tuple[Any, ...]) -> bool:
        """Carry out one command; True when it was the last (stop)."""
        kind = command[0]
        if kind == "ack":
            _, generation, acks = command
            if generation == self.generation:
                self.link.ack([Incoming("", b"", False, qos, mid=mid, connection=connection)
                               for mid, qos, connection in acks])
        elif kind == "publish":
            _, topic, payload, qos, retain, expiry_s, props = command
            try:
                self.link.publish(topic, payload, qos=qos, retain=retain,
                                  expiry_s=expiry_s, user_properties=props)
            except TransportError as exc:
                log.debug("publish to %s dropped: %s", topic, exc)
        elif kind == "stop":
            self.link.stop(command[1], command[2])
            return True
        return False


def main() -> int:
    import signal

    # The parent decides when the link ends (a clean DISCONNECT, no will): a Ctrl-C or
    # systemd's SIGTERM to the group must not end it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(os.environ["CERTMON_MQTTPROC_FD"]))
    kind, start = pickle.loads(conn.recv_bytes())  # noqa: S301 — our parent
    assert kind == "start"
    logging.basicConfig(level=start.log_level, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        child = _Child(conn, start)
    except TransportError as exc:  # e.g. a key file made unreadable since the start
        conn.send_bytes(pickle.dumps(("fatal", str(exc))))
        return EXIT_FATAL
    pump = threading.Thread(target=child.pump, name="certmon-mqtt-pump", daemon=True)
    pump.start()
    child.link.start()
    child.commands()
    with child.cond:
        child.closed = True
        child.cond.notify_all()
    pump.join(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
