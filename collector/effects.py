"""What a batch of messages does, as values: the effects the ingest decides, and a plan
that applies them exactly once however often a store outage interrupts it.

Owns the effect types (`Statuses`, `Online`, `Inventory`, `Reject` and, from admission,
`Unadmitted` and `Flooding`, from the decide stage; `NotifyStored`, `NotifyOnline` that
applying a store effect adds), the `Plan` (effects in message order and how many are
done) and `Applier`, which performs the next undone effect against the store and the
listeners. An effect is marked done only once it succeeded, so a retry after
`StoreUnavailable` resumes at the first undone one: nothing is written twice, listeners
are told once, a rejection is counted once.
A store refusal that no retry cures (any other `StoreError`) is not retried: a batch
of statuses is split and retried one by one, and what the store still refuses is
rejected as `store_refused`, counted like every rejection.
A status whose (boot_id, seq) the store already had is a `duplicate` when it is a copy
of what was stored (retained, re-sent by the broker, or the same signed payload again:
the agent's at-least-once resend) and a `replay` otherwise (docs/reliability.md).
Must not decide anything about a message (collector.ingest does) or read the wall
clock other than through the `now` it is given (for the rejection log's rate limit).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from certmon import wire as p
from certmon.mqtt import Incoming

from .store import InventoryRecord, StatusRecord, Store, StoreError, StoreUnavailable
from .verify import Verified

log = logging.getLogger("certmon.collector.ingest")

# Rejections are logged once per (device, reason) per this interval: a device stuck
# sending garbage every second must not fill the disk with the same line.
LOG_EVERY = timedelta(minutes=10)
STORE_REFUSED = "store_refused"  # the database refused a message's data (not an outage)
# Digests of the statuses this process stored lately, to recognise a resent copy
# without a store read: 32 bytes each, about 10 MB at the cap (minutes of a 10 000
# device fleet; the device's newest status is also recognised from the store).
RECENT_STORED = 65_536


@dataclass(frozen=True, slots=True)
class Stored:
    """A status that was new and is now the device's state (for alerts and views)."""

    status: p.Status
    record: StatusRecord


@dataclass(frozen=True, slots=True)
class Pending:
    """A verified status on its way to the store."""

    verified: Verified
    record: StatusRecord
    msg: Incoming


@dataclass(frozen=True, slots=True)
class Statuses:
    """Verified statuses, recorded in one transaction."""

    items: tuple[Pending, ...]


@dataclass(frozen=True, slots=True)
class Online:
    device_id: str
    online: bool
    at: datetime
    msg: Incoming


@dataclass(frozen=True, slots=True)
class Inventory:
    record: InventoryRecord
    msg: Incoming


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str
    msg: Incoming
    detail: str
    at: datetime


@dataclass(frozen=True, slots=True)
class Unadmitted:
    """A status not worth verifying (collector.admission): `superseded` by a newer
    pending one of its device, or `rate_limited`. Acknowledged and counted, not a
    rejection: the device is not at fault for each of them."""

    outcome: str
    msg: Incoming


@dataclass(frozen=True, slots=True)
class Flooding:
    """A device began (or stopped) sending over its budget: DEVICE_FLOODING."""

    device_id: str
    flooding: bool
    at: datetime


@dataclass(frozen=True, slots=True)
class Repeated:
    """A verified status whose (boot_id, seq) was already stored, neither retained nor
    marked DUP: a resent copy (duplicate) or a replay, which applying it decides."""

    item: Pending


@dataclass(frozen=True, slots=True)
class NotifyStored:
    stored: tuple[Stored, ...]


@dataclass(frozen=True, slots=True)
class NotifyOnline:
    device_id: str
    online: bool
    at: datetime


Effect = (Statuses | Online | Inventory | Reject | Repeated | NotifyStored | NotifyOnline
          | Unadmitted | Flooding)


@dataclass(slots=True)
class Plan:
    """A batch's effects in message order; `effects[:done]` have been applied."""

    effects: list[Effect] = field(default_factory=list)
    done: int = 0
    # The effect whose store call last failed as unavailable: it may have committed
    # all the same (the connection died before the COMMIT's answer came back).
    failed_at: int = -1

    @property
    def is_done(self) -> bool:
        return self.done >= len(self.effects)


