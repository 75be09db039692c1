"""Device clock health: what the kernel, chrony, timesyncd and SNTP say, and the verdict.

Owns the clock rules (CLOCK_UNSYNCED, CLOCK_IMPLAUSIBLE, CLOCK_BEHIND, CLOCK_AHEAD) and
the rule that turns a "not yet valid" certificate into a clock problem. Readers are
thin I/O shells with injectable seams (a command runner, a proc root, a `Clock`);
everything that judges is a pure function of the collected `ClockState`.

It must not change any clock: `adjtimex` is called with modes=0 (read-only), chrony
and timedatectl are only queried. It must not read the wall clock directly (that is
`certmon.clock`'s job) and must not import the collector.

Sign convention, everywhere: `offset_s` = reference time − device time, so a positive
offset means the device clock is *behind* (chrony prints this as "seconds slow").
"""

from __future__ import annotations

import csv
import ctypes
import enum
import os
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from certmon.clock import Clock, SystemClock, boot_id, monotonic_s
from certmon.pki import Finding, FindingCode, Severity

Runner = Callable[[Sequence[str]], str | None]
"""Runs argv, returns stdout, or None when the command is missing or fails."""

# ---------------------------------------------------------------- kernel (adjtimex)

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


# ---------------------------------------------------------------- systemd-timesyncd

@dataclass(frozen=True, slots=True)
class TimesyncdStatus:
    ntp_synchronized: bool | None  # timedated's NTPSynchronized: the kernel rule again
    ntp_enabled: bool | None
    server_name: str | None = None
    server_address: str | None = None
    leap: str | None = None
    stratum: int | None = None
    # The last NTP sample's offset *before* timesyncd corrected the clock.
    offset_s: float | None = None
    delay_s: float | None = None
    packet_count: int | None = None


# systemd's format_timespan() units; longest first so "min" is not read as "m"+"in".
_TIMESPAN_UNITS_S = {"y": 31_557_600.0, "month": 2_629_800.0, "w": 604_800.0,
                     "d": 86_400.0, "h": 3_600.0, "min": 60.0, "s": 1.0, "ms": 1e-3,
                     "us": 1e-6, "μs": 1e-6, "µs": 1e-6, "ns": 1e-9}
_TIMESPAN_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(month|min|ms|us|μs|µs|ns|y|w|d|h|s)")


def parse_timespan_s(text: str) -> float | None:
    """systemd timespan ("+2d 3h", "-1.234ms", "34min 8s", "0") → seconds."""
    text = text.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-").strip()
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _TIMESPAN_RE.finditer(body):
        if body[pos:m.start()].strip():
            return None
        total += float(m.group(1)) * _TIMESPAN_UNITS_S[m.group(2)]
        pos = m.end()
    return sign * total if pos and not body[pos:].strip() else None


def _yes_no(value: str | None) -> bool | None:
    return {"yes": True, "no": False}.get(value or "")


def parse_key_values(text: str) -> dict[str, str]:
    """`timedatectl show` lines "Key=value"."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def parse_timesync_status(text: str) -> dict[str, str]:
    """`timedatectl timesync-status`: a right-aligned "Field: value" table."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(": ")
        if sep:
            out[key] = value.strip()
    return out


def timesyncd_from_outputs(show: str | None, status: str | None) -> TimesyncdStatus | None:
    """Combine `timedatectl show` and `timedatectl timesync-status` (either may be None)."""
    if show is None and status is None:
        return None
    kv = parse_key_values(show or "")
    st = parse_timesync_status(status or "")
    address = name = None
    if server := st.get("Server"):  # "192.0.2.1 (ntp.example.net)"; "n/a (n/a)" if none
        m = re.fullmatch(r"(\S+)(?: \((.*)\))?", server)
        if m:
            address = None if m.group(1) == "n/a" else m.group(1)
            name = None if m.group(2) in (None, "n/a") else m.group(2)
    packets = int(st["Packet count"]) if st.get("Packet count", "").isdigit() else None
    stratum = int(st["Stratum"]) if st.get("Stratum", "").isdigit() else None
    return TimesyncdStatus(
        ntp_synchronized=_yes_no(kv.get("NTPSynchronized")),
        ntp_enabled=_yes_no(kv.get("NTP")),
        server_name=name,
        server_address=address,
        leap=st.get("Leap"),
        stratum=stratum,
        # "Offset: +2d" is printed with the sign of ((T2−T1)+(T3−T4))/2: + = device behind.
        offset_s=parse_timespan_s(st["Offset"]) if packets and "Offset" in st else None,
        delay_s=parse_timespan_s(st["Delay"]) if packets and "Delay" in st else None,
        packet_count=packets,
    )


# ---------------------------------------------------------------- chrony

CHRONY_LOCAL_REFID = "7F7F0101"  # chronyd's "local" directive: synced to itself


