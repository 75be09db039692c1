"""The Alertmanager feed: one receiver's view of the active alerts, posted as Prometheus does.

Owns, per Alertmanager receiver (a `webhook_urls` entry): the alerts it must hold
(firing, by label set) and the resolutions it must still be told, the worker thread
that posts them, batching, backoff and the receiver's counters. Alertmanager keeps
alerts in memory only, so a claim made once is lost with its restart; like
Prometheus (`--rules.alert.resend-delay`), the feed re-posts the *whole* active set
every resend interval in one POST, each firing alert with `endsAt = now + 4 ×
resend interval`, so a restarted or recovered Alertmanager has every alert back
within one interval, and one that stops hearing from us (collector gone) resolves
them by itself within four.

- A new firing, a severity change or a resolution is posted at once (only what
  changed), then rides the cycle.
- A resolution (`endsAt` = when it resolved) is re-posted every cycle until it was
  delivered *and* four intervals have passed: a stale firing claim that another
  collector posted just before (or a snapshot read racing the resolve) ends within
  one cycle instead of standing until its `endsAt`. A firing of the same label set
  that is newer (engine order, `seq`) supersedes it.
- A failed POST is retried with capped backoff, and each cycle tries again at once,
  whatever the backoff: a receiver that comes back gets everything within one
  interval. A receiver that refuses a batch's *content* (`ReceiverRejected`) gets it
  split in halves until the offending alert is alone; that one is dropped (counted)
  until it changes, the others are delivered.

Must not read the store or the clock directly (the engine hands it the active set
and a clock) and must not block the caller: `update` and `cycle` only take a lock.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from collector.alerts import AlertmanagerAlert, Notification, ReceiverRejected
from collector.alerts.sinks import AlertmanagerSink

__all__ = ["HORIZON_INTERVALS", "AlertmanagerFeed", "FeedStats"]

log = logging.getLogger(__name__)

# endsAt of a firing alert, and how long a resolution is re-posted, in resend
# intervals: Prometheus's 4 × max(evaluation interval, resend delay).
HORIZON_INTERVALS = 4

LabelSet = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class FeedStats:
    posts: int  # POSTs the receiver accepted
    failed: int  # POSTs that failed (connection, timeout, non-2xx)
    alerts_sent: int  # alerts in accepted POSTs (one alert is re-sent every cycle)
    rejected: int  # alerts the receiver refused on their own (dropped until they change)
    dropped: int  # resolutions given up: over the cap, or still undelivered at close
    firing: int  # label sets held as firing
    resolving: int  # resolutions still to be re-posted
    last_delivered_at: datetime | None  # wall clock of the last accepted POST


@dataclass(slots=True)
class _Entry:
    labels: Mapping[str, str]
    summary: str
    starts_at: datetime
    generator_url: str | None
    seq: int  # engine order of the news this entry stands for
    resolved_at: datetime | None = None  # None: firing
    delivered: bool = False
    rejected: bool = False

    def same_alert(self, other: _Entry) -> bool:
        return (self.resolved_at is None and other.resolved_at is None
                and (self.summary, self.starts_at, self.generator_url)
                == (other.summary, other.starts_at, other.generator_url))


def label_set(labels: Mapping[str, str]) -> LabelSet:
    """Alertmanager's identity of an alert: its label set."""
    return tuple(sorted(labels.items()))


