"""Device clock health: what the kernel, chrony, timesyncd and SNTP say, and the verdict.

Owns the clock rules (CLOCK_UNSYNCED, CLOCK_IMPLAUSIBLE, CLOCK_BEHIND, CLOCK_AHEAD),
the rule that turns a "not yet valid" certificate into a clock problem, and
`collect_clock_state`, which asks every source through injectable seams (a command
runner, a proc root, a `Clock`, the adjtimex reader). The readers have homes of their
own: `agent.kernelclock` (adjtimex), `agent.timedaemons` (chrony, timesyncd) and
`agent.sntp`; everything that judges is a pure function of the collected `ClockState`.

It must not change any clock: `adjtimex` is called with modes=0 (read-only), chrony
and timedatectl are only queried. It must not read the wall clock directly (that is
`certmon.clock`'s job) and must not import the collector.

Sign convention, everywhere: `offset_s` = reference time − device time, so a positive
offset means the device clock is *behind* (chrony prints this as "seconds slow").
"""

from __future__ import annotations

import enum
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from certmon.clock import Clock, boot_id
from certmon.pki import Finding, FindingCode, Severity

from .kernelclock import TIMEX_SIZE, KernelClock, _Timex, parse_timex, read_adjtimex
from .sntp import SntpSample, ntp_to_unix_s, parse_sntp_reply, sntp_offset, unix_to_ntp
from .timedaemons import (
    ChronyTracking,
    TimesyncdStatus,
    parse_chrony_tracking,
    parse_timespan_s,
    timesyncd_from_outputs,
)

# The readers' names that callers (and their tests) import from here, where they lived.
__all__ = [
    "TIMEX_SIZE", "ChronyTracking", "ClockSource", "ClockState", "ClockVerdict",
    "KernelClock", "Runner", "SntpSample", "TimesyncdStatus", "_Timex",
    "collect_clock_state", "evaluate_clock", "explains_not_yet_valid", "ntp_to_unix_s",
    "parse_chrony_tracking", "parse_sntp_reply", "parse_timespan_s", "parse_timex",
    "read_adjtimex", "rfc3339", "run_command", "sntp_offset", "timesyncd_from_outputs",
    "unix_to_ntp",
]

Runner = Callable[[Sequence[str]], str | None]
"""Runs argv, returns stdout, or None when the command is missing or fails."""

# ---------------------------------------------------------------- evaluation (pure)

class ClockSource(enum.StrEnum):
    KERNEL = "kernel"
    CHRONY = "chrony"
    TIMESYNCD = "timesyncd"
    SNTP = "sntp"


@dataclass(frozen=True, slots=True)
class ClockState:
    """Everything the readers found at one moment; None = source absent or failed."""

    kernel: KernelClock | None
    timesyncd: TimesyncdStatus | None
    chrony: ChronyTracking | None
    sntp: SntpSample | None
    wall_now: datetime
    boot_id: str
    monotonic_s: float


@dataclass(frozen=True, slots=True)
class ClockVerdict:
    synced: bool | None  # None: no source could tell
    source: ClockSource | None  # where `offset_s` (or else `synced`) came from
    offset_s: float | None
    maxerror_s: float | None
    plausible: bool
    wall_at: datetime
    boot_id: str
    monotonic_s: float

    def to_json(self) -> dict[str, str | float | bool | None]:
        return {
            "synced": self.synced,
            "source": str(self.source) if self.source else None,
            "offset_s": self.offset_s,
            "maxerror_s": self.maxerror_s,
            "plausible": self.plausible,
            "wall_at": rfc3339(self.wall_at),
            "boot_id": self.boot_id,
            "monotonic_s": self.monotonic_s,
        }


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fmt_offset(offset_s: float) -> str:
    word = "behind" if offset_s > 0 else "ahead"
    return f"{abs(offset_s):.3f} s {word} ({abs(offset_s) / 86400:.2f} days)"


def _measured_offset(state: ClockState) -> tuple[ClockSource, float] | None:
    # SNTP is a measurement made just now; chrony's "System time" is the correction it
    # is still slewing, so live too. timesyncd's offset is its last sample *before* it
    # corrected the clock, so it counts only while timesyncd reports NTPSynchronized=no
    # (it measured but could not correct, e.g. no CAP_SYS_TIME in a container): right
    # after a step at boot it still shows "+2d" though the clock is already right.
    if state.sntp is not None:
        return ClockSource.SNTP, state.sntp.offset_s
    if state.chrony is not None and state.chrony.is_synced:
        return ClockSource.CHRONY, state.chrony.offset_s
    ts = state.timesyncd
    if ts is not None and ts.offset_s is not None and ts.ntp_synchronized is False:
        return ClockSource.TIMESYNCD, ts.offset_s
    return None


