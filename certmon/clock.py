"""The wall clock, the monotonic clock and the boot id: the only place certmon reads them.

Every other module takes `now` (or a `Clock`) as an argument, so a judgement such as
"this certificate expires in 3 days" is a pure function that a test can pin. Tests and
the demo fleet inject `FixedClock` or `OffsetClock` (a device whose wall clock is two
days behind) instead of patching `datetime`.

This module must not judge anything (whether a clock is *right* is
`agent.clocksync`'s job), must not adjust any clock, and imports nothing from
the agent or the collector.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = [
    "UNKNOWN_BOOT_ID",
    "Clock",
    "FixedClock",
    "OffsetClock",
    "SystemClock",
    "boot_id",
    "monotonic_s",
    "utc_now",
]

# What `boot_id` returns when the kernel does not tell us. Deliberately not a random
# id persisted somewhere: replay protection keys on (boot_id, seq), and a made-up id
# that survives a reboot would let a restarted seq counter look like a replay.
UNKNOWN_BOOT_ID = "unknown"

# The kernel's format: 36 lowercase hex-and-dash characters, e.g.
# "5f3c2b7e-9a41-4c0e-8d2f-1b6a7c9e0d13".
_BOOT_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def utc_now() -> datetime:
    """The wall clock as a tz-aware UTC datetime (it may be wrong: that is a fact to report)."""
    return datetime.now(UTC)


def monotonic_s() -> float:
    """Seconds on a clock that never jumps: for intervals, never for instants."""
    return time.monotonic()


def boot_id(proc_root: Path = Path("/proc")) -> str:
    """The kernel's per-boot UUID, or "unknown" when /proc does not have it.

    It changes on every boot, so (boot_id, seq) stays strictly increasing even though
    seq restarts at 0 after a reboot and the wall clock may have gone backwards
    (a Raspberry Pi without RTC boots at the time fake-hwclock saved at shutdown).
    """
    try:
        text = (proc_root / "sys" / "kernel" / "random" / "boot_id").read_text("ascii")
    except (OSError, UnicodeDecodeError):
        return UNKNOWN_BOOT_ID
    value = text.strip().lower()
    return value if _BOOT_ID_RE.fullmatch(value) else UNKNOWN_BOOT_ID


@runtime_checkable
class Clock(Protocol):
    """The seam every time-dependent I/O shell takes, so tests inject the time."""

    def now(self) -> datetime:
        """Wall-clock time, tz-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (arbitrary origin)."""
        ...


@dataclass(frozen=True, slots=True)
class SystemClock:
    """The real clocks of this machine."""

    def now(self) -> datetime:
        return utc_now()

    def monotonic(self) -> float:
        return monotonic_s()


def _require_aware(at: datetime) -> datetime:
    # A naive datetime compared with an aware one raises TypeError deep in pki code;
    # refuse it here, where the mistake is made.
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at!r}: pass a tz-aware UTC datetime")
    return at.astimezone(UTC)


@dataclass(slots=True)
class FixedClock:
    """A clock that stands still until told to move: `advance()` moves both clocks.

    Mutable on purpose (the only mutable value here): a test that simulates
    "five minutes later" calls `advance(300)` instead of sleeping.
    """

    at: datetime
    monotonic_at_s: float = 0.0

    def __post_init__(self) -> None:
        self.at = _require_aware(self.at)

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return self.monotonic_at_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("monotonic time cannot go backwards; use set_wall() for a step")
        self.at += timedelta(seconds=seconds)
        self.monotonic_at_s += seconds

    def set_wall(self, at: datetime) -> None:
        """Step the wall clock only, as `date -s` or an NTP step would."""
        self.at = _require_aware(at)


@dataclass(frozen=True, slots=True)
class OffsetClock:
    """Another clock's wall time shifted by `offset`; monotonic time is unchanged.

    The demo fleet uses `OffsetClock(SystemClock(), timedelta(days=-2))` for a device
    whose wall clock is two days behind: its fresh certificates look not-yet-valid,
    which the agent must report as a clock problem, not a certificate problem.
    """

    base: Clock
    offset: timedelta

    def now(self) -> datetime:
        return self.base.now() + self.offset

    def monotonic(self) -> float:
        return self.base.monotonic()
