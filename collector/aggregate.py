"""What a verified status means for the fleet: pure functions of (status, now, …).

Owns the clock-offset interval, the device state classification and the finding
categories (certificate vs clock vs broker) that alert rules and dashboards share.
No I/O: the ingest path and the web views call these with data they already hold.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from certmon import wire as p
from certmon.pki import Severity

CLOCK_CODES = frozenset({"CLOCK_UNSYNCED", "CLOCK_IMPLAUSIBLE", "CLOCK_BEHIND", "CLOCK_AHEAD"})
BROKER_CODES = frozenset({"BROKER_CERT_EXPIRING", "BROKER_CERT_EXPIRED", "BROKER_CHAIN_INVALID"})


class DeviceState(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"
    OFFLINE = "offline"
    CLOCK = "clock"  # the worst problem is the device's clock, not a certificate


def category(code: str) -> str:
    """"clock", "broker" or "certificate": a gateway whose clock is two days behind
    needs its time fixed, not its certificate re-issued, so alerts say which."""
    if code in CLOCK_CODES:
        return "clock"
    if code in BROKER_CODES:
        return "broker"
    return "certificate"


@dataclass(frozen=True, slots=True)
class OffsetInterval:
    """Device clock minus true time, bounded from both sides (seconds)."""

    lo_s: float | None
    hi_s: float | None

    @property
    def estimate_s(self) -> float | None:
        if self.lo_s is not None and self.hi_s is not None:
            return (self.lo_s + self.hi_s) / 2
        return self.lo_s if self.hi_s is None else self.hi_s


def clock_offset(status: p.Status, received_at: datetime, *, retained: bool) -> OffsetInterval:
    """Bound the device's clock offset without trusting the device's clock.

    Lower bound: a status signed at device time `ts` and received at `received_at`
    gives ts − received_at = offset − transit ≤ offset. A retained message may be
    hours old, so it says nothing useful and is skipped.
    Upper bound: the device heard our beacon (sent at our time `beacon_ts`) at its
    monotonic `received_mono_s`; its wall clock then read ts − (mono_s − received_mono_s),
    and that minus beacon_ts = offset + transit ≥ offset.
    """
    lo = None if retained else (status.ts - received_at).total_seconds()
    hi = None
    beacon = status.clock.beacon
    if beacon is not None and beacon.received_mono_s <= status.mono_s:
        heard_at = status.ts - timedelta(seconds=status.mono_s - beacon.received_mono_s)
        hi = (heard_at - beacon.beacon_ts).total_seconds()
    return OffsetInterval(lo, hi)


def headline(findings: Iterable[p.FindingWire]) -> tuple[Severity, str | None]:
    """The worst severity and the finding code a device is shown by (ties: certificate
    before clock): what a dashboard line and `report` lead with."""
    best: tuple[Severity, str | None] = (Severity.OK, None)
    for f in findings:
        if f.severity > best[0] or (f.severity == best[0] and best[1] is not None
                                    and category(best[1]) == "clock"
                                    and category(f.code) != "clock"):
            best = (f.severity, f.code)
    return best


# Alerts the collector raises about a device from fleet facts, not from the device's
# own findings: a gateway whose trust store lacks the CA the broker moves to is at
# risk although its own status is clean (collector.alerts.rules, Scope).
FLEET_SCOPES = frozenset({"trust", "shared_cert"})


def fleet_severities(alerts: Iterable[Any]) -> dict[str, int]:
    """device → worst severity of its active fleet-rule alerts (AlertRow-like objects)."""
    out: dict[str, int] = {}
    for a in alerts:
        if a.device_id and a.labels.get("scope") in FLEET_SCOPES:
            out[a.device_id] = max(out.get(a.device_id, 0), int(a.severity))
    return out


# What an offline device is shown by: its last findings stand as last reported, but
# the first thing to fix is that it no longer reports (alerts.rules.DEVICE_OFFLINE).
OFFLINE_CODE = "DEVICE_OFFLINE"


def shown_worst(worst_code: str | None, worst_message: str | None, *, online: bool,
                offline_since: datetime | None) -> tuple[str | None, str | None]:
    """The (code, message) a device line leads with: an offline device's is offline,
    whatever its last status said (that status's worst finding follows in the
    message), so the gateway that went dark does not read as a clock problem."""
    if online:
        return worst_code, worst_message
    since = f" since {p.format_instant(offline_since)}" if offline_since else ""
    last = (f"; last reported {worst_code}: {worst_message}" if worst_code and worst_message
            else f"; last reported {worst_code}" if worst_code else "")
    return OFFLINE_CODE, f"offline{since}{last}"


def device_state(severity: int, worst_code: str | None, *, online: bool,
                 fleet_severity: int = 0) -> DeviceState:
    if fleet_severity > severity:
        severity, worst_code = fleet_severity, None
    if not online:
        return DeviceState.OFFLINE
    if severity >= Severity.WARNING and worst_code and category(worst_code) == "clock":
        return DeviceState.CLOCK
    if severity >= Severity.CRITICAL:
        return DeviceState.CRITICAL
    if severity == Severity.WARNING:
        return DeviceState.WARNING
    return DeviceState.OK


def status_part(status_json: str | None, key: str) -> object | None:
    """One top-level object of a stored status (`"broker"`, `"renewal"`,
    `"broker_host"`), decoded alone: ~20× cheaper than parsing the whole status. The
    stored status is canonical JSON (sorted keys) and was verified at ingest, and a
    quoted `"key":` inside a string would be escaped, so the first match is the part."""
    marker = f'"{key}":{{'
    at = status_json.find(marker) if status_json else -1
    if status_json is None or at < 0:
        return None
    try:
        part: object = json.JSONDecoder().raw_decode(status_json, at + len(marker) - 1)[0]
    except ValueError:
        return None
    return part

