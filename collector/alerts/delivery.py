"""Delivery to the human channels (log, MQTT, apprise): one worker thread per sink.

Owns a sink's bounded schedule of notifications, their retries and the sink's
counters. Every notification is retried on its own: a failed attempt is put back in
the schedule at `min(cap, base · 2ⁿ) · U(0.5, 1)` from now and the worker goes on
with the next one, so one notification the receiver refuses, or a receiver that is
down for a while, never holds back the notifications behind it. A retry whose key
has a newer notification since is dropped as superseded: sent late, it would put an
old state over the new one (a retained MQTT "firing" over its resolution).

Must not decide whether to notify (the engine does), format for a channel (each sink
does) or block the caller: `submit` only takes the schedule's lock.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from dataclasses import dataclass

from collector.alerts import Notification
from collector.alerts.sinks import Sink

__all__ = ["NotifyWorker", "SinkStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SinkStats:
    sent: int  # notifications delivered
    failed: int  # attempts that raised (a notification may fail, then be sent)
    dropped: int  # given up: schedule full, retries exhausted, or still due at close
    queued: int  # in the schedule: new, or waiting for a retry
    superseded: int = 0  # a retry not made: its key had a newer notification


@dataclass(frozen=True, slots=True)
class _Try:
    notification: Notification
    seq: int  # engine-wide order of notifications
    attempt: int  # attempts made so far


class NotifyWorker:
    """One sink's schedule and thread. A sink that hangs or fails only delays itself."""

    def __init__(self, name: str, sink: Sink, *, queue_size: int, max_attempts: int,
                 backoff_base_s: float, backoff_cap_s: float, rng: random.Random) -> None:
        self.name, self.sink = name, sink
        self._size, self._max_attempts = queue_size, max_attempts
        self._base_s, self._cap_s = backoff_base_s, backoff_cap_s
        self._rng = rng
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, _Try]] = []  # heap: (monotonic due, seq, try)
        self._latest: dict[str, int] = {}  # key → seq of its newest notification
        self._live: dict[str, int] = {}  # key → its notifications not yet done with
        self._closing = self._aborted = False
        self.sent = self.failed = self.dropped = self.superseded = 0
        self._thread = threading.Thread(target=self._run, name=f"alert-sink-{name}", daemon=True)
        self._thread.start()

    def submit(self, n: Notification, seq: int) -> None:
        with self._cond:
            if self._closing or len(self._due) >= self._size:
                self.dropped += 1
                log.warning("alert sink %s: queue full, dropped %s %s", self.name, n.status,
                            n.key)
                return
            self._latest[n.key] = seq
            self._live[n.key] = self._live.get(n.key, 0) + 1
            heapq.heappush(self._due, (time.monotonic(), seq, _Try(n, seq, 0)))
            self._cond.notify()

    def stats(self) -> SinkStats:
        with self._cond:
            return SinkStats(self.sent, self.failed, self.dropped, len(self._due),
                             self.superseded)

    def backoff_s(self, attempt: int) -> float:
        # Jitter spreads N collectors' retries against one recovering receiver.
        return min(self._cap_s, self._base_s * 2.0**attempt) * self._rng.uniform(0.5, 1.0)

    def _next(self) -> _Try | None:
        """The next try that is due, waiting for it; None: closed and nothing left."""
        with self._cond:
            while True:
                if self._aborted or (self._closing and not self._due):
                    return None
                if self._due and self._due[0][0] <= time.monotonic():
                    item = heapq.heappop(self._due)[2]
                    n = item.notification
                    if item.attempt and self._latest.get(n.key, item.seq) > item.seq:
                        self.superseded += 1
                        self._forget(item)
                        continue
                    return item
                self._cond.wait(self._due[0][0] - time.monotonic() if self._due else None)

    def _run(self) -> None:
        while (item := self._next()) is not None:
            n = item.notification
            try:
                self.sink.send(n)
            except Exception as exc:  # noqa: BLE001 - any sink failure is data, never fatal
                self._failed(item, exc)
            else:
                with self._cond:
                    self.sent += 1
                    self._forget(item)

    def _failed(self, item: _Try, exc: Exception) -> None:
        n, attempt = item.notification, item.attempt + 1
        log.warning("alert sink %s: attempt %d for %s failed: %s", self.name, attempt, n.key,
                    exc)
        with self._cond:
            self.failed += 1
            if attempt >= self._max_attempts or self._aborted:
                self.dropped += 1
                self._forget(item)
                log.error("alert sink %s: gave up on %s %s", self.name, n.status, n.key)
                return
            # Back in the schedule, behind whatever is due before it: the other
            # notifications go on meanwhile.
            due = time.monotonic() + self.backoff_s(item.attempt)
            heapq.heappush(self._due, (due, item.seq, _Try(n, item.seq, attempt)))

    def _forget(self, item: _Try) -> None:
        """Done with `item`: the key's entries go with its last notification, so the
        maps are bounded by what is scheduled, not by every key ever notified."""
        key = item.notification.key
        left = self._live.pop(key, 0) - 1  # 0 already: cleared when the close gave up
        if left > 0:
            self._live[key] = left
        else:
            self._latest.pop(key, None)

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Refuse new notifications; the worker delivers what is due, then stops."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def join(self, deadline: float) -> None:
        """Wait for the schedule to empty until `deadline` (monotonic), then give up
        on what is left (counted as dropped). A send in progress (an HTTP request up
        to its timeout) cannot be interrupted; the daemon thread is left to finish."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self.dropped += len(self._due)
            self._due.clear()
            self._latest.clear()
            self._live.clear()
            self._aborted = True
            self._cond.notify()
        self._thread.join(0.1)
