"""An MQTT link whose connection lives in a child process (`ProcessLink`).

Owns the split of one `certmon.mqtt.MqttLink` across two processes: the child runs
the link (paho's network thread: TLS, packet parsing, the PUBACKs) and hands received
messages to the parent in batches over a socketpair; the parent sends back what to
acknowledge and what to publish. Why: paho spends ~50 µs of interpreter time per
received message; in the process that verifies and stores, that time and the lock
hand-offs between paho's thread and the ingest worker set the collector's intake
(a 60,000-status flood drained at ~13,000/s, everything behind it waiting). In a
child it runs on the other core and the parent sees a batch per wake-up.

The parent's face is the subset of MqttLink the collector uses: `subscribe` (before
`start`), `start`, `wait_connected`, `is_connected`, `state`, `settings`, `publish`
(fire-and-forget: the collector's publishes never wait for a PUBACK), `ack`, `stop`.
Acks keep MqttLink's rule: never across a reconnect — and never across a child
restart: `Incoming.connection` is `generation * GENERATION + connects`, so a message
from a child that died is never acknowledged by its successor (the broker re-sends
it). A child that dies is restarted with back-off; while it is down the link is
disconnected. Must not: look inside messages, or import anything but the transport
(the child, `certmon.mqttchild`, is a small process: paho, ssl and these modules).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .errors import TransportError
from .mqtt import Incoming, LinkSettings, LinkState, MqttLink

__all__ = ["GENERATION", "ProcessLink"]

log = logging.getLogger(__name__)

GENERATION = 1_000_000  # connection ids: generation * GENERATION + the child's connects
BATCH_MAX = 512  # messages per batch the child sends
BUFFER_MAX = 4096  # received, not yet sent to the parent: then paho's thread waits
RESTART_MIN_S, RESTART_MAX_S = 0.5, 30.0
STABLE_S = 60.0  # a child up this long resets the restart back-off
EXIT_FATAL = 3  # the child's exit code when its settings cannot work (e.g. a bad key)


@dataclass(frozen=True, slots=True)
class _Start:
    settings: LinkSettings
    subscriptions: tuple[tuple[str, int], ...]
    log_level: int
    generation: int


class ProcessLink:
    """MqttLink's collector-side face, with the link itself in a child process."""

    def __init__(self, settings: LinkSettings, *,
                 on_message: Callable[[Incoming], None] | None = None,
                 on_connect: Callable[[], None] | None = None,
                 on_disconnect: Callable[[str], None] | None = None,
                 on_messages: Callable[[Sequence[Incoming]], None] | None = None) -> None:
        # The TLS files are read here, once, as MqttLink would: a bad CA, certificate
        # or key fails the collector's start with one line (TransportError), instead
        # of a child that fails on every restart.
        MqttLink(settings)
        self.settings = settings
        self.state = LinkState(protocol=settings.protocol)
        self._on_message = on_message
        self._on_messages = on_messages  # a batch at once (the inbox's put_many)
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._subscriptions: dict[str, int] = {}
        self._connected = threading.Event()
        self._send_lock = threading.Lock()
        self._spawn_lock = threading.Lock()  # spawn vs stop: no child started after stop
        self._last_fatal: str | None = None
        self._fatal_generation = 0  # the child that said it cannot start
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._generation = 0
        self._child_connects = 0
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None
        self._started_at = 0.0

    # ------------------------------------------------------------------ control

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Before `start`: the child subscribes on every connect."""
        if self._proc is not None:
            raise RuntimeError("ProcessLink.subscribe after start")
        self._subscriptions[topic_filter] = qos
        self.state.subscriptions[topic_filter] = qos

    def start(self) -> None:
        if self._reader is not None:
            return
        self._spawn()
        self._reader = threading.Thread(target=self._read, name="certmon-mqtt-rx", daemon=True)
        self._reader.start()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None,
                user_properties: Sequence[tuple[str, str]] = ()) -> int:
        """Hand the message to the child; 0 (no mid: nothing here waits for a PUBACK).
        Raises TransportError when not connected, as MqttLink does."""
        if not self.is_connected:
            raise TransportError("not connected")
        self._send(("publish", topic, payload, qos, retain, expiry_s, tuple(user_properties)))
        return 0

    def ack(self, messages: Sequence[Incoming]) -> None:
        """PUBACK these, in order: only those of the current connection of the current
        child (the broker re-sends the others)."""
        if not self.settings.manual_ack:
            return
        generation = self._generation
        current = generation * GENERATION + self._child_connects
        acks = [(m.mid, m.qos, m.connection - generation * GENERATION)
                for m in messages if m.qos > 0 and m.connection == current]
        if acks:
            try:
                # The child drops acks of another generation: its packet ids are not
                # the dead child's (a worker that stalled across a restart).
                self._send(("ack", generation, acks))
            except TransportError:  # the child just died: the broker re-sends them
                log.debug("%d acks dropped: link process gone", len(acks))

    def stop(self, final: Sequence[tuple[str, bytes, bool]] = (), timeout_s: float = 5.0) -> None:
        """Publish `final`, disconnect cleanly (no will) and end the child."""
        with self._spawn_lock:  # a restart in progress finishes first; none after
            self._stopping.set()
        proc = self._proc
        if proc is None:
            return
        try:
            self._send(("stop", tuple(final), timeout_s))
            proc.wait(timeout_s + 5)
        except (TransportError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        self._close_conn()
        if self._reader is not None:
            self._reader.join(5)
        self._mark_down("stopped")

    # ------------------------------------------------------------------ parent side

    def _spawn(self) -> bool:
        """Start a child (False: stopping, none started). Raises OSError/TransportError
        when it cannot be started; nothing is left open then."""
        with self._spawn_lock:
            if self._stopping.is_set():
                return False
            parent_sock, child_sock = socket.socketpair()
            proc: subprocess.Popen[bytes] | None = None
            try:
                self._generation += 1
                self._child_connects = 0
                start = _Start(self.settings, tuple(self._subscriptions.items()),
                               logging.getLogger().getEffectiveLevel(), self._generation)
                env = {**os.environ, "CERTMON_MQTTPROC_FD": str(child_sock.fileno())}
                proc = subprocess.Popen(
                    _child_command(), pass_fds=(child_sock.fileno(),), env=env,
                    stdin=subprocess.DEVNULL, close_fds=True, cwd="/")
                conn = Connection(parent_sock.detach())
                with self._send_lock:
                    self._conn, self._proc = conn, proc
                self._send(("start", start))
            except BaseException:
                parent_sock.close()
                if proc is not None:
                    proc.kill()
                    proc.wait()
                self._close_conn()
                raise
            finally:
                child_sock.close()
            self._started_at = time.monotonic()
            return True

    def _close_conn(self) -> None:
        with self._send_lock:  # never under a concurrent send (a closed handle)
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _send(self, command: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise TransportError("link not started")
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                if self._conn is not conn:
                    raise TransportError("link process gone")
                conn.send_bytes(data)
        except OSError as exc:
            raise TransportError(f"link process gone: {exc}") from exc

    def _read(self) -> None:
        delay = RESTART_MIN_S
        while not self._stopping.is_set():
            conn, proc = self._conn, self._proc
            why = "link process exited"
            try:
                if conn is None:
                    raise EOFError
                while True:
                    self._handle(pickle.loads(conn.recv_bytes()))  # noqa: S301 — our child
            except (EOFError, OSError):
                pass
            except Exception:  # a callback's bug: this child's deliveries come again
                log.exception("MQTT link: handling what the link process sent failed")
                why = "link process restarted after an error"
            if self._stopping.is_set():
                return
            if proc is not None:
                try:  # its socket closes a moment before it has exited
                    code = proc.wait(2.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                if self._fatal_generation == self._generation and self._last_fatal:
                    why = self._last_fatal  # said when it came (once per change)
                elif code != 0:
                    log.error("MQTT link process exited (code %s); restarting in %.1f s",
                              code, delay)
            self._child_connects = 0  # no current connection: nothing it delivered is acked
            self._mark_down(why)
            self._close_conn()
            if time.monotonic() - self._started_at >= STABLE_S:
                delay = RESTART_MIN_S  # it ran fine for a while: this is a new failure
            while not self._stopping.wait(delay):
                delay = min(delay * 2, RESTART_MAX_S)
                try:
                    if self._spawn():
                        break
                    return
                except (OSError, TransportError) as exc:
                    log.error("MQTT link process cannot start: %s; retrying in %.1f s",
                              exc, delay)

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "batch":
            base = self._generation * GENERATION
            batch = [Incoming(topic, payload, retained, qos, props, mono, mid, dup, None,
                              base + connection)
                     for topic, payload, retained, qos, props, mono, mid, dup, connection
                     in event[1]]
            if self._on_messages is not None:
                self._on_messages(batch)
            elif self._on_message is not None:
                for msg in batch:
                    self._on_message(msg)
        elif kind == "up":
            _, connects, retain_available = event
            self._child_connects = connects
            self.state.connects += 1
            self.state.is_retain_available = retain_available
            self.state.last_error = None
            self.state.is_connected = True
            self._connected.set()
            _call(self._on_connect)
        elif kind == "down":
            self._mark_down(event[1])
        elif kind == "fatal":  # the child's settings cannot work: said once per change
            message = event[1]
            if message != self._last_fatal:
                log.error("MQTT link: %s", message)
            self._last_fatal = message
            self._fatal_generation = self._generation
            self.state.last_error = message

    def _mark_down(self, reason: str) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self.state.is_connected = False
        if reason not in ("stopped",):
            self.state.last_error = reason
        if was:
            _call(self._on_disconnect, reason)


def _call(fn: Callable[..., None] | None, *args: Any) -> None:
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:  # a callback's bug must not end the reader thread
        log.exception("link callback failed")


def _child_command() -> list[str]:
    # -I: the child imports exactly what the parent did (this certmon, from the
    # parent's path), never a checkout in the working directory or PYTHONPATH's.
    root = str(Path(__file__).resolve().parent.parent)
    return [sys.executable, "-I", "-c",
            f"import sys; sys.path.insert(0, {root!r}); "
            "from certmon.mqttchild import main; sys.exit(main())"]
