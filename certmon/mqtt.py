"""The MQTT transport: the only module in certmon that imports paho.

Owns one long-lived connection (`MqttLink`): TLS/mTLS set-up, MQTT v5 with a v3.1.1
fallback, the will message, capped exponential reconnect back-off with jitter,
re-subscription on every connect, publish confirmations (PUBACK, not `publish()`
returning), and the broker certificate chain seen on the link's own TLS session.
Paho's callbacks run on its network thread; this module turns them into plain
Python callables and never lets an exception escape into paho. It knows nothing
about statuses, spools or findings.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .errors import TransportError

log = logging.getLogger("certmon.mqtt")


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class LinkSettings:
    host: str
    port: int
    client_id: str
    is_tls: bool = True
    ca_bundle: str | None = None
    cert: str | None = None
    key: str | None = None
    alpn: tuple[str, ...] = ()
    # TLS SNI and the name the broker certificate must carry, when it is not `host`
    # (a broker reached by IP address, or through a load balancer's name).
    servername: str | None = None
    keepalive_s: int = 60
    protocol: str = "v5"  # "v5" or "v311"
    will: Will | None = None
    # False: never set the retain flag (nor on the will), for a broker with retained
    # messages off: Mosquitto's `retain_available false` disconnects a client that
    # sets it and refuses a retained will. A v5 CONNACK saying "Retain Available: 0"
    # has the same effect on publishes by itself (LinkState.is_retain_available).
    retain: bool = True
    clean_start: bool = True
    # MQTT v5: how long the broker keeps the session (subscriptions and queued QoS 1
    # messages) after a disconnect. With clean_start False, a restarted collector
    # receives what was published while it was down.
    session_expiry_s: int = 0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 120.0
    # How many QoS 1 publishes may wait for PUBACK at once. Several in flight keep
    # throughput up; the broker keeps one client's QoS 1 messages in order anyway.
    max_inflight: int = 20
    # Acknowledge received QoS 1 messages only when the application says so (`ack`):
    # the collector acks after its store committed, so a crash in between means the
    # broker delivers again (at least once) instead of the message being lost.
    manual_ack: bool = False


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    retained: bool
    qos: int
    user_properties: tuple[tuple[str, str], ...] = ()
    received_mono_s: float = 0.0
    mid: int = 0  # for `MqttLink.ack` when the link acknowledges manually
    dup: bool = False  # the broker re-sends it (an earlier delivery was not acknowledged)
    # Wall-clock arrival, stamped by the receiver's inbox (the link has no wall clock):
    # a message processed late, after a store outage, keeps the time it arrived.
    received_at: datetime | None = None
    # Which connection of the link delivered it (`LinkState.connects` then): packet
    # ids are per connection, so an ack must never reach a later one.
    connection: int = 0


@dataclass
class LinkState:
    """What the link knows about its connection, for status reports and tests."""

    is_connected: bool = False
    connects: int = 0
    last_error: str | None = None
    # DER of the broker's certificates as presented on this link's TLS session, leaf
    # first. On Python < 3.13 the stdlib exposes only the leaf; callers complete the
    # chain with certmon.tlsprobe and check the leaf fingerprint matches.
    peer_chain_der: tuple[bytes, ...] = ()
    tls_version: str | None = None
    connack_reason: str | None = None
    protocol: str = "v5"
    # The broker answered an MQTT v5 CONNECT with "unsupported protocol version": the
    # owner should rebuild the link with protocol "v311" (the fallback).
    protocol_refused: bool = False
    # The broker's v5 CONNACK said "Retain Available: 0": publishes go unretained.
    is_retain_available: bool = True
    subscriptions: dict[str, int] = field(default_factory=dict)


FAIL_LOG_EVERY_S = 600.0


class MqttLink:
    """One MQTT connection that keeps itself up in paho's network thread."""

    def __init__(
        self,
        settings: LinkSettings,
        *,
        on_message: Callable[[Incoming], None] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_published: Callable[[int, bool], None] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.settings = settings
        self.state = LinkState(protocol=settings.protocol)
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_published = on_published
        self._monotonic = monotonic or time.monotonic
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._client = self._new_client(settings.protocol)
        self._started = False
        self._random = random.Random()  # noqa: S311 - jitter, not cryptography
        self._fail_logged_at: float | None = None  # monotonic; None: connected since

    # ------------------------------------------------------------------ set-up

    def _new_client(self, protocol: str) -> paho.Client:
        s = self.settings
        version = paho.MQTTv5 if protocol == "v5" else paho.MQTTv311
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=version,
            clean_session=None if version == paho.MQTTv5 else s.clean_start,
        )
        # paho's own log only with -v (DEBUG): at other levels it reports routine
        # events (a disconnect of an unconnected client at shutdown) as errors.
        if log.isEnabledFor(logging.DEBUG):
            client.enable_logger(logging.getLogger("certmon.mqtt.paho"))
        client.max_inflight_messages_set(s.max_inflight)
        client.manual_ack_set(s.manual_ack)
        # paho keeps unacknowledged QoS 1 messages and re-sends them after a reconnect.
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(int(s.reconnect_min_s), int(s.reconnect_max_s))
        if s.is_tls:
            client.tls_set_context(self._tls_context())
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, qos=s.will.qos,
                            retain=s.will.retain and s.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_socket_open = self._handle_socket_open
        client.on_connect_fail = self._handle_connect_fail
        return client

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        ctx = _ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and hostname
        ctx.servername = s.servername
        try:
            if s.ca_bundle:
                ctx.load_verify_locations(cafile=s.ca_bundle)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot load CA bundle {s.ca_bundle}: {exc}") from exc
        if s.cert is not None:
            try:
                ctx.load_cert_chain(s.cert, s.key)
            except (OSError, ssl.SSLError) as exc:
                # The message names the file, never its content.
                raise TransportError(f"cannot load client certificate {s.cert}: {exc}") from exc
        if s.alpn:
            ctx.set_alpn_protocols(list(s.alpn))
        return ctx

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Connect in the background; paho's thread keeps reconnecting with back-off."""
        if self._started:
            return
        self._started = True
        s = self.settings
        props = None
        if s.protocol == "v5" and s.session_expiry_s:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry_s
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s,
                                   clean_start=s.clean_start if s.protocol == "v5"
                                   else paho.MQTT_CLEAN_START_FIRST_ONLY,
                                   properties=props)
        self._client.loop_start()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def stop(self, final: Sequence[tuple[str, bytes, bool]] = (), timeout_s: float = 5.0) -> None:
        """Publish `final` messages (topic, payload, retain) with QoS 1, wait for their
        PUBACKs, then DISCONNECT cleanly (so the broker does not fire the will)."""
        if not self._started:
            return
        infos = []
        if self.is_connected:
            for topic, payload, retain in final:
                infos.append(self._client.publish(topic, payload, qos=1,
                                                  retain=retain and self._may_retain()))
            for info in infos:
                try:
                    info.wait_for_publish(timeout_s)
                except (RuntimeError, ValueError):
                    break
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False
        self._connected.clear()
        self.state.is_connected = False

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and again after every reconnect."""
        with self._lock:
            self.state.subscriptions[topic_filter] = qos
        if self.is_connected:
            self._client.subscribe(topic_filter, qos)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Hand a message to paho; returns its mid. Confirmation arrives through
        `on_published(mid)` on PUBACK. Raises TransportError when not connected, so
        callers keep the message (the agent's spool) instead of trusting paho's queue."""
        if not self.is_connected:
            raise TransportError("not connected")
        props = None
        if self.settings.protocol == "v5" and (expiry_s or user_properties):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if expiry_s:
                props.MessageExpiryInterval = int(expiry_s)
            if user_properties:
                props.UserProperty = list(user_properties)
        info = self._client.publish(topic, payload, qos=qos, retain=retain and self._may_retain(),
                                    properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return int(info.mid)

    def ack(self, messages: Sequence[Incoming]) -> None:
        """PUBACK these messages (manual_ack links), in the order they arrived, as MQTT
        requires. A message from an earlier connection is not acked: the broker
        re-sends it on the new one (a duplicate, which the replay check absorbs)."""
        if not self.settings.manual_ack:
            return
        current = self.state.connects
        for msg in messages:
            # After a reconnect the broker re-sends what was not acknowledged, under
            # packet ids it may since have given to other messages: acking the old
            # delivery's id would acknowledge one that is not stored yet.
            if msg.qos > 0 and msg.connection == current:
                self._client.ack(msg.mid, msg.qos)

    # ------------------------------------------------------------------ callbacks

    def _handle_socket_open(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        if isinstance(sock, ssl.SSLSocket):
            chain: tuple[bytes, ...] = ()
            getter = getattr(sock, "get_unverified_chain", None)  # Python >= 3.13
            # 3.10-3.12 have it on the private _sslobj, returning _ssl.Certificate: the
            # whole presented chain of our own session, with no second handshake.
            private = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
            try:
                if getter is not None:
                    chain = tuple(getter())
                elif private is not None:
                    der = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
                    chain = tuple(c.public_bytes(der) for c in private() or ())
                else:
                    leaf = sock.getpeercert(binary_form=True)
                    chain = (leaf,) if leaf else ()
            except (ValueError, OSError, ssl.SSLError):
                chain = ()
            self.state.peer_chain_der = chain
            self.state.tls_version = sock.version()

    def _may_retain(self) -> bool:
        return self.settings.retain and self.state.is_retain_available

    def _handle_connect(self, client: paho.Client, _u: Any, _flags: Any,
                        reason: ReasonCode, props: Any) -> None:
        self.state.connack_reason = str(reason)
        self.state.is_retain_available = getattr(props, "RetainAvailable", 1) != 0
        if reason.is_failure:
            self.state.last_error = f"broker refused the connection: {reason}"
            # 132 in v5 terms; a v3.1.1-only broker answers its own "1, unacceptable
            # protocol version", which paho reads as exactly this reason code.
            if self.settings.protocol == "v5" and getattr(reason, "value", None) == 132:
                self.state.protocol_refused = True
                self._call(self._on_disconnect, "protocol refused")
            log.warning("broker %s:%s refused the connection: %s",
                        self.settings.host, self.settings.port, reason)
            return
        self.state.connects += 1
        self.state.is_connected = True
        self.state.last_error = None
        self._fail_logged_at = None
        client.reconnect_delay_set(int(self.settings.reconnect_min_s),
                                   int(self.settings.reconnect_max_s))
        with self._lock:
            subs = list(self.state.subscriptions.items())
        for topic_filter, qos in subs:
            client.subscribe(topic_filter, qos)
        self._connected.set()
        self._call(self._on_connect)

    def _handle_disconnect(self, client: paho.Client, _u: Any, _flags: Any,
                           reason: ReasonCode, _props: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self.state.is_connected = False
        if reason.is_failure or was_connected:
            self.state.last_error = f"disconnected: {reason}"
        self._jitter_backoff(client)
        if was_connected:
            self._call(self._on_disconnect, str(reason))

    def _handle_connect_fail(self, client: paho.Client, _u: Any) -> None:
        self.state.last_error = self.state.last_error or "connect failed"
        # A service that cannot reach its broker says so at once, then every ten
        # minutes while it lasts (paho retries far more often than anyone reads).
        now = self._monotonic()
        if self._fail_logged_at is None or now - self._fail_logged_at >= FAIL_LOG_EVERY_S:
            self._fail_logged_at = now
            log.warning("cannot connect to broker %s:%s (%s); retrying",
                        self.settings.host, self.settings.port, self.state.last_error)
        self._jitter_backoff(client)

    def _jitter_backoff(self, client: paho.Client) -> None:
        # paho doubles its delay from min to max; a random minimum spreads a fleet
        # that lost its broker at the same instant over time instead of a thundering
        # herd of reconnects when it comes back.
        low = self.settings.reconnect_min_s
        jittered = low + self._random.uniform(0, low)
        client.reconnect_delay_set(max(1, round(jittered)), int(self.settings.reconnect_max_s))

    def _handle_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user_props = tuple(getattr(props, "UserProperty", ()) or ())
        incoming = Incoming(msg.topic, bytes(msg.payload), bool(msg.retain), int(msg.qos),
                            tuple((str(k), str(v)) for k, v in user_props),
                            self._monotonic(), int(msg.mid), bool(msg.dup),
                            connection=self.state.connects)
        self._call(self._on_message, incoming)

    def _handle_publish(self, _c: paho.Client, _u: Any, mid: int,
                        reason: ReasonCode, _props: Any) -> None:
        if reason.is_failure:
            # e.g. 135 "Not authorized": the broker's ACL refused the topic. Resending
            # cannot help; the caller decides what a refused message means.
            log.warning("broker refused publish mid=%s: %s", mid, reason)
            self.state.last_error = f"publish refused: {reason}"
        self._call(self._on_published, mid, not reason.is_failure)

    def _call(self, func: Callable[..., None] | None, *args: Any) -> None:
        if func is None:
            return
        try:
            func(*args)
        except Exception:  # never let a callback kill paho's network thread
            log.exception("certmon callback %s failed", getattr(func, "__name__", func))


class _ServerNameContext(ssl.SSLContext):
    """paho passes its connect host as server_hostname; this context sends the
    configured name instead (SNI and the hostname check), when there is one."""

    servername: str | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if self.servername:
            kwargs["server_hostname"] = self.servername
        return super().wrap_socket(sock, *args, **kwargs)
