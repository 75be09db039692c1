"""Store health as the running collector sees it, and the clock silence is judged by.

Owns `StoreHealth` (frozen: up, or down since when and why, the messages held, the
outages this process lived through and the last one), its transitions (`went_down`,
`came_back`: pure, every instant passed in), the processing clock silence is judged
by (`processing_clock`), the retry back-off (`retry_delay_s`) and `HealthCell`, the
one place the current value is kept: the ingest worker and the tick write it, the
web face and sd_notify read it.
Must not touch the store, log or read the clock; an error is kept as its class name
only (a message can carry a host name, a URL never belongs on a dashboard).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from .store import OutageRecord

__all__ = ["CATCH_UP_RATE", "HealthCell", "StoreHealth", "came_back", "processing_clock",
           "retry_delay_s", "status_text", "went_down"]

# After an outage the processing clock runs this many times faster than the wall clock
# until it has caught up: an outage of D seconds is caught up D/(rate-1) seconds later.
CATCH_UP_RATE = 2.0
FIRST_RETRY_S = 0.5


@dataclass(frozen=True, slots=True)
class StoreHealth:
    is_up: bool = True
    since_at: datetime | None = None  # went down / came back at (None: up since start)
    error: str | None = None  # while down: the error class, e.g. "StoreUnavailable"
    held: int = 0  # while down: messages held unacknowledged now
    held_max: int = 0  # while down: the most held during this outage
    outages: int = 0  # outages this process lived through (the current one included)
    last_outage: OutageRecord | None = None  # the last one that ended
    # The processing clock (`processing_clock`): it read `clock_at` at `anchor_at`.
    clock_at: datetime | None = None
    anchor_at: datetime | None = None

    def down_s(self, now: datetime) -> float:
        """How long the store has been down (0 while up)."""
        if self.is_up or self.since_at is None:
            return 0.0
        return max(0.0, (now - self.since_at).total_seconds())


def went_down(h: StoreHealth, now: datetime, error: str, held: int) -> StoreHealth:
    """A store call failed with `error` while `held` messages wait to be stored."""
    if not h.is_up:
        return dataclasses.replace(h, error=error, held=held, held_max=max(h.held_max, held))
    return StoreHealth(is_up=False, since_at=now, error=error, held=held, held_max=held,
                       outages=h.outages + 1, last_outage=h.last_outage,
                       clock_at=processing_clock(h, now), anchor_at=now)


def came_back(h: StoreHealth, now: datetime, collector: str) -> StoreHealth:
    """A store call succeeded: the outage (if one was on) ends now."""
    if h.is_up or h.since_at is None:
        return h
    outage = OutageRecord(collector, h.since_at, now, h.held_max, h.error or "")
    return StoreHealth(is_up=True, since_at=now, outages=h.outages, last_outage=outage,
                       clock_at=h.clock_at, anchor_at=now)


def processing_clock(h: StoreHealth, now: datetime) -> datetime:
    """The instant up to which the collector could process what the broker sent.

    It equals the wall clock while the store works; it stops while the store is down;
    afterwards it runs CATCH_UP_RATE times as fast until it is back on the wall clock.
    Why not jump back at once: what devices published during the outage is still
    queued on the broker (beyond its in-flight window) and arrives only as the ingest
    drains it, so judging silence by the wall clock right away would declare every
    device of the backlog offline. A device that really went silent is declared so at
    most the outage's length late.
    """
    if h.clock_at is None or h.anchor_at is None:
        return now
    if not h.is_up:
        return h.clock_at
    return min(now, h.clock_at + (now - h.anchor_at) * CATCH_UP_RATE)


def retry_delay_s(attempt: int, max_s: float) -> float:
    """Seconds before retry `attempt` (1, 2, …): 0.5 s doubling, capped at `max_s`
    (`ingest.store_retry_max_s`)."""
    return min(max_s, FIRST_RETRY_S * 2.0 ** min(max(attempt - 1, 0), 30))


def status_text(health: StoreHealth, backlog: int, now: datetime) -> str:
    """The sd_notify STATUS= line (`systemctl status` shows it)."""
    if not health.is_up:
        return (f"store unavailable for {health.down_s(now):.0f} s ({health.error}): "
                f"holding {backlog} messages unacknowledged, none lost")
    last = health.last_outage
    tail = (f"; last store outage {last.duration_s:.0f} s, {last.messages_held} messages held"
            if last is not None else "")
    return f"ingesting{tail}"


class HealthCell:
    """The current `StoreHealth`, replaced whole under a lock (readers never see half)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = StoreHealth()

    def get(self) -> StoreHealth:
        return self._value

    def update(self, change: Callable[[StoreHealth], StoreHealth]
               ) -> tuple[StoreHealth, StoreHealth]:
        """Apply `change`; (before, after), so the caller can log a transition once."""
        with self._lock:
            before = self._value
            self._value = change(before)
            return before, self._value
