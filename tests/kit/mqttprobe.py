"""A paho MQTT v5 client for tests: connects to a `kit.broker` broker and records
what it sees.

Owns: `MqttProbe`, the test's own view of the broker (CONNACKs, messages,
disconnects, SUBACKs, PUBACK reasons), with thread-safe capture and waits built on
`wait_until`.

Must not: be used by product code (production code reaches paho only through
certmon.mqtt), or start brokers (kit.broker does). Tests talk to the broker directly
so they can prove what the broker itself allows.
"""

from __future__ import annotations

import gc
import threading
import warnings
from typing import Any

import paho.mqtt.client as mqtt

from kit.broker import wait_until

__all__ = ["MqttProbe"]


class MqttProbe:
    """A paho 2.x MQTT v5 client with thread-safe event capture and poll helpers.

    `connack` holds the CONNACK reason once it arrives; `messages` every message as
    (topic, payload, retain); `disconnects` counts losses of the connection.
    """

    def __init__(self, client_id: str = "", **tls: str | None) -> None:
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.connack: object | None = None
        self.is_connected = False
        self.disconnects = 0
        self.messages: list[tuple[str, bytes, bool]] = []
        # Beside `messages`, index for index: each message's MQTT v5 user properties.
        self.user_properties: list[tuple[tuple[str, str], ...]] = []
        self.subscribed: list[object] = []
        self.pubacks: dict[int, object] = {}  # mid → PUBACK reason code (QoS 1)
        if tls:
            self.client.tls_set(
                ca_certs=tls.get("ca_certs"),
                certfile=tls.get("certfile"),
                keyfile=tls.get("keyfile"),
            )
        # Short reconnect backoff: paho's default (1 s) makes loop_stop() and
        # post-restart reconnects dominate test time. paho accepts floats here.
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        with self._lock:
            self.connack = reason
            self.is_connected = not getattr(reason, "is_failure", True)

    def _on_disconnect(self, *_args: object) -> None:
        with self._lock:
            self.is_connected = False
            self.disconnects += 1

    def _on_message(self, _c: object, _u: object, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            props = getattr(getattr(msg, "properties", None), "UserProperty", None) or ()
            self.user_properties.append(tuple(props))

    def _on_subscribe(self, _c: object, _u: object, _mid: int, reasons: Any, _p: object) -> None:
        with self._lock:
            self.subscribed.extend(reasons)

    def _on_publish(self, _c: object, _u: object, mid: int, reason: object, _p: object) -> None:
        with self._lock:
            self.pubacks[mid] = reason

    def connect(self, port: int, host: str = "127.0.0.1", *, wait_s: float = 5.0) -> MqttProbe:
        """Connect and start the network thread; waits for a successful CONNACK."""
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        if not wait_until(lambda: self.is_connected, wait_s):
            raise AssertionError(f"no successful CONNACK from {host}:{port}: {self.connack}")
        return self

    def attempt(self, port: int, host: str = "127.0.0.1", *, wait_s: float = 5.0) -> str | None:
        """Try to connect where refusal is the expected outcome; return why it was
        refused, or None if a successful CONNACK arrived.

        With TLS 1.2 a rejected client certificate fails inside connect(); with TLS
        1.3 the client's half of the handshake completes and the server's alert
        arrives on the first read, so the refusal shows up as a disconnect.
        """
        with warnings.catch_warnings():
            # paho 2.2 leaks the half-open SSL socket when the handshake fails inside
            # connect(); its ResourceWarning is paho's, not the test's.
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                self.client.connect(host, port, keepalive=10)
            except OSError as exc:  # ssl.SSLError is an OSError
                reason = f"connect failed: {exc!r}"
            else:
                reason = None
            gc.collect()
        if reason is not None:
            return reason
        self.client.loop_start()
        wait_until(lambda: self.is_connected or self.disconnects > 0, wait_s)
        if self.is_connected:
            return None
        return f"disconnected before a successful CONNACK (connack={self.connack})"

    def subscribe(self, topic: str, qos: int = 1, *, wait_s: float = 5.0) -> None:
        before = len(self.subscribed)
        self.client.subscribe(topic, qos)
        if not wait_until(lambda: len(self.subscribed) > before, wait_s):
            raise AssertionError(f"no SUBACK for {topic}")

    def publish_acked(self, topic: str, payload: bytes, *, retain: bool = False,
                      wait_s: float = 5.0) -> object:
        """Publish at QoS 1 and return the broker's PUBACK reason code (e.g. 135,
        "Not authorized", for a publish the ACL refuses)."""
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        if not wait_until(lambda: mid in self.pubacks, wait_s):
            raise AssertionError(f"no PUBACK for {topic}")
        with self._lock:
            return self.pubacks.pop(mid)  # popped: paho reuses message ids

    def received(self, topic: str) -> list[bytes]:
        with self._lock:
            return [payload for t, payload, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> MqttProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
