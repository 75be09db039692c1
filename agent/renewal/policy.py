"""When to renew the client certificate: a pure function of facts, `now` and state.

Owns the renewal point (a fraction of the lifetime and/or days before notAfter, the
earlier wins, moved earlier by a per-device jitter derived from the device id and the
certificate serial, so a fleet does not renew in step and a test is reproducible),
the capped exponential retry backoff, and "never while the clock is known wrong".
Must not: read the clock, the files or the state file, or run anything (that is
`agent.renewal.attempt`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from certmon.pki import CertFacts, FindingCode

# Clock findings that say the wall clock is wrong (not merely unsynced): renewing
# then would judge "covers now" and "ends later" against a wrong now, and a clock
# jump into the future would renew (and burn a CA quota) far too early.
CLOCK_WRONG = frozenset({FindingCode.CLOCK_IMPLAUSIBLE, FindingCode.CLOCK_BEHIND,
                         FindingCode.CLOCK_AHEAD})


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    at_lifetime_fraction: float = 2 / 3
    days_before: float = 0.0
    jitter_fraction: float = 0.05
    retry_min_s: float = 300.0
    retry_max_s: float = 21600.0


@dataclass(frozen=True, slots=True)
class AttemptState:
    """What the last attempts did, for the certificate `cert_sha256` (a renewed
    certificate starts with a clean slate)."""

    cert_sha256: str | None = None
    last_attempt_at: datetime | None = None
    outcome: str | None = None  # "renewed" or "failed"
    reason: str | None = None
    failures: int = 0  # consecutive failed attempts for this certificate


@dataclass(frozen=True, slots=True)
class RenewalDecision:
    due_at: datetime  # the renewal point: renewal is due from this instant on
    is_due: bool
    should_attempt: bool
    next_attempt_at: datetime | None  # None: not before the clock is fixed
    reason: str


def jitter_share(device_id: str, serial_hex: str) -> float:
    """A fixed number in [0, 1) for this device and certificate."""
    digest = hashlib.sha256(f"{device_id}\n{serial_hex.lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def renewal_point(cert: CertFacts, device_id: str, policy: RenewalPolicy) -> datetime:
    lifetime = cert.not_after - cert.not_before
    points = []
    if policy.at_lifetime_fraction > 0:
        points.append(cert.not_before + lifetime * policy.at_lifetime_fraction)
    if policy.days_before > 0:
        points.append(cert.not_after - timedelta(days=policy.days_before))
    point = min(points) if points else cert.not_after
    point -= lifetime * (policy.jitter_fraction * jitter_share(device_id, cert.serial_hex))
    # Whole seconds: the instant on the wire (and in the collector's rule) is this one.
    return max(point, cert.not_before).replace(microsecond=0)


def retry_wait_s(failures: int, policy: RenewalPolicy) -> float:
    """0 before any failure; retry_min_s after the first, doubling, capped."""
    if failures <= 0:
        return 0.0
    return float(min(policy.retry_max_s, policy.retry_min_s * 2 ** min(failures - 1, 60)))


def decide(cert: CertFacts, device_id: str, now: datetime, policy: RenewalPolicy,
           state: AttemptState, *, is_clock_ok: bool, force: bool = False) -> RenewalDecision:
    due_at = renewal_point(cert, device_id, policy)
    is_due = now >= due_at
    if not is_clock_ok:
        return RenewalDecision(due_at, is_due, False, None,
                               "the clock is known to be wrong: no renewal until it is fixed")
    if force:
        return RenewalDecision(due_at, is_due, True, now, "forced")
    if not is_due:
        return RenewalDecision(due_at, False, False, due_at, "not due yet")
    failures = state.failures if state.cert_sha256 == cert.sha256 else 0
    if failures and state.last_attempt_at is not None:
        retry_at = state.last_attempt_at + timedelta(seconds=retry_wait_s(failures, policy))
        if now < retry_at:
            return RenewalDecision(due_at, True, False, retry_at,
                                   f"backing off after {failures} failed attempt(s)")
    return RenewalDecision(due_at, True, True, now, "due")
