"""The agent's MQTT link across its life, and what the collector says on it.

Owns building the link from its `LinkSettings` (`agent.linkplan` derives them from the
config: the retained offline will), rebuilding it when the client certificate is
renewed (a clean DISCONNECT, so the will does not fire for a planned switch), the
one-way fallback to MQTT 3.1.1 when a broker refuses v5, the link's callbacks
(connect, disconnect, the collector's time beacon, kept as `read_beacon` makes it)
and "a new session started", which the service answers by re-asserting its retained
topics.
Must not: publish statuses or side topics (`agent.delivery`), judge the broker chain
(`agent.status`), or log key material: only paths and fingerprints. It imports
neither cryptography nor the wire format: the resident half of `run`
(`agent.resident`) holds it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from certmon.errors import TransportError
from certmon.mqtt import Incoming, LinkSettings, MqttLink

log = logging.getLogger("certmon.agent")

B = TypeVar("B")


class Uplink(Generic[B]):
    """The current link (None until built, or while the files do not allow one)."""

    def __init__(self, *, monotonic: Callable[[], float], wake: Callable[[], None],
                 on_published: Callable[[int, bool], None],
                 on_replaced: Callable[[], None],
                 read_beacon: Callable[[bytes, float], B | None]) -> None:
        self.link: MqttLink | None = None
        self.beacon: B | None = None  # the last live beacon heard (None: not one valid)
        self._read_beacon = read_beacon
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

    def ensure(self, client_sha: str | None, settings_for: Callable[[], LinkSettings],
               beacon_topic: str) -> bool:
        """Keep the link, or (re)build it for this client certificate (`client_sha`,
        its SHA-256); True when it was rebuilt (or its rebuild failed: then `link` is
        None and the error is logged). `settings_for` is asked only when a link is
        built."""
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
        settings = settings_for()
        if self._protocol is not None:
            settings = dataclasses.replace(settings, protocol=self._protocol)
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
        self._beacon_topic = beacon_topic
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
        beacon = self._read_beacon(msg.payload, msg.received_mono_s)
        if beacon is not None:
            self.beacon = beacon
