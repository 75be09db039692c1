"""What the time daemons say: systemd-timesyncd (via timedatectl) and chrony (via chronyc).

Owns parsing their outputs into frozen facts (`TimesyncdStatus`, `ChronyTracking`),
systemd's timespan syntax, and each daemon's own "synced" reading. Every parser is pure
and returns None on output it does not understand; running the commands is
`agent.clocksync`'s injected runner.
Must not: run commands, change any clock or daemon, or judge the clock.

Sign convention, as everywhere: `offset_s` = reference time − device time, so a
positive offset means the device clock is *behind* (chrony prints this as "seconds slow").
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from datetime import UTC, datetime


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