class AlertmanagerFeed:
    """One receiver's alerts and its worker thread."""

    def __init__(self, name: str, sink: AlertmanagerSink, *, resend_interval_s: float,
                 clock: Callable[[], datetime], max_resolving: int = 1000,
                 backoff_base_s: float = 1.0, backoff_cap_s: float = 300.0,
                 rng: random.Random | None = None) -> None:
        self.name, self.sink = name, sink
        self._horizon = timedelta(seconds=HORIZON_INTERVALS * resend_interval_s)
        self._clock = clock
        self._max_resolving = max_resolving
        # The cycle retries anyway: a backoff longer than the interval would only wait.
        self._base_s, self._cap_s = backoff_base_s, min(backoff_cap_s, resend_interval_s)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._cond = threading.Condition()
        self._entries: dict[LabelSet, _Entry] = {}
        self._urgent: set[LabelSet] = set()  # changed: post now, not at the next cycle
        self._full_due = False
        self._retry_at = 0.0  # monotonic; no POST before it (backoff)
        self._attempt = 0  # consecutive failed POSTs
        self._cycles = 0  # cycles so far: one that came during a failed POST cancels its backoff
        self._closing = self._aborted = False
        self.posts = self.failed = self.alerts_sent = self.rejected = self.dropped = 0
        self.last_delivered_at: datetime | None = None
        self._thread = threading.Thread(target=self._run, name=f"alert-feed-{name}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ news

    def update(self, n: Notification, seq: int) -> None:
        """A notification from the lifecycle; `seq` orders it against snapshots."""
        entries = []
        if n.replaces_labels is not None:  # severity change: the old label set ends
            entries.append(_Entry(n.replaces_labels, n.summary, n.starts_at,
                                  n.generator_url, seq, resolved_at=n.at))
        entries.append(_Entry(n.labels, n.summary, n.starts_at, n.generator_url, seq,
                              resolved_at=(n.ends_at or n.at) if n.status == "resolved"
                              else None))
        with self._cond:
            for e in entries:
                if self._merge(e) and n.reason != "repeat":  # a repeat rides the cycle
                    self._urgent.add(label_set(e.labels))
            self._cond.notify()

    def cycle(self, active: Sequence[Notification] | None, seq: int, now: datetime) -> None:
        """The resend cycle: `active` is the store's firing set as read *after* `seq`
        was taken (None: the read failed; post what is held). Everything held is
        posted now, backoff or not."""
        with self._cond:
            if active is not None:
                wanted = set()
                for n in active:
                    e = _Entry(n.labels, n.summary, n.starts_at, n.generator_url, seq)
                    wanted.add(label_set(e.labels))
                    self._merge(e)
                for ls, e in list(self._entries.items()):
                    # Firing before the read began and not in it: resolved by someone
                    # (who posts the resolution) or never stored (a test alert).
                    if e.resolved_at is None and e.seq < seq and ls not in wanted:
                        del self._entries[ls]
                        self._urgent.discard(ls)
            self._prune_resolutions(now)
            self._full_due = True
            self._retry_at = 0.0
            self._cycles += 1
            self._cond.notify()

    def _merge(self, new: _Entry) -> bool:
        """Hold `new` unless what is held is newer news; True if it changed anything."""
        ls = label_set(new.labels)
        old = self._entries.get(ls)
        if old is not None and old.seq > new.seq:
            return False
        if old is not None and old.same_alert(new):
            old.seq = new.seq  # unchanged: keep delivered/rejected
            return False
        self._entries[ls] = new
        return True

    def _prune_resolutions(self, now: datetime) -> None:
        """Forget resolutions delivered and older than the horizon; past the cap, the
        oldest go (counted if never delivered: Alertmanager ends those by endsAt)."""
        resolving = sorted((e.resolved_at, ls) for ls, e in self._entries.items()
                           if e.resolved_at is not None)
        kept = []
        for resolved_at, ls in resolving:
            if self._entries[ls].delivered and now - resolved_at >= self._horizon:
                del self._entries[ls]
            else:
                kept.append(ls)
        for ls in kept[:max(0, len(kept) - self._max_resolving)]:
            if not self._entries.pop(ls).delivered:
                self.dropped += 1
            self._urgent.discard(ls)

    def stats(self) -> FeedStats:
        with self._cond:
            resolving = sum(1 for e in self._entries.values() if e.resolved_at is not None)
            return FeedStats(self.posts, self.failed, self.alerts_sent, self.rejected,
                             self.dropped, len(self._entries) - resolving, resolving,
                             self.last_delivered_at)

    # ------------------------------------------------------------------ the worker

    def _take(self) -> tuple[list[_Entry], set[LabelSet], bool, int] | None:
        """Wait until a POST is due; what to post (and what was taken, to restore)."""
        with self._cond:
            while True:
                if self._aborted or (self._closing and not self._urgent):
                    return None
                pending = self._urgent or (self._full_due and not self._closing)
                wait_s = self._retry_at - time.monotonic()
                if pending and wait_s <= 0:
                    break
                self._cond.wait(wait_s if pending else None)
            full, urgent = self._full_due and not self._closing, self._urgent
            self._full_due, self._urgent = False, set()
            keys = self._entries.keys() if full else urgent
            batch = [self._entries[ls] for ls in keys if ls in self._entries]
            return [e for e in batch if not e.rejected], urgent, full, self._cycles

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            batch, urgent, full, cycles = taken
            if not batch:  # nothing held (no alert fires): Prometheus posts nothing either
                continue
            now = self._clock()
            delivered, rejected, error = self._post(batch, now)
            with self._cond:
                for e in delivered:
                    e.delivered = True
                for e in rejected:
                    e.rejected = True
                self.rejected += len(rejected)
                if error is None:
                    if self._attempt:
                        log.info("alertmanager %s: delivering again after %d failed POSTs",
                                 self.name, self._attempt)
                    self._attempt, self._retry_at = 0, 0.0
                    self.last_delivered_at = now
                    continue
                self.failed += 1
                self._urgent |= {ls for ls in urgent if ls in self._entries}
                self._full_due |= full
                if cycles == self._cycles:
                    self._retry_at = time.monotonic() + self._backoff_s(self._attempt)
                self._attempt += 1
            (log.warning if self._attempt == 1 else log.debug)(
                "alertmanager %s: POST of %d alerts failed (attempt %d): %s",
                self.name, len(batch), self._attempt, error)

    def _backoff_s(self, attempt: int) -> float:
        return min(self._cap_s, self._base_s * 2.0**attempt) * self._rng.uniform(0.5, 1.0)

    def _post(self, batch: list[_Entry], now: datetime
              ) -> tuple[list[_Entry], list[_Entry], Exception | None]:
        """POST `batch`; on a content refusal, halves until the bad alert is alone.
        Returns (delivered, rejected, the error that stopped it)."""
        try:
            self.sink.post_alerts([self._wire(e, now) for e in batch])
        except ReceiverRejected as exc:
            if len(batch) == 1:
                log.warning("alertmanager %s: refused alert %s: %s", self.name,
                            dict(batch[0].labels), exc)
                return [], batch, None
            half = len(batch) // 2
            ok, bad, err = self._post(batch[:half], now)
            if err is None:
                ok2, bad2, err = self._post(batch[half:], now)
                ok, bad = ok + ok2, bad + bad2
            return ok, bad, err
        except Exception as exc:  # noqa: BLE001 - any receiver failure is data, never fatal
            return [], [], exc
        with self._cond:
            self.posts += 1
            self.alerts_sent += len(batch)
        return batch, [], None

    def _wire(self, e: _Entry, now: datetime) -> AlertmanagerAlert:
        ends_at = e.resolved_at if e.resolved_at is not None else now + self._horizon
        # Alertmanager refuses endsAt before startsAt ("start time must be before end
        # time"): a row started by a collector whose clock is ahead of ours.
        return AlertmanagerAlert(labels=e.labels, annotations={"summary": e.summary},
                                 starts_at=e.starts_at, ends_at=max(ends_at, e.starts_at),
                                 generator_url=e.generator_url)

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Stop cycling; the worker still posts what changed (resolutions) until joined."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def join(self, deadline: float) -> None:
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self.dropped += sum(1 for ls in self._urgent if (e := self._entries.get(ls))
                                is not None and e.resolved_at is not None)
            self._urgent.clear()
            self._aborted = True
            self._cond.notify()
        self._thread.join(0.1)

