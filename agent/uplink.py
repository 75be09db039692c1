"""The agent's MQTT link across its life, and what the collector says on it.

Owns building the link from the config and the device's files (`LinkSettings` with the
retained offline will), rebuilding it when the client certificate is renewed (a clean
DISCONNECT, so the will does not fire for a planned switch), the one-way fallback to
MQTT 3.1.1 when a broker refuses v5, the link's callbacks (connect, disconnect, the
collector's time beacon) and "a new session started", which the service answers by
re-asserting its retained topics.
Must not: publish statuses or side topics (`agent.delivery`), judge the broker chain
(`agent.status`), or log key material: only paths and fingerprints.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from certmon import wire as p
from certmon.errors import ProtocolError, TransportError
from certmon.mqtt import Incoming, LinkSettings, MqttLink, Will

from .certstore import DeviceMaterial
from .config import AgentConfig

log = logging.getLogger("certmon.agent")


class Uplink:
    """The current link (None until built, or while the files do not allow one)."""

    def __init__(self, *, monotonic: Callable[[], float], wake: Callable[[], None],
                 on_published: Callable[[int, bool], None],
                 on_replaced: Callable[[], None]) -> None:
        self.link: MqttLink | None = None
        self.beacon: p.BeaconEcho | None = None  # the last live beacon heard
        self._monotonic = monotonic
        self._wake = wake
        self._on_published = on_published
        self._on_replaced = on_replaced
        self._cert_sha: str | None = None
        self._protocol: str | None = None  # "v311" once a broker refused v5
        self._beacon_topic = ""
        self._just_connected = threading.Event()

    @property
    def is_protocol_refused(self) -> bool:
        return self.link is not None and self.link.state.protocol_refused

    def ensure(self, config: AgentConfig, material: DeviceMaterial,
               identify: Callable[[DeviceMaterial], str]) -> bool:
        """Keep the link, or (re)build it for this material; True when it was rebuilt
        (or its rebuild failed: then `link` is None and the error is logged).
        `identify` gives the device id, asked only when a link is built."""
        client = material.client
        client_sha = client.certs[0].facts.sha256 if client and client.certs else None
        refused = self.is_protocol_refused
        if self.link is not None and client_sha == self._cert_sha and not refused:
            return False
        if self.link is not None:
            if refused:
                # An MQTT 3.1.1 broker: the documented fallback, for this process's life.
                log.warning("the broker does not speak MQTT v5: falling back to MQTT 3.1.1")
                self._protocol = "v311"
            else:
                # A renewed certificate: reconnect with it, no restart needed.
                log.info("client certificate changed (now %s): reconnecting with it",
                         client_sha)
            self.link.stop()
            self._on_replaced()
        device_id = identify(material)
        mqtt, prefix = config.mqtt, config.agent.topic_prefix
        settings = LinkSettings(
            host=mqtt.host, port=mqtt.port, client_id=mqtt.client_id or f"certmon-{device_id}",
            is_tls=mqtt.is_tls, ca_bundle=str(config.tls.ca_bundle),
            cert=str(config.tls.cert), key=str(config.tls.key), alpn=mqtt.alpn,
            servername=mqtt.servername,
            keepalive_s=mqtt.keepalive_s, protocol=self._protocol or mqtt.protocol,
            will=Will(p.online_topic(prefix, device_id), p.online_payload(False), 1, True),
            retain=mqtt.retain,
        )
        try:
            link = MqttLink(settings, on_message=self._on_message, on_connect=self._on_connect,
                            on_disconnect=lambda _reason: self._wake(),
                            on_published=self._on_published, monotonic=self._monotonic)
        except TransportError as exc:
            # e.g. the key is unreadable: a finding in the status, a line in the log,
            # and statuses stay spooled until the files are fixed.
            log.error("cannot set up the MQTT link: %s", exc)
            self.link, self._cert_sha = None, None
            return True
        self._beacon_topic = p.beacon_topic(prefix)
        link.subscribe(self._beacon_topic, qos=0)
        link.start()
        self.link, self._cert_sha = link, client_sha
        return True

    def take_new_session(self) -> bool:
        """True once after each (re)connect."""
        if not self._just_connected.is_set():
            return False
        self._just_connected.clear()
        return True

    def stop(self, final: Sequence[tuple[str, bytes, bool]] = ()) -> None:
        """Publish `final` (topic, payload, retain), then DISCONNECT cleanly."""
        if self.link is not None:
            self.link.stop(final=final)
            self.link = None

    def _on_connect(self) -> None:
        self._just_connected.set()
        self._wake()

    def _on_message(self, msg: Incoming) -> None:
        if msg.topic != self._beacon_topic or msg.retained:
            return
        try:
            beacon = p.decode_message(p.Beacon, msg.payload, max_bytes=1024)
        except ProtocolError:
            return
        self.beacon = p.BeaconEcho(beacon_ts=beacon.ts, received_mono_s=msg.received_mono_s)
