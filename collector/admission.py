"""Per-device admission: which pending statuses are worth verifying and storing.

Owns the per-device token buckets (`Budget`: a sustained rate and a burst, refilled by
the messages' arrival instants) and the verdict for each status of a batch before any
signature is checked: `ADMIT`; `SUPERSEDED` (an older status of a device over budget
while a newer one of it is pending: only the newest is worth the work); `RATE_LIMITED`
(the device's newest pending status, but its bucket is empty). It also knows which
devices are flooding now (over budget within the last `calm_s`), for DEVICE_FLOODING.
Within budget nothing is coalesced: an agent flushing its spool after an outage has
every status stored (the default burst covers the agent's default spool of 1000);
beyond it the remaining tokens pay for the oldest pending statuses and the newest.
Must not parse payloads, verify, touch the store or read the clock: the device key
and the arrival instant are given, and a batch's changes are committed only by
`Judgement.commit()` (decide may be re-run after a store outage: judged twice,
charged once).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["Admission", "Budget", "Judgement", "Verdict"]

# Buckets at rest (full) are dropped at this many entries: memory follows the devices
# that sent lately, not the fleet.
_TRIM_AT = 10_000


class Verdict(enum.Enum):
    ADMIT = "admit"
    SUPERSEDED = "superseded"
    RATE_LIMITED = "rate_limited"


@dataclass(frozen=True, slots=True)
class Budget:
    """Statuses per device: `rate_per_s` sustained, `burst` at once; a device over it
    counts as flooding until it has been within budget for `calm_s`."""

    rate_per_s: float = 0.1
    burst: float = 1000.0
    calm_s: float = 60.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: datetime
    limited_at: datetime | None = None  # last time over budget


@dataclass(slots=True)
class Judgement:
    """One batch's verdicts (per status, in the order given) and the flood changes;
    `commit()` charges the buckets."""

    verdicts: list[Verdict]
    started: list[str]  # devices that began flooding with this batch
    calmed: list[str]  # devices whose flood is over
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _owner: Admission | None = None

    def commit(self) -> None:
        if self._owner is not None:
            self._owner._commit(self)


class Admission:
    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._buckets: dict[str, _Bucket] = {}
        self._trim_at = _TRIM_AT
        self.flooding: set[str] = set()

    def _refilled(self, device: str, at: datetime) -> _Bucket:
        b, old = self.budget, self._buckets.get(device)
        if old is None:
            return _Bucket(b.burst, at)
        elapsed = max(0.0, (at - old.at).total_seconds())
        return _Bucket(min(b.burst, old.tokens + elapsed * b.rate_per_s), max(at, old.at),
                       old.limited_at)

    def judge(self, statuses: Sequence[tuple[str, datetime]]) -> Judgement:
        """Verdicts for a batch's statuses, given as (device, arrival) in batch order."""
        by_device: dict[str, list[int]] = {}
        for i, (device, _at) in enumerate(statuses):
            by_device.setdefault(device, []).append(i)
        verdicts = [Verdict.ADMIT] * len(statuses)
        buckets: dict[str, _Bucket] = {}
        started: list[str] = []
        for device, idx in by_device.items():
            last_at = max(statuses[i][1] for i in idx)
            bucket = self._refilled(device, last_at)
            if len(idx) <= bucket.tokens:
                bucket.tokens -= len(idx)
            else:
                # Over budget: the newest pending status stands for the device, if a
                # token is left for it; what tokens remain go to the oldest pending
                # ones (a spool flush keeps as much of its history, in order, as the
                # budget pays for); the rest are superseded by the newest.
                tokens = int(bucket.tokens)
                keep = set(idx[:max(0, tokens - 1)])
                for i in idx[:-1]:
                    if i not in keep:
                        verdicts[i] = Verdict.SUPERSEDED
                if tokens >= 1:
                    bucket.tokens -= len(keep) + 1
                else:
                    verdicts[idx[-1]] = Verdict.RATE_LIMITED
                bucket.limited_at = last_at
                if device not in self.flooding:
                    started.append(device)
            buckets[device] = bucket
        now = max((at for _d, at in statuses), default=None)
        calmed = [] if now is None else sorted(
            d for d in self.flooding if self._calm(buckets.get(d) or self._buckets.get(d), now))
        return Judgement(verdicts, started, calmed, buckets, self)

    def _calm(self, bucket: _Bucket | None, now: datetime) -> bool:
        return bucket is None or bucket.limited_at is None or (
            now - bucket.limited_at).total_seconds() >= self.budget.calm_s

    def _commit(self, j: Judgement) -> None:
        self._buckets.update(j._buckets)
        self.flooding.update(j.started)
        self.flooding.difference_update(j.calmed)
        j._owner = None  # once
        if len(self._buckets) > self._trim_at:
            self._trim()
            # Amortised: at 3,000 statuses/s tens of thousands of buckets are
            # legitimately not full yet; trimming them every batch would cost more
            # than the buckets.
            self._trim_at = max(_TRIM_AT, 2 * len(self._buckets))

    def _trim(self) -> None:
        newest = max(b.at for b in self._buckets.values())
        for device in [d for d, b in self._buckets.items() if d not in self.flooding
                       and self._refilled(d, newest).tokens >= self.budget.burst]:
            del self._buckets[device]