@dataclass(frozen=True, slots=True)
class ChronyTracking:
    ref_id: str
    ref_name: str
    stratum: int
    ref_at: datetime | None
    offset_s: float  # "System time": + = slow of NTP time = device behind
    last_offset_s: float
    rms_offset_s: float
    freq_ppm: float
    residual_freq_ppm: float
    skew_ppm: float
    root_delay_s: float
    root_dispersion_s: float
    update_interval_s: float
    leap_status: str  # Normal, Insert second, Delete second, Not synchronised

    @property
    def is_synced(self) -> bool:
        # A "local" reference is a free-running clock that chrony serves as if it
        # were right: synced to nothing outside the device.
        return (self.leap_status != "Not synchronised" and self.stratum > 0
                and self.ref_id not in ("00000000", CHRONY_LOCAL_REFID))


def parse_chrony_tracking(text: str) -> ChronyTracking | None:
    """`chronyc -c tracking`: one CSV line of 14 fields (pure); None if malformed."""
    rows = [r for r in csv.reader(text.splitlines()) if r]
    if len(rows) != 1 or len(rows[0]) != 14:
        return None
    f = rows[0]
    try:
        ref_s = float(f[3])
        return ChronyTracking(
            ref_id=f[0].upper(), ref_name=f[1], stratum=int(f[2]),
            # 0.0 is chrony's "never": print it as None, not 1970.
            ref_at=datetime.fromtimestamp(ref_s, UTC) if ref_s > 0 else None,
            offset_s=float(f[4]), last_offset_s=float(f[5]), rms_offset_s=float(f[6]),
            freq_ppm=float(f[7]), residual_freq_ppm=float(f[8]), skew_ppm=float(f[9]),
            root_delay_s=float(f[10]), root_dispersion_s=float(f[11]),
            update_interval_s=float(f[12]), leap_status=f[13],
        )
    except ValueError:
        return None


# ---------------------------------------------------------------- SNTP (RFC 4330)

NTP_UNIX_DELTA_S = 2_208_988_800  # 1900-01-01 → 1970-01-01


@dataclass(frozen=True, slots=True)
class SntpSample:
    server: str
    offset_s: float  # ((t2 − t1) + (t3 − t4)) / 2: + = device behind
    delay_s: float  # (t4 − t1) − (t3 − t2)
    stratum: int
    measured_at: datetime  # t4 on the device's (possibly wrong) clock


def ntp_to_unix_s(raw: bytes) -> float:
    secs, frac = int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:8], "big")
    if secs < 0x8000_0000:  # RFC 4330 §3: MSB 0 means era 1, i.e. after 2036-02-07
        secs += 1 << 32
    return secs - NTP_UNIX_DELTA_S + frac / (1 << 32)


def unix_to_ntp(unix_s: float) -> bytes:
    secs = int(unix_s // 1) + NTP_UNIX_DELTA_S
    frac = int((unix_s % 1) * (1 << 32))
    return (secs % (1 << 32)).to_bytes(4, "big") + frac.to_bytes(4, "big")


def sntp_request(nonce: bytes) -> bytes:
    """LI 0, version 4, mode 3 (client). The transmit timestamp is a random nonce, not
    our clock: it leaks nothing about the device and a spoofed reply must echo it."""
    return bytes([0x23]) + bytes(39) + nonce


def parse_sntp_reply(data: bytes, nonce: bytes, *, server: str, t1: datetime,
                     t4: datetime) -> SntpSample | None:
    """Validate a reply (RFC 4330 §5) and compute offset and delay (pure)."""
    if len(data) < 48:
        return None
    leap, mode, stratum = data[0] >> 6, data[0] & 7, data[1]
    # Mode 4 = server; stratum 0 = kiss-o'-death; leap 3 = the server itself is unsynced;
    # the origin must echo our nonce or the reply is not an answer to our request.
    if mode != 4 or not 0 < stratum < 16 or leap == 3 or data[24:32] != nonce:
        return None
    if data[40:48] == bytes(8):
        return None
    t2, t3 = ntp_to_unix_s(data[32:40]), ntp_to_unix_s(data[40:48])
    t1_s, t4_s = t1.timestamp(), t4.timestamp()
    return SntpSample(server=server, offset_s=((t2 - t1_s) + (t3 - t4_s)) / 2,
                      delay_s=(t4_s - t1_s) - (t3 - t2), stratum=stratum, measured_at=t4)


def sntp_offset(server: str, port: int = 123, timeout_s: float = 1.0, *,
                clock: Clock | None = None) -> SntpSample | None:
    """One SNTP exchange; None on timeout, network error or an invalid reply."""
    clock = clock or SystemClock()
    try:
        infos = socket.getaddrinfo(server, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    family, _, _, _, addr = infos[0]
    nonce = secrets.token_bytes(8)
    deadline = monotonic_s() + timeout_s
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(addr)  # the kernel then drops datagrams from other peers
            t1, m1 = clock.now(), clock.monotonic()
            sock.send(sntp_request(nonce))
            while (left := deadline - monotonic_s()) > 0:
                sock.settimeout(left)
                data = sock.recv(512)
                # t4 = t1 + monotonic elapsed: a clock step during the exchange (NTP
                # daemon stepping at boot) would otherwise show up as a huge delay.
                t4 = t1 + timedelta(seconds=clock.monotonic() - m1)
                if len(data) >= 48 and data[24:32] != nonce:
                    continue  # a late reply to an earlier request: keep waiting
                return parse_sntp_reply(data, nonce, server=server, t1=t1, t4=t4)
        except OSError:  # includes TimeoutError and ICMP port unreachable
            return None
    return None


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
