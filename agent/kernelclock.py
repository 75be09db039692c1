"""The kernel's view of the clock: `adjtimex(modes=0)`, read through ctypes, decoded.

Owns glibc's `struct timex` layout, `parse_timex` (pure: bytes and a return value →
`KernelClock`), `read_adjtimex` (the syscall shell) and systemd's "synced" rule for it.
Must not: change the clock (modes is always 0, which needs no privilege), judge the
clock (that is `agent.clocksync`), or read any other time source.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Any

# systemd's rule (src/basic/time-util.c, ntp_synced(), also behind timedated's
# NTPSynchronized): synced iff adjtimex() succeeds and maxerror < 16 s. It deliberately
# ignores STA_UNSYNC ("it may have been set to prevent the kernel from touching the
# RTC") and the TIME_ERROR return state. 16 s is the kernel's NTP_PHASE_LIMIT: the
# kernel grows maxerror by 500 µs/s with no NTP daemon updating it and clamps it there.
SYSTEMD_MAXERROR_LIMIT_US = 16_000_000

_TIME_STATES = {0: "TIME_OK", 1: "TIME_INS", 2: "TIME_DEL", 3: "TIME_OOP", 4: "TIME_WAIT",
                5: "TIME_ERROR"}
_STA_FLAGS = ("STA_PLL", "STA_PPSFREQ", "STA_PPSTIME", "STA_FLL", "STA_INS", "STA_DEL",
              "STA_UNSYNC", "STA_FREQHOLD", "STA_PPSSIGNAL", "STA_PPSJITTER",
              "STA_PPSWANDER", "STA_PPSERROR", "STA_CLOCKERR", "STA_NANO", "STA_MODE",
              "STA_CLK")  # bit i of `status` is _STA_FLAGS[i] (<sys/timex.h>)
STA_UNSYNC, STA_NANO = 0x0040, 0x2000


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _Timex(ctypes.Structure):
    """glibc's `struct timex`. C `long` follows the ABI, so this is 208 bytes on LP64
    (x86_64, aarch64: an int `modes` padded to 8, longs, a 16-byte timeval, an `int
    tai` and eleven reserved ints) and 128 bytes on 32-bit, where glibc's legacy
    `adjtimex` symbol still uses 32-bit longs."""

    _fields_ = (
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long), ("time", _Timeval), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    )


TIMEX_SIZE = ctypes.sizeof(_Timex)


@dataclass(frozen=True, slots=True)
class KernelClock:
    """The kernel's NTP state as `adjtimex(modes=0)` reports it."""

    is_synced: bool  # systemd's rule, see SYSTEMD_MAXERROR_LIMIT_US
    state: str  # TIME_OK … TIME_ERROR (the return value)
    status: int
    flags: tuple[str, ...]
    maxerror_us: int
    esterror_us: int
    offset_ns: int  # the PLL's remaining offset; the kernel gives µs unless STA_NANO
    freq_ppm: float
    tai_s: int


def parse_timex(raw: bytes, rc: int) -> KernelClock:
    """Decode a native `struct timex` and adjtimex's return value (pure)."""
    if len(raw) != TIMEX_SIZE:
        raise ValueError(f"struct timex is {TIMEX_SIZE} bytes here, got {len(raw)}")
    tx = _Timex.from_buffer_copy(raw)
    status = int(tx.status)
    offset = int(tx.offset)
    return KernelClock(
        is_synced=rc >= 0 and int(tx.maxerror) < SYSTEMD_MAXERROR_LIMIT_US,
        state=_TIME_STATES.get(rc, f"UNKNOWN({rc})"),
        status=status,
        flags=tuple(name for bit, name in enumerate(_STA_FLAGS) if status & (1 << bit)),
        maxerror_us=int(tx.maxerror),
        esterror_us=int(tx.esterror),
        offset_ns=offset if status & STA_NANO else offset * 1000,
        freq_ppm=int(tx.freq) / 65536.0,  # "scaled ppm": ppm with a 16-bit fraction
        tai_s=int(tx.tai),
    )


def read_adjtimex() -> KernelClock | None:
    """Read the kernel clock state; None off Linux or when the syscall is refused.

    modes=0 changes nothing and needs no privilege, but systemd's ProtectClock=yes
    denies the adjtimex syscall outright via seccomp, so the unit must not set it.
    """
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        adjtimex: Any = libc.adjtimex
    except (OSError, AttributeError):
        return None
    adjtimex.argtypes = (ctypes.POINTER(_Timex),)
    adjtimex.restype = ctypes.c_int
    tx = _Timex()  # zeroed: modes == 0 means "read only"
    rc = int(adjtimex(ctypes.byref(tx)))
    if rc < 0:
        return None
    return parse_timex(bytes(tx), rc)
