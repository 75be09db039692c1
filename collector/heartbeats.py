"""Heartbeats: which full status a device's heartbeat names, and what is stored for it.

Owns the collector's memory of each device's last two verified full statuses (what a
heartbeat refers to by digest) — bounded: at most `kept` devices, the least recently
reporting forgotten first; a heartbeat that misses here falls back to the stored
status (collector.ingest reads it) — and the pure step from a verified heartbeat and
the full status it names to the record stored: the heartbeat's own (boot_id, seq),
instants and clock sample on the full status's findings and certificates, so the
replay window, the order, liveness and the clock offset hold for both while a
heartbeat alone changes no alert.
Must not verify signatures (the ingest does, through collector.verify), read or
write the store.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime

from certmon import wire as p

from .store import StatusRecord

__all__ = ["FULL_KEPT", "FullStatus", "FullStatuses", "heartbeat_record"]

# ~2 KB each: 100,000 devices' full statuses in ~200 MB at most; beyond that, a
# heartbeat costs one store read (the stored status is the full status it names).
FULL_KEPT = 100_000


@dataclass(frozen=True, slots=True)
class FullStatus:
    """A verified full status of a device: what its heartbeats name (`digest`) and
    the record a heartbeat's record is made from (without certificate rows)."""

    digest: str  # p.status_digest of the signed payload
    status: p.Status
    record: StatusRecord


class FullStatuses:
    """The newest and the one before per device (a heartbeat and a newer status can
    share a batch; the heartbeat then names the older one)."""

    def __init__(self, kept: int = FULL_KEPT) -> None:
        self._kept = kept
        self._newest: OrderedDict[str, FullStatus] = OrderedDict()
        self._before: dict[str, FullStatus] = {}

    def saw(self, device_id: str, full: FullStatus) -> None:
        """A verified full status: remembered if it is newer than the one held."""
        last = self._newest.get(device_id)
        if last is not None and last.status.boot_id == full.status.boot_id \
                and last.status.seq >= full.status.seq:
            return
        if last is not None:
            self._before[device_id] = last
        self._put(device_id, full)

    def loaded(self, device_id: str, full: FullStatus) -> None:
        """The stored status, which a device's signed heartbeat named: it is the
        device's current one, whatever was held."""
        self._before.pop(device_id, None)
        self._put(device_id, full)

    def find(self, device_id: str, digest: str) -> FullStatus | None:
        """The full status `digest` names; a hit counts as the device reporting (a
        device that sends mostly heartbeats is not the first forgotten)."""
        for full in (self._newest.get(device_id), self._before.get(device_id)):
            if full is not None and full.digest == digest:
                self._newest.move_to_end(device_id)
                return full
        return None

    def clear(self) -> None:
        self._newest.clear()
        self._before.clear()

    def __len__(self) -> int:
        return len(self._newest)

    def _put(self, device_id: str, full: FullStatus) -> None:
        self._newest[device_id] = full
        self._newest.move_to_end(device_id)
        while len(self._newest) > self._kept:
            gone, _ = self._newest.popitem(last=False)
            self._before.pop(gone, None)


def full_status(payload: bytes, status: p.Status, record: StatusRecord) -> FullStatus:
    return FullStatus(p.status_digest(payload), status,
                      replace(record, certs=(), replace_roles=frozenset()))


def heartbeat_record(full: FullStatus, beat: p.Heartbeat, *, retained: bool,
                     at: datetime) -> tuple[p.Status, StatusRecord]:
    """The status and record stored for `beat`, which names `full`; `at` its arrival."""
    status = replace(full.status, boot_id=beat.boot_id, seq=beat.seq, ts=beat.ts,
                     interval_s=beat.interval_s)
    # The bounds of aggregate.clock_offset: lo from ts against arrival (not for a
    # retained copy), hi from when the device heard our beacon.
    lo = None if retained else (beat.ts - at).total_seconds()
    hi = None
    if beat.beacon_ts is not None and beat.beacon_age_s is not None:
        hi = (beat.ts - beat.beacon_ts).total_seconds() - beat.beacon_age_s
    record = replace(full.record, boot_id=beat.boot_id, seq=beat.seq, device_ts=beat.ts,
                     received_at=at, interval_s=beat.interval_s,
                     clock_offset_lo_s=lo, clock_offset_hi_s=hi)
    return status, record
