"""Ingest: from MQTT messages to verified, stored device state — or counted rejections.

Owns the per-message pipeline (topic → admission → kind → verify → record) as a
side-effect-free decide stage: `decide(batch)` turns a batch into a `Plan` of effects
in message order
(status runs recorded in one transaction — a heartbeat recorded as the full status
it names, with its own sequence number and clock sample; rejections with their
reason), which
`apply(plan)` performs (collector.effects: exactly once, resumable after a store
outage). Nothing it is sent may crash it: every input ends as "stored" or
"rejected: <reason>". Decide reads the store only to load a certificate another
collector stored, or the stored status a heartbeat names when this process has not
verified it; it writes nothing but the in-memory certificate cache, which is
idempotent, and, once decided, the admission buckets, so after `StoreUnavailable` it
is simply run again. Admission (collector.admission) comes first and reads only topics
and arrival instants: a device over its budget has only its newest pending status
verified, the others acknowledged as counted `superseded` / `rate_limited`.
Verification rules live in collector.verify; the records stored and the plan's
order in collector.records; what a heartbeat names in collector.heartbeats;
storage in collector.store.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from certmon import wire as p
from certmon.errors import ProtocolError
from certmon.mqtt import Incoming

from .admission import Admission, Budget, Judgement, Verdict
from .effects import (
    Applier,
    Effect,
    Flooding,
    Inventory,
    Online,
    Pending,
    Plan,
    Reject,
    Stored,
    Unadmitted,
    cert_key,
)
from .heartbeats import FullStatus, FullStatuses, full_status, heartbeat_record
from .records import inventory_record, plan_of, status_record
from .store import (
    CertRole,
    StatusRecord,
    Store,
    StoreUnavailable,
)
from .verify import (
    CertCache,
    KnownCert,
    Verified,
    accept_cert_message,
    check_signed,
    resolve_signer,
)
from .verifypool import VerifierPool

__all__ = ["Ingestor", "Stored"]

log = logging.getLogger("certmon.collector.ingest")

# A signed status waiting for the verifier pool, at its place in the batch.
_Signed = tuple[Incoming, str, p.ParsedJWS, KnownCert, datetime]
TOPICS_KEPT = 200_000  # parsed topics remembered (a few per device)
# What admission charges to a device's budget: a heartbeat is a report like a status.
_BUDGETED = (p.TopicKind.STATUS, p.TopicKind.HEARTBEAT)


@dataclass(frozen=True, slots=True)
class _Beat:
    """A heartbeat waiting for the batch's statuses to be verified (the one it names
    may be among them, in the verifier pool), at its place in the batch."""

    msg: Incoming
    device_id: str
    at: datetime


_Decided = Pending | Effect | int | None | _Beat  # int: the index of a `_Signed` slot


class Ingestor:
    def __init__(
        self,
        store: Store,
        certs: CertCache,
        *,
        prefix: str = p.DEFAULT_PREFIX,
        legacy_v1_topics: bool = False,
        max_payload_bytes: int = 65536,
        now: Callable[[], datetime],
        on_stored: Callable[[Sequence[Stored]], None] | None = None,
        on_online: Callable[[str, bool, datetime], None] | None = None,
        pool: VerifierPool | None = None,
        budget: Budget | None = None,
        on_flooding: Callable[[str, bool, datetime], None] | None = None,
    ) -> None:
        self.pool = pool
        # Per-device admission before the expensive work (collector.admission).
        self.admission = Admission(budget or Budget())
        self._topics: dict[str, tuple[str, p.TopicKind] | None] = {}
        # Per device, the last full statuses (bounded, collector.heartbeats): what
        # heartbeats name.
        self._full = FullStatuses()
        self.heartbeats_unknown = 0  # heartbeats naming a full status not seen here
        self.store = store
        self.certs = certs
        self.prefix = prefix
        # Also accept the certmon/v1 topic layout while a fleet migrates (docs/mosquitto.md).
        self.legacy_v1_topics = legacy_v1_topics
        self.max_payload_bytes = max_payload_bytes
        self.now = now
        self.applier = Applier(store, device_of=self.device_of, now=now,
                               on_stored=on_stored, on_online=on_online,
                               on_flooding=on_flooding)

    # ------------------------------------------------------------ counters

    @property
    def accepted(self) -> int:
        return self.applier.accepted

    @property
    def duplicates(self) -> int:
        return self.applier.duplicates

    @property
    def rejected(self) -> Counter[str]:
        """The live counter by reason (this thread's view; others use rejected_counts)."""
        return self.applier.rejected

    def rejected_counts(self) -> dict[str, int]:
        """This process's rejections by reason (a copy: safe from any thread)."""
        return self.applier.rejected_counts()

    def unadmitted_counts(self) -> dict[str, int]:
        """Statuses acknowledged unverified, by outcome: superseded, rate_limited."""
        return self.applier.unadmitted_counts()

    def device_of(self, topic: str) -> str | None:
        """The device a topic belongs to (None: not a device topic)."""
        parsed = self._parse_topic(topic)
        return parsed[0] if parsed else None

    def _parse_topic(self, topic: str) -> tuple[str, p.TopicKind] | None:
        """`parse_device_topic`, remembered: a device's topics repeat, and validating
        each level character by character was most of the cost of a flood."""
        try:
            return self._topics[topic]
        except KeyError:
            pass
        if len(self._topics) >= TOPICS_KEPT:
            self._topics.clear()  # bounded, even under a flood of device ids
        parsed = self._topics[topic] = p.parse_device_topic(
            self.prefix, topic, legacy_v1=self.legacy_v1_topics)
        return parsed

    # ------------------------------------------------------------ entry points

    def process(self, messages: Sequence[Incoming]) -> None:
        """Decide and apply a batch; raises `StoreUnavailable` (tests, benches: the
        service keeps the plan and retries `apply` instead)."""
        self.apply(self.decide(messages))

    def apply(self, plan: Plan) -> None:
        self.applier.apply(plan)

    def decide(self, messages: Sequence[Incoming]) -> Plan:
        """The batch's effects in message order. Raises `StoreUnavailable` only."""
        decided: list[_Decided] = []
        signed: list[_Signed] = []
        judgement, verdicts = self._admit(messages)
        for msg, verdict in zip(messages, verdicts, strict=True):
            at = msg.received_at or self.now()
            if verdict is not Verdict.ADMIT:
                decided.append(Unadmitted(verdict.value, msg))
                continue
            try:
                decided.append(self._one(msg, at, signed))
            except ProtocolError as exc:
                decided.append(Reject(exc.reason, msg, str(exc), at))
            except StoreUnavailable:
                raise
            except Exception as exc:
                log.exception("unexpected error on %s", msg.topic[:200])
                decided.append(Reject("internal_error", msg, f"{type(exc).__name__}: {exc}",
                                      at))
        checked = self._verify_in_pool(signed) if signed else []
        plan = plan_of([checked[d] if isinstance(d, int) else
                      self._resolve_beat(d) if isinstance(d, _Beat) else d for d in decided])
        now = self.now()
        plan.effects += [Flooding(d, True, now) for d in judgement.started]
        plan.effects += [Flooding(d, False, now) for d in judgement.calmed]
        judgement.commit()  # decided: charge the buckets once, however often retried
        return plan

    def _admit(self, messages: Sequence[Incoming]) -> tuple[Judgement, list[Verdict]]:
        """Admission verdicts, one per message (ADMIT for all but live statuses); only
        the topic and the arrival are read: nothing is parsed or verified for this."""
        statuses: list[tuple[int, str, datetime]] = []
        for i, msg in enumerate(messages):
            parsed = self._parse_topic(msg.topic)
            if parsed is not None and parsed[1] in _BUDGETED and msg.payload \
                    and not msg.retained:  # a retained copy is one per device anyway
                statuses.append((i, parsed[0], msg.received_at or self.now()))
        judgement = self.admission.judge([(device, at) for _i, device, at in statuses])
        verdicts = [Verdict.ADMIT] * len(messages)
        for (i, _device, _at), verdict in zip(statuses, judgement.verdicts, strict=True):
            verdicts[i] = verdict
        return judgement, verdicts

    def _one(self, msg: Incoming, at: datetime, signed: list[_Signed]) -> _Decided:
        if len(msg.payload) > self.max_payload_bytes:
            raise ProtocolError("oversized", f"{len(msg.payload)} bytes (limit "
                                f"{self.max_payload_bytes})")
        parsed = self._parse_topic(msg.topic)
        if parsed is None:
            raise ProtocolError("bad_topic", f"not a certmon device topic: {msg.topic[:120]!r}")
        device_id, kind = parsed
        if kind == p.TopicKind.STATUS:
            if not msg.payload:
                return None  # a cleared retained topic
            # Parsed once here; the signature is checked in this thread or a worker.
            parsed_jws = p.parse_jws(msg.payload, self.max_payload_bytes)
            known = self._signer(device_id, parsed_jws, at)
            if self.pool is not None:
                signed.append((msg, device_id, parsed_jws, known, at))
                return len(signed) - 1
            verified = self._verify(device_id, parsed_jws, known)
            return Pending(verified, self._status_record(verified, msg, at), msg)
        if kind == p.TopicKind.HEARTBEAT:
            return _Beat(msg, device_id, at) if msg.payload else None
        if kind == p.TopicKind.CERT and msg.payload:
            accept_cert_message(self.certs, device_id, msg.payload, at)
        elif kind == p.TopicKind.ONLINE and msg.payload:
            # Unsigned, but broker-attested: the ACL lets only this device (or the
            # broker, for its will) write this topic (docs/mosquitto.md).
            return Online(device_id, p.parse_online(msg.payload), at, msg)
        elif kind == p.TopicKind.INVENTORY and msg.payload:
            return Inventory(inventory_record(self.certs, device_id, msg.payload, at), msg)
        return None

    def _verify_in_pool(self, signed: list[_Signed]) -> list[Pending | Reject]:
        assert self.pool is not None
        try:
            outcomes = self.pool.verify([
                (device_id, parsed, known.identity, known.public_key_der)
                for _msg, device_id, parsed, known, _at in signed])
        except (OSError, EOFError) as exc:
            # A worker died (killed, out of memory): verify in this process from now on
            # rather than fail every batch.
            log.error("verification worker lost (%s): verifying in the collector process",
                      exc)
            self.pool = None
            out: list[Pending | Reject] = []
            for msg, device_id, parsed, known, at in signed:
                try:
                    verified = self._verify(device_id, parsed, known)
                    out.append(Pending(verified, self._status_record(verified, msg, at), msg))
                except ProtocolError as err:
                    out.append(Reject(err.reason, msg, str(err), at))
            return out
        out = []
        for (msg, _device, _parsed, known, at), outcome in zip(signed, outcomes, strict=True):
            if outcome.status is None or outcome.payload is None:
                out.append(Reject(outcome.reason or "internal_error", msg, outcome.detail or "",
                                  at))
                continue
            verified = Verified(outcome.status, known, outcome.payload)
            out.append(Pending(verified, self._status_record(verified, msg, at), msg))
        return out

    # ------------------------------------------------------------ statuses

    @staticmethod
    def _verify(device_id: str, parsed: p.ParsedJWS, known: KnownCert) -> Verified:
        status = check_signed(parsed, known.cert.public_key(), known.identity, device_id)
        return Verified(status, known, parsed.payload)

    def _signer(self, device_id: str, parsed: p.ParsedJWS, now: datetime) -> KnownCert:
        try:
            return resolve_signer(self.certs, parsed, now, device_id)
        except ProtocolError as exc:
            if exc.reason != "unknown_cert" or not self._load_cert_from_store(
                    device_id, parsed.cert_sha256, now):
                raise
        return resolve_signer(self.certs, parsed, now, device_id)

    def _load_cert_from_store(self, device_id: str, sha: str, now: datetime) -> bool:
        # Another collector of the share group may have seen the cert message; the
        # store keeps the DER of every device certificate and its chain.
        row = self.store.certificate(sha)
        if row is None or row.der is None:
            return False
        # device_certs() names the chain; only certificate() carries the DER.
        chain = [self.store.certificate(link.cert.sha256)
                 for link in self.store.device_certs(device_id) if link.role == CertRole.CHAIN]
        try:
            certs = [x509.load_der_x509_certificate(row.der)]
            certs += [x509.load_der_x509_certificate(c.der) for c in chain if c and c.der]
        except ValueError:
            return False
        self.certs.add(certs, now)
        return True

    def _status_record(self, verified: Verified, msg: Incoming, at: datetime) -> StatusRecord:
        """`at`: when the message arrived, which is what the store keeps as received."""
        # Certificate rows are written when a device's certificate changes (or first
        # seen by this process), not with every status: at thousands of statuses per
        # second, re-upserting the same rows would be most of the store's work.
        with_certs = self.applier.stored_certs.get(verified.status.device_id) \
            != cert_key(verified)
        record = status_record(verified, retained=msg.retained, at=at, with_certs=with_certs)
        self._full.saw(verified.status.device_id,
                       full_status(verified.payload, verified.status, record))
        return record

    # ------------------------------------------------------------ heartbeats

    def _resolve_beat(self, beat: _Beat) -> Pending | Reject:
        try:
            return self._heartbeat(beat.device_id, beat.msg, beat.at)
        except ProtocolError as exc:
            return Reject(exc.reason, beat.msg, str(exc), beat.at)
        except StoreUnavailable:
            raise
        except Exception as exc:
            log.exception("unexpected error on %s", beat.msg.topic[:200])
            return Reject("internal_error", beat.msg, f"{type(exc).__name__}: {exc}", beat.at)

    def _heartbeat(self, device_id: str, msg: Incoming, at: datetime) -> Pending:
        """A verified heartbeat as the record of the full status it names, with its own
        (boot_id, seq), instants and clock sample: stored like a status, so the replay
        window, the order, liveness and the clock offset hold for both, while the
        stored status (findings, certificates, status_json) stays what it was, so a
        heartbeat alone can change no alert. Naming a full status this process has not
        verified (a new collector before the retained status arrived, a lost one) is
        counted `heartbeat_unknown_status`: the retained or next full status mends it."""
        parsed = p.parse_jws(msg.payload, p.MAX_HEARTBEAT_JWS_BYTES, typ=p.HEARTBEAT_TYP)
        known = self._signer(device_id, parsed, at)
        p.verify_jws(parsed, known.cert.public_key())
        beat = p.decode_heartbeat(parsed.payload)
        if known.identity != beat.device_id:
            raise ProtocolError("identity_mismatch", f"heartbeat for {beat.device_id!r} "
                                f"signed by the certificate of {known.identity!r}")
        if beat.device_id != device_id:
            raise ProtocolError("topic_mismatch", f"heartbeat for {beat.device_id!r} "
                                f"published on the topic of {device_id!r}")
        full = self._full.find(device_id, beat.status_digest) or \
            self._full_from_store(device_id, beat.status_digest, known, at)
        if full is None:
            self.heartbeats_unknown += 1
            raise ProtocolError("heartbeat_unknown_status",
                                f"heartbeat seq={beat.seq} names status "
                                f"{beat.status_digest[:16]}…, not the last one seen here")
        status, record = heartbeat_record(full, beat, retained=msg.retained, at=at)
        return Pending(Verified(status, known, parsed.payload), record, msg)

    def _full_from_store(self, device_id: str, digest: str, known: KnownCert,
                         at: datetime) -> FullStatus | None:
        """The stored status when it is the one `digest` names: another collector of
        the share group stored it (the group hands a device's messages to any member),
        or this one did before a restart. status_json is the verified payload itself."""
        row = self.store.device(device_id)
        if row is None or row.status_json is None:
            return None
        payload = row.status_json.encode("utf-8")
        if p.status_digest(payload) != digest:
            return None
        verified = Verified(p.decode_status(payload), known, payload)
        record = self._status_record(
            verified, Incoming(topic="", payload=b"", retained=True, qos=0), at)
        # Remembered whatever the cache held: the device's signed heartbeat names it.
        full = full_status(payload, verified.status, record)
        self._full.loaded(device_id, full)
        return full

    # ------------------------------------------------------------ other topics