class Applier:
    """Performs plans against one store; owns the ingest counters."""

    def __init__(self, store: Store, *, device_of: Callable[[str], str | None],
                 now: Callable[[], datetime],
                 on_stored: Callable[[Sequence[Stored]], None] | None,
                 on_online: Callable[[str, bool, datetime], None] | None,
                 on_flooding: Callable[[str, bool, datetime], None] | None = None) -> None:
        self.store = store
        self.on_flooding = on_flooding
        self.device_of = device_of  # topic → device id, for the rejection log's key
        self.now = now
        self.on_stored = on_stored
        self.on_online = on_online
        self.accepted = 0
        # Statuses stored before and seen again for a benign reason: retained after a
        # (re)subscribe, re-sent by the broker (DUP) or by the agent (same payload).
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        # Statuses acknowledged without the work: superseded, rate_limited (admission).
        self.unadmitted: Counter[str] = Counter()
        self._lock = threading.Lock()  # the web thread copies the counter
        self._logged: dict[tuple[str, str], datetime] = {}
        # device → (signing, client) certificate SHA-256 whose rows were last stored: with
        # a dedicated signing key the client certificate is renewed on its own.
        self.stored_certs: dict[str, tuple[str, str | None]] = {}
        self._recent: OrderedDict[bytes, None] = OrderedDict()  # RECENT_STORED digests

    def rejected_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.rejected)

    def unadmitted_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.unadmitted)

    def apply(self, plan: Plan) -> None:
        """Apply the undone effects in order. Raises `StoreUnavailable` with the plan
        resumable: call again (with the same plan) once the store may be back."""
        while not plan.is_done:
            try:
                follow = self._one(plan.effects[plan.done],
                                   maybe_committed=plan.failed_at == plan.done)
            except StoreUnavailable:
                plan.failed_at = plan.done
                raise
            plan.effects[plan.done + 1:plan.done + 1] = follow
            plan.done += 1

    def _one(self, effect: Effect, *, maybe_committed: bool = False) -> list[Effect]:
        try:
            if isinstance(effect, Statuses):
                return self._statuses(effect, maybe_committed)
            if isinstance(effect, Online):
                changed = self.store.set_online(effect.device_id, effect.online, effect.at)
                return [NotifyOnline(effect.device_id, effect.online, effect.at)] \
                    if changed and self.on_online else []
            if isinstance(effect, Inventory):
                self.store.put_inventory(effect.record)
                return []
            if isinstance(effect, Reject):
                self._reject(effect)
                return []
            if isinstance(effect, Repeated):
                self._repeated(effect.item)
                return []
            if isinstance(effect, Unadmitted):
                with self._lock:
                    self.unadmitted[effect.outcome] += 1
                return []
        except StoreUnavailable:
            raise
        except StoreError as exc:
            assert not isinstance(effect, (Reject, Repeated, NotifyStored, NotifyOnline,
                                           Unadmitted, Flooding))
            return self._refused(effect, exc)
        self._notify(effect)
        return []

    def _statuses(self, effect: Statuses, maybe_committed: bool) -> list[Effect]:
        results = self.store.record_statuses([item.record for item in effect.items])
        stored: list[Stored] = []
        follow: list[Effect] = []
        for item, is_new in zip(effect.items, results, strict=True):
            record, msg = item.record, item.msg
            if record.certs:
                self.stored_certs[record.device_id] = cert_key(item.verified)
            if is_new or (maybe_committed and self._is_stored_newest(record)):
                # New, or stored by this very batch's earlier attempt whose COMMIT
                # answer was lost: either way ours to count and to tell listeners.
                self.accepted += 1
                stored.append(Stored(item.verified.status, record))
                self._remember(item.verified.payload)
            elif msg.retained or msg.dup:
                # Seen again for a benign reason: the retained copy after a (re)subscribe,
                # or the broker re-sending what a crashed collector had not acknowledged.
                self.duplicates += 1
            else:
                follow.append(Repeated(item))
        if stored and self.on_stored is not None:
            follow.append(NotifyStored(tuple(stored)))
        return follow

    def _remember(self, payload: bytes) -> None:
        self._recent[hashlib.sha256(payload).digest()] = None
        if len(self._recent) > RECENT_STORED:
            self._recent.popitem(last=False)

    def _repeated(self, item: Pending) -> None:
        """A byte-identical copy of a stored status is a duplicate: the agent resends
        what it could not know the broker had (a PUBACK lost to a power cut or a
        dropped connection), and a copy makes nothing current. A different payload
        under a stored (boot_id, seq) is a replay: a reused sequence number, or a
        status signed twice for one place in the device's history."""
        record = item.record
        if (hashlib.sha256(item.verified.payload).digest() in self._recent
                or self._is_stored_newest(record)):
            self.duplicates += 1
            return
        self._reject(Reject("replay", item.msg, f"(boot_id, seq) = ({record.boot_id}, "
                            f"{record.seq}) already seen for {record.device_id}, and not a "
                            "copy of a status known here", record.received_at))

    def _is_stored_newest(self, record: StatusRecord) -> bool:
        """The device's newest stored status is this very payload (stored by another
        collector of the share group, or by this one before a restart)."""
        try:
            row = self.store.device(record.device_id)
        except StoreUnavailable:
            raise  # decided when the store is back: counted exactly once
        except StoreError:
            return False  # cannot tell: the stricter reading
        return (row is not None and row.boot_id == record.boot_id and row.seq == record.seq
                and row.status_json == record.status_json)

    def _refused(self, effect: Effect, exc: StoreError) -> list[Effect]:
        if isinstance(effect, Statuses) and len(effect.items) > 1:
            # One bad record must not cost the batch: each on its own transaction.
            return [Statuses((item,)) for item in effect.items]
        msgs = ([item.msg for item in effect.items] if isinstance(effect, Statuses)
                else [effect.msg] if isinstance(effect, (Online, Inventory)) else [])
        at = self.now()
        return [Reject(STORE_REFUSED, m, str(exc), m.received_at or at) for m in msgs]

    def _notify(self, effect: Effect) -> None:
        try:
            if isinstance(effect, NotifyStored) and self.on_stored is not None:
                self.on_stored(effect.stored)
            elif isinstance(effect, NotifyOnline) and self.on_online is not None:
                self.on_online(effect.device_id, effect.online, effect.at)
            elif isinstance(effect, Flooding):
                if effect.flooding:
                    log.warning("%s sends statuses over its budget: only its newest pending "
                                "one is verified and stored meanwhile", effect.device_id)
                if self.on_flooding is not None:
                    self.on_flooding(effect.device_id, effect.flooding, effect.at)
        except StoreUnavailable:
            raise  # told again on retry: listeners' store transitions are idempotent
        except Exception:
            # A listener's bug must not hold the ingest: the store has the data.
            log.exception("a device listener failed")

    def _reject(self, r: Reject) -> None:
        try:
            self.store.count_rejection(r.reason, at=r.at, topic=r.msg.topic[:256],
                                       detail=r.detail[:500], sample=r.msg.payload[:512])
        except StoreUnavailable:
            raise  # counted when the store has it, so exactly once
        except StoreError:
            log.exception("could not record a rejection")
        with self._lock:
            self.rejected[r.reason] += 1
        now = self.now()
        key = (self.device_of(r.msg.topic) or "?", r.reason)
        last = self._logged.get(key)
        if last is None or now - last >= LOG_EVERY:
            self._logged[key] = now
            if len(self._logged) > 100_000:  # bounded, even under a flood of device ids
                self._logged.clear()
            log.warning("rejected %s from %s: %s", r.reason, r.msg.topic[:120], r.detail[:300])


def cert_key(verified: Verified) -> tuple[str, str | None]:
    client = verified.status.client
    return verified.signer.facts.sha256, client.sha256 if client else None


def rejected_plan(batch: Sequence[Incoming], plan: Plan | None, detail: str,
                  now: datetime) -> Plan:
    """What a bug kept failing, rejected as `internal_error`: every message of `batch`
    when it could not even be decided, else the messages of the effects not yet
    applied (what is stored stays stored and counted once)."""
    def bug(m: Incoming) -> Reject:
        return Reject("internal_error", m, detail, m.received_at or now)

    if plan is None:
        return Plan([bug(m) for m in batch])
    rest: list[Effect] = []
    for effect in plan.effects[plan.done:]:
        if isinstance(effect, Statuses):
            rest += [bug(item.msg) for item in effect.items]
        elif isinstance(effect, Repeated):
            rest.append(bug(effect.item.msg))
        elif isinstance(effect, (Online, Inventory)):
            rest.append(bug(effect.msg))
        elif isinstance(effect, (Reject, Unadmitted, Flooding)):
            rest.append(effect)  # already judged: keeps its own reason
    return Plan(rest)
