"""The collector's inbox: received messages, in order, until the store has them.

Owns the bounded FIFO between paho's network thread and the ingest worker: `put`
stamps each message with its arrival instant (`Incoming.received_at`, the received
time the store keeps, so a backlog keeps true times) and blocks while the backlog is
full; `take` hands the worker the next batch, which stays counted here until `done`
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
import dataclasses
import threading
import time
from collections.abc import Callable
from datetime import datetime

from certmon.mqtt import Incoming

__all__ = ["INBOX_MAX", "Backlog"]

INBOX_MAX = 20_000


class Backlog:
    def __init__(self, now: Callable[[], datetime], maxlen: int = INBOX_MAX) -> None:
        self._now = now
        self._max = maxlen
        self._items: collections.deque[Incoming] = collections.deque()
        self._taken = 0  # items at the head handed out by `take`, not yet `done`
        self._cond = threading.Condition()
        self._closed = False

    def put(self, msg: Incoming) -> None:
        """Append (paho's thread). Waits while full; after `close` the message is left
        unacknowledged for the broker to deliver again."""
        if msg.received_at is None:
            msg = dataclasses.replace(msg, received_at=self._now())
        with self._cond:
            while len(self._items) >= self._max and not self._closed:
                self._cond.wait()
            if self._closed:
                return
            self._items.append(msg)
            self._cond.notify_all()

    def take(self, max_n: int, wait_s: float, linger_s: float, linger_below: int = 8
             ) -> list[Incoming]:
        """The next messages after those already taken: waits up to `wait_s` for a first
        one, then up to `linger_s` more while fewer than `linger_below` are there (a few
        ms of latency buys the store fewer, larger transactions)."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while len(self._items) <= self._taken and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            linger_end = time.monotonic() + linger_s
            while (len(self._items) - self._taken < linger_below and not self._closed
                   and (left := linger_end - time.monotonic()) > 0):
                self._cond.wait(left)
            start = self._taken
            batch = [self._items[i] for i in
                     range(start, min(len(self._items), start + max_n))]
            self._taken += len(batch)
            return batch

    def done(self, n: int) -> None:
        """The first `n` taken messages are stored and acknowledged: forget them."""
        with self._cond:
            for _ in range(min(n, self._taken)):
                self._items.popleft()
            self._taken -= min(n, self._taken)
            self._cond.notify_all()

    def oldest_at(self) -> datetime | None:
        """Arrival of the oldest message not yet stored (None: nothing waits)."""
        with self._cond:
            return self._items[0].received_at if self._items else None

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        """Stop: wake a waiting `put` (paho's thread must be able to stop) and `take`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
