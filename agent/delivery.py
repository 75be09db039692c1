"""Store-and-forward delivery: spooled statuses confirmed by PUBACK, and the retained
side topics.

Owns the hand-off of a signed status to the spool (one the state directory cannot
hold is published live instead, and that is logged), what one cycle hands over
(`Outbox`: a spooled status or a heartbeat, and the side messages it brings; it may
come from another process, `agent.checker`), the in-flight map from MQTT
message ids to spooled files, PUBACK bookkeeping (a status is removed when the broker
accepts it; one its ACL refuses is dropped, counted and logged, since resending it
would block the spool forever), and the retained side messages (certificate chain,
trust-store inventory), each re-sent only when its content changes or a new session
starts. A PUBACKed status leaves the disk in the PUBACK callback itself, not at the
service's next wake-up: a process stopped (SIGTERM, `once` exiting) before then must
not find it in the spool and send it again (the collector would see a second copy).
Must not: build, judge or sign messages (`agent.service` hands them in), manage the
link's life (it is handed the current link), or read the clock except through the
injected `Clock`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certmon.clock import Clock
from certmon.errors import TransportError
from certmon.mqtt import MqttLink

from .spool import Spool

if TYPE_CHECKING:
    from .uplink import Uplink

log = logging.getLogger("certmon.agent")


@dataclass(frozen=True, slots=True)
class SideMessage:
    """A retained side message (cert chain, inventory) for its topic."""

    topic: str
    payload: bytes
    digest: str | None = None  # names the content when a fresh signature cannot


@dataclass(frozen=True, slots=True)
class Outbox:
    """What one cycle hands to delivery: its signed status (already in the spool, or
    to be published live when the spool could not take it) or its heartbeat, and the
    side messages to retain."""

    seq: int
    topic: str
    token: bytes
    is_heartbeat: bool = False
    is_spooled: bool = False
    expiry_s: int = 0  # a heartbeat's message expiry
    side: tuple[SideMessage, ...] = ()


def publish_retained(link: MqttLink | None, topic: str, payload: bytes) -> int | None:
    """Publish retained at QoS 1 when connected: the message id, or None (not sent)."""
    if link is None or not link.is_connected:
        return None
    try:
        return link.publish(topic, payload, qos=1, retain=True)
    except TransportError:
        return None


class Delivery:
    """What is waiting to reach the broker, and what it has confirmed."""

    def __init__(self, spool: Spool, clock: Clock) -> None:
        self.spool = spool
        self._clock = clock
        self.refused = 0  # statuses the broker refused (ACL): never deliverable
        self.last_ok_at: datetime | None = None
        self._acks: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()
        self._inflight: dict[int, Path] = {}
        # Retained side messages (cert chain, trust-store inventory) waiting for a
        # connection; each is re-sent only when its content changes.
        self._side: dict[str, bytes] = {}
        self._side_sent: dict[str, bytes] = {}
        self._side_digest: dict[str, str] = {}

    def on_published(self, mid: int, accepted: bool) -> None:
        """The link's PUBACK callback (its network thread). An accepted status's file
        goes at once; counters and the in-flight map are `drain_acks`'s (the
        service's thread), and so is a refused one's file: it stays until the refusal
        is counted (`once` exits 2 for it), and is only refused again if a stop comes
        first. No lock: paho calls this holding its own message lock, which `send`'s
        `publish` needs. A PUBACK that beats `send` recording its mid (loopback) finds
        no file here and is applied by the drain at the end of `send`."""
        path = self._inflight.get(mid)  # a single dict read: atomic under the GIL
        if path is not None and accepted:
            with contextlib.suppress(OSError):  # drain_acks tries again
                self.spool.remove(path)
        self._acks.put((mid, accepted))

    def forget_inflight(self) -> None:
        """The link was replaced: the old one's message ids will never be acknowledged.
        Its PUBACKs received so far are applied first (its network thread has
        stopped): left queued, they would match the new link's ids, which restart at
        1, and remove statuses it has not delivered."""
        self.drain_acks(None)
        self._inflight.clear()

    def spool_status(self, seq: int, topic: str, token: bytes) -> bool:
        """Put the status in the spool; False (logged) when the spool cannot take it."""
        try:
            self.spool.append(seq, topic, token)
        except OSError as exc:
            # Read-only or full state directory: keep reporting live (`hand_over`),
            # lose only the store-and-forward guarantee, and say so.
            log.error("cannot spool status seq=%s in %s: %s", seq, self.spool.dir,
                      exc.strerror or exc)
            return False
        return True

    def hand_over(self, outbox: Outbox, link: MqttLink | None) -> None:
        """Take one cycle's messages. A heartbeat is published at once, not retained
        and not spooled: one lost to a dropped link says nothing the next report will
        not. A status the spool could not take is published live."""
        if outbox.is_heartbeat:
            try:
                if link is None:
                    raise TransportError("no link")
                link.publish(outbox.topic, outbox.token, qos=1, retain=False,
                             expiry_s=outbox.expiry_s)
            except TransportError as exc:
                log.warning("heartbeat seq=%s not sent (%s): the next report goes out as "
                            "usual", outbox.seq, exc)
            return
        if not outbox.is_spooled:
            publish_retained(link, outbox.topic, outbox.token)
        for side in outbox.side:
            self.retain(side.topic, side.payload, digest=side.digest)

    def retain(self, topic: str, payload: bytes, *, digest: str | None = None) -> None:
        """Keep `payload` as the side message for `topic`; `digest` names its content
        for `retained_digest` when the payload itself (a fresh signature) cannot."""
        self._side[topic] = payload
        if digest is not None:
            self._side_digest[topic] = digest

    def retained_digest(self, topic: str) -> str | None:
        return self._side_digest.get(topic)

    def new_session(self) -> None:
        """A new broker session: every retained side topic is asserted again."""
        self._side_sent.clear()

    def send(self, link: MqttLink, expiry_s: int) -> None:
        """Hand changed side messages and the spooled statuses not yet in flight to the
        link, in order; a status expires on the broker after `expiry_s`."""
        for topic, payload in list(self._side.items()):
            if self._side_sent.get(topic) != payload and publish_retained(link, topic, payload):
                self._side_sent[topic] = payload
        in_flight = set(self._inflight.values())
        for msg in self.spool.pending():
            if msg.path in in_flight:
                continue
            try:
                mid = link.publish(msg.topic, msg.payload, qos=1, retain=True, expiry_s=expiry_s)
            except TransportError:
                break
            self._inflight[mid] = msg.path
        self.drain_acks(link)  # PUBACKs that arrived before their mid was recorded

    def flush(self, uplink: Uplink[Any], *, online: tuple[str, bytes] | None, expiry_s: int,
              rebuild: Callable[[], None]) -> None:
        """Hand spooled messages to the link in order; forget those PUBACKed. After a
        refused v5 CONNECT `rebuild` builds the link again (the uplink falls back to
        MQTT 3.1.1); a new session re-asserts the retained side topics and `online`
        (topic, payload)."""
        self.drain_acks(uplink.link)
        if uplink.is_protocol_refused:
            rebuild()
        link = uplink.link
        if link is None or not link.is_connected:
            return
        if uplink.take_new_session():
            self.new_session()
            if online is not None:
                publish_retained(link, *online)
        self.send(link, expiry_s=expiry_s)

    def drain_acks(self, link: MqttLink | None) -> int:
        """Apply the PUBACKs received so far; `link` only names the error in the log."""
        done = 0
        while True:
            try:
                mid, accepted = self._acks.get_nowait()
            except queue.Empty:
                return done
            path = self._inflight.pop(mid, None)
            if path is None:
                continue
            self.spool.remove(path)
            done += 1
            if accepted:
                self.last_ok_at = self._clock.now()
            else:
                self.refused += 1
                log.error("broker refused status %s (%s): check the broker ACL and the "
                          "device id", path.name, link.state.last_error if link
                          else "no link")
