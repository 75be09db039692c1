"""The collector's inbox: received messages, in order, until the store has them.

Owns the bounded FIFO between paho's network thread and the ingest worker: `put`
stamps each message with its arrival instant (`Incoming.received_at`, the received
time the store keeps, so a backlog keeps true times) and blocks while the backlog is
full; `take` hands the worker the next batch, one message per device in turn (fairness:
one device's thousands do not sit in front of everyone), which stays counted here until `done`
(after the store committed it and it was acknowledged); `oldest_at` is the arrival of
the oldest message not yet stored, the ingest watermark silence is judged against.

The bound: at most `maxlen` messages, held ones included. When it is reached, paho's
thread waits in `put`, stops reading the socket, and TCP back-pressure reaches the
broker, which keeps the rest queued for the collector's session: nothing is dropped
here. In practice the broker's in-flight window (Mosquitto `max_inflight_messages`)
bounds it first, since nothing is acknowledged while the store is down.
Must not: look inside messages, acknowledge them (the service does) or read the clock
other than through the `now` it is given.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from certmon.mqtt import Incoming

__all__ = ["INBOX_MAX", "Backlog", "device_key"]

INBOX_MAX = 20_000


def device_key(msg: Incoming) -> str:
    """Whose message this is, from its topic alone: every device topic is
    <prefix>/<device>/<kind> (v1 and v2 alike), so all but the last level."""
    return msg.topic.rpartition("/")[0]


def _stamped(msg: Incoming, at: datetime) -> Incoming:
    # dataclasses.replace looks the fields up on every call; this runs per message on
    # paho's thread.
    return Incoming(msg.topic, msg.payload, msg.retained, msg.qos, msg.user_properties,
                    msg.received_mono_s, msg.mid, msg.dup, at, msg.connection)


class Backlog:
    """Waiting messages queued per device (per `key`), handed out round-robin: a
    device that sent thousands at once gets one place per turn like every other, so
    its backlog never sits in front of everyone else's. A device's own messages keep
    their order (its certificate before the status it signs)."""

    def __init__(self, now: Callable[[], datetime], maxlen: int = INBOX_MAX,
                 key: Callable[[Incoming], str] = device_key) -> None:
        self._now = now
        self._max = maxlen
        self._key = key
        # Insertion order is the round-robin order; a queue goes to the back after
        # its turn and away when empty.
        self._queues: collections.OrderedDict[str, collections.deque[Incoming]] = \
            collections.OrderedDict()
        self._queued = 0
        self._held: collections.deque[Incoming] = collections.deque()  # taken, not done
        self._cond = threading.Condition()
        self._closed = False
        # The worker waits in `take` for this many queued messages (0: not waiting).
        # `put` wakes it only when that is reached: a wake-up per message would cost
        # paho's thread a futex call each and hand the interpreter lock back and forth
        # (a sixth of that thread's time in a 60,000-status flood).
        self._wake_at = 0

    def _size(self) -> int:
        return self._queued + len(self._held)

    def put(self, msg: Incoming) -> None:
        """Append one message (see `put_many`)."""
        self.put_many((msg,))

    def put_many(self, msgs: Sequence[Incoming]) -> None:
        """Append each, in order, under one lock and at most one wake-up (the link hands
        over a batch at a time). Waits while full; after `close` the rest is left
        unacknowledged for the broker to deliver again."""
        if not msgs:
            return
        at = self._now()
        with self._cond:
            for msg in msgs:
                if msg.received_at is None:
                    msg = _stamped(msg, at)
                while self._size() >= self._max and not self._closed:
                    if self._wake_at and self._queued >= self._wake_at:
                        # What this call queued so far must reach the worker before
                        # waiting for the space only the worker can free.
                        self._wake_at = 0
                        self._cond.notify_all()
                    self._cond.wait()
                if self._closed:
                    return
                self._queues.setdefault(self._key(msg), collections.deque()).append(msg)
                self._queued += 1
            if self._wake_at and self._queued >= self._wake_at:
                self._wake_at = 0
                self._cond.notify()

    def take(self, max_n: int, wait_s: float, linger_s: float, linger_below: int = 8
             ) -> list[Incoming]:
        """The next messages after those already taken, one per device in turn: waits
        up to `wait_s` for a first one, then up to `linger_s` more while fewer than
        `linger_below` are there (a few ms of latency buys the store fewer, larger
        transactions)."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while not self._queued and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._wake_at = 1
                self._cond.wait(left)
            linger_end = time.monotonic() + linger_s
            while (self._queued < linger_below and not self._closed
                   and (left := linger_end - time.monotonic()) > 0):
                self._wake_at = linger_below
                self._cond.wait(left)
            self._wake_at = 0
            batch: list[Incoming] = []
            while self._queues and len(batch) < max_n:
                key, queue = next(iter(self._queues.items()))
                batch.append(queue.popleft())
                if queue:
                    self._queues.move_to_end(key)
                else:
                    del self._queues[key]
            self._queued -= len(batch)
            self._held.extend(batch)
            return batch

    def done(self, n: int) -> None:
        """The first `n` taken messages are stored and acknowledged: forget them."""
        with self._cond:
            for _ in range(min(n, len(self._held))):
                self._held.popleft()
            self._cond.notify_all()

    def oldest_at(self) -> datetime | None:
        """Arrival of the oldest message not yet stored (None: nothing waits): the
        silence horizon, so no device is judged silent while any message waits."""
        with self._cond:
            heads = [m.received_at for m in self._held if m.received_at is not None]
            heads += [q[0].received_at for q in self._queues.values()
                      if q[0].received_at is not None]
            return min(heads, default=None)

    def __len__(self) -> int:
        with self._cond:
            return self._size()

    def close(self) -> None:
        """Stop: wake a waiting `put` (paho's thread must be able to stop) and `take`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