def evaluate_clock(state: ClockState, *, newest_not_before: datetime | None,
                   release_date: datetime, skew_tolerance_s: float = 300.0,
                   critical_skew_s: float = 3600.0) -> tuple[ClockVerdict, list[Finding]]:
    """Judge the clock. `critical_skew_s` defaults to one hour because CAs backdate
    not_before by about that much (Let's Encrypt: 1 h): a device further behind
    rejects a certificate issued minutes ago."""
    votes: list[tuple[ClockSource, bool]] = []
    if state.chrony is not None:
        votes.append((ClockSource.CHRONY, state.chrony.is_synced))
    if state.timesyncd is not None and state.timesyncd.ntp_synchronized is not None:
        votes.append((ClockSource.TIMESYNCD, state.timesyncd.ntp_synchronized))
    if state.kernel is not None:
        votes.append((ClockSource.KERNEL, state.kernel.is_synced))
    synced_by = next((src for src, ok in votes if ok), None)
    synced = True if synced_by else (False if votes else None)
    measured = _measured_offset(state)
    offset_s = measured[1] if measured else None
    source = measured[0] if measured else (synced_by or (votes[0][0] if votes else None))

    wall = state.wall_now
    reasons = []
    if wall < release_date:
        reasons.append(f"before this certmon release ({release_date:%Y-%m-%d})")
    # A certificate from the device's future means its clock is behind, unless a sync
    # source vouches for the clock: then the certificate really is not yet valid.
    is_vouched = synced is True and (offset_s is None or abs(offset_s) <= skew_tolerance_s)
    if newest_not_before is not None and wall < newest_not_before and not is_vouched:
        reasons.append(f"before the newest certificate it holds became valid "
                       f"({rfc3339(newest_not_before)})")
    verdict = ClockVerdict(
        synced=synced, source=source, offset_s=offset_s,
        maxerror_s=state.kernel.maxerror_us / 1e6 if state.kernel else None,
        plausible=not reasons, wall_at=wall, boot_id=state.boot_id,
        monotonic_s=state.monotonic_s)

    findings: list[Finding] = []
    if reasons:
        findings.append(Finding(FindingCode.CLOCK_IMPLAUSIBLE, Severity.CRITICAL,
            f"device clock reads {rfc3339(wall)}, which is {' and '.join(reasons)}: the "
            "clock is wrong (no RTC, or fake-hwclock restored an old time), so valid "
            "certificates look not-yet-valid"))
    if synced is False:
        findings.append(Finding(FindingCode.CLOCK_UNSYNCED, Severity.WARNING,
            "no time source says the clock is synchronised: " + _describe_votes(state)))
    if offset_s is not None and abs(offset_s) > skew_tolerance_s:
        code = FindingCode.CLOCK_BEHIND if offset_s > 0 else FindingCode.CLOCK_AHEAD
        severity = Severity.CRITICAL if abs(offset_s) >= critical_skew_s else Severity.WARNING
        findings.append(Finding(code, severity,
            f"device clock is {_fmt_offset(offset_s)} per {source}, beyond the "
            f"{skew_tolerance_s:g} s tolerance"))
    return verdict, findings


def _describe_votes(state: ClockState) -> str:
    parts = []
    if (k := state.kernel) is not None:
        parts.append(f"kernel maxerror {k.maxerror_us / 1e6:.3f} s (synced needs < 16 s, "
                     f"systemd's rule), state {k.state}")
    if (c := state.chrony) is not None:
        parts.append(f"chrony leap status '{c.leap_status}', stratum {c.stratum}, "
                     f"reference {c.ref_id}")
    if (t := state.timesyncd) is not None and t.ntp_synchronized is not None:
        parts.append(f"timesyncd NTPSynchronized={'yes' if t.ntp_synchronized else 'no'}")
    return "; ".join(parts)


def explains_not_yet_valid(verdict: ClockVerdict, not_before: datetime,
                           now: datetime) -> bool:
    """True when a certificate that looks not-yet-valid at `now` is a clock problem."""
    if not_before <= now:
        return False
    if not verdict.plausible:
        return True
    if verdict.offset_s is not None:
        # Measured: the cert is a clock problem iff it is valid at the corrected time.
        return now + timedelta(seconds=verdict.offset_s) >= not_before
    return verdict.synced is False  # unverified clock: the likelier culprit


# ---------------------------------------------------------------- I/O shell

def run_command(argv: Sequence[str]) -> str | None:
    """The default runner: C locale and UTC so output parses the same on every device."""
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC", "SYSTEMD_COLORS": "0",
           "SYSTEMD_PAGER": ""}
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=5.0,
                              env=env, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def collect_clock_state(*, runner: Runner = run_command, proc_root: Path = Path("/proc"),
                        sntp_servers: Sequence[str] = (), clock: Clock,
                        sntp_port: int = 123, sntp_timeout_s: float = 1.0,
                        adjtimex: Callable[[], KernelClock | None] = read_adjtimex,
                        ) -> ClockState:
    """Ask every source; a missing one is None, never an exception."""
    wall_now, mono = clock.now(), clock.monotonic()
    # -n: no reverse DNS. With the network down (when clocks go wrong) a lookup stalls.
    chrony_out = runner(("chronyc", "-n", "-c", "tracking"))
    show = runner(("timedatectl", "show"))
    status = runner(("timedatectl", "timesync-status")) if show is not None else None
    sample = None
    for server in sntp_servers:
        if (sample := sntp_offset(server, sntp_port, sntp_timeout_s, clock=clock)):
            break
    return ClockState(
        kernel=adjtimex(),
        timesyncd=timesyncd_from_outputs(show, status),
        chrony=parse_chrony_tracking(chrony_out) if chrony_out is not None else None,
        sntp=sample, wall_now=wall_now, boot_id=boot_id(proc_root), monotonic_s=mono)
