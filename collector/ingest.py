"""Ingest: from MQTT messages to verified, stored device state — or counted rejections.

Owns the per-message pipeline (topic → kind → verify → record), batching of store
writes (one transaction per batch), rejection accounting (a counter per reason, a
bounded sample in the store, one log line per device and reason per interval) and
the hand-off of stored statuses to alert evaluation and fleet topics. Nothing it is
sent may crash it: every input ends as "stored" or "rejected: <reason>".
Verification rules live in collector.verify; storage in collector.store.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from certmon import pki
from certmon import wire as p
from certmon.errors import ProtocolError
from certmon.mqtt import Incoming

from . import aggregate
from .store import CertLink, CertRole, CertRow, FindingRecord, InventoryRecord, StatusRecord, Store
from .verify import (
    CertCache,
    KnownCert,
    Verified,
    accept_cert_message,
    check_signed,
    resolve_signer,
)
from .verifypool import VerifierPool

log = logging.getLogger("certmon.collector.ingest")

# Rejections are logged once per (device, reason) per this interval: a device stuck
# sending garbage every second must not fill the disk with the same line.
LOG_EVERY = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class Stored:
    """A status that was new and is now the device's state (for alerts and views)."""

    status: p.Status
    record: StatusRecord


class Ingestor:
    def __init__(
        self,
        store: Store,
        certs: CertCache,
        *,
        prefix: str = p.DEFAULT_PREFIX,
        max_payload_bytes: int = 65536,
        now: Callable[[], datetime],
        on_stored: Callable[[Sequence[Stored]], None] | None = None,
        on_online: Callable[[str, bool, datetime], None] | None = None,
        pool: VerifierPool | None = None,
    ) -> None:
        self.pool = pool
        self.store = store
        self.certs = certs
        self.prefix = prefix
        self.max_payload_bytes = max_payload_bytes
        self.now = now
        self.on_stored = on_stored
        self.on_online = on_online
        self.accepted = 0
        self.duplicates = 0  # retained statuses seen again: normal after a (re)subscribe
        self.rejected: Counter[str] = Counter()
        self._logged: dict[tuple[str, str], datetime] = {}
        # device → (signing, client) certificate SHA-256 whose rows were last stored: with
        # a dedicated signing key the client certificate is renewed on its own.
        self._stored_certs: dict[str, tuple[str, str | None]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ entry point

    def process(self, messages: Sequence[Incoming]) -> None:
        """Handle a batch in arrival order; statuses are written in one transaction."""
        pending: list[tuple[Verified, StatusRecord, Incoming]] = []
        signed: list[tuple[Incoming, str, p.ParsedJWS, KnownCert]] = []
        for msg in messages:
            try:
                self._one(msg, pending, signed)
            except ProtocolError as exc:
                self.reject(exc.reason, msg, str(exc))
            except Exception as exc:
                log.exception("unexpected error on %s", msg.topic[:200])
                self.reject("internal_error", msg, f"{type(exc).__name__}: {exc}")
        if signed:
            self._verify_in_pool(signed, pending)
        if pending:
            self._record(pending)

    def _verify_in_pool(self, signed: list[tuple[Incoming, str, p.ParsedJWS, KnownCert]],
                        pending: list[tuple[Verified, StatusRecord, Incoming]]) -> None:
        assert self.pool is not None
        try:
            outcomes = self.pool.verify([
                (device_id, parsed, known.identity, known.public_key_der)
                for _msg, device_id, parsed, known in signed])
        except (OSError, EOFError) as exc:
            # A worker died (killed, out of memory): verify in this process from now on
            # rather than fail every batch.
            log.error("verification worker lost (%s): verifying in the collector process",
                      exc)
            self.pool = None
            for msg, device_id, parsed, known in signed:
                try:
                    verified = self._verify(device_id, parsed, known)
                    pending.append((verified, self._status_record(verified, msg, self.now()),
                                    msg))
                except ProtocolError as err:
                    self.reject(err.reason, msg, str(err))
            return
        now = self.now()
        for (msg, _device, _parsed, known), outcome in zip(signed, outcomes, strict=True):
            if outcome.status is None or outcome.payload is None:
                self.reject(outcome.reason or "internal_error", msg, outcome.detail or "")
                continue
            verified = Verified(outcome.status, known, outcome.payload)
            pending.append((verified, self._status_record(verified, msg, now), msg))

    def _one(self, msg: Incoming, pending: list[tuple[Verified, StatusRecord, Incoming]],
             signed: list[tuple[Incoming, str, p.ParsedJWS, KnownCert]]) -> None:
        if len(msg.payload) > self.max_payload_bytes:
            raise ProtocolError("oversized", f"{len(msg.payload)} bytes (limit "
                                f"{self.max_payload_bytes})")
        parsed = p.parse_device_topic(self.prefix, msg.topic)
        if parsed is None:
            raise ProtocolError("bad_topic", f"not a certmon device topic: {msg.topic[:120]!r}")
        device_id, kind = parsed
        now = self.now()
        if kind == p.TopicKind.STATUS:
            if not msg.payload:
                return  # a cleared retained topic
            # Parsed once here; the signature is checked in this thread or a worker.
            parsed_jws = p.parse_jws(msg.payload, self.max_payload_bytes)
            known = self._signer(device_id, parsed_jws, now)
            if self.pool is not None:
                signed.append((msg, device_id, parsed_jws, known))
                return
            verified = self._verify(device_id, parsed_jws, known)
            pending.append((verified, self._status_record(verified, msg, now), msg))
        elif kind == p.TopicKind.CERT and msg.payload:
            accept_cert_message(self.certs, device_id, msg.payload, now)
        elif kind == p.TopicKind.ONLINE:
            self._online(device_id, msg, now)
        elif kind == p.TopicKind.INVENTORY and msg.payload:
            self._inventory(device_id, msg.payload, now)

    # ------------------------------------------------------------ statuses

    @staticmethod
    def _verify(device_id: str, parsed: p.ParsedJWS, known: KnownCert) -> Verified:
        status = check_signed(parsed, known.cert.public_key(), known.identity, device_id)
        return Verified(status, known, parsed.payload)

    def _signer(self, device_id: str, parsed: p.ParsedJWS, now: datetime) -> KnownCert:
        try:
            return resolve_signer(self.certs, parsed, now)
        except ProtocolError as exc:
            if exc.reason != "unknown_cert" or not self._load_cert_from_store(
                    device_id, parsed.cert_sha256, now):
                raise
        return resolve_signer(self.certs, parsed, now)

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

    def _status_record(self, verified: Verified, msg: Incoming, now: datetime) -> StatusRecord:
        status, signer = verified.status, verified.signer
        severity, worst_code = aggregate.headline(status.findings)
        offset = aggregate.clock_offset(status, now, retained=msg.retained)
        # Certificate rows are written when a device's certificate changes (or first
        # seen by this process), not with every status: at thousands of statuses per
        # second, re-upserting the same rows would be most of the store's work.
        links: tuple[CertLink, ...] = ()
        roles: frozenset[CertRole] = frozenset()
        if self._stored_certs.get(status.device_id) != _cert_key(verified):
            links, roles = _cert_links(signer, status)
        return StatusRecord(
            device_id=status.device_id, boot_id=status.boot_id, seq=status.seq,
            device_ts=status.ts, received_at=now, interval_s=status.interval_s,
            status_json=verified.payload.decode("utf-8"),
            severity=int(severity), worst_code=worst_code,
            findings=tuple(FindingRecord(f.code, int(f.severity), f.cert, f.msg)
                           for f in status.findings),
            client_sha256=status.client.sha256 if status.client else None,
            trust_digest=status.trust_store.digest if status.trust_store else None,
            certs=links, replace_roles=roles,
            clock_offset_lo_s=offset.lo_s, clock_offset_hi_s=offset.hi_s,
        )

    def _record(self, pending: list[tuple[Verified, StatusRecord, Incoming]]) -> None:
        results = self.store.record_statuses([record for _, record, _ in pending])
        stored: list[Stored] = []
        for (verified, record, msg), is_new in zip(pending, results, strict=True):
            if record.certs:
                self._stored_certs[record.device_id] = _cert_key(verified)
            if is_new:
                self.accepted += 1
                stored.append(Stored(verified.status, record))
            elif msg.retained or msg.dup:
                # Seen again for a benign reason: the retained copy after a (re)subscribe,
                # or the broker re-sending what a crashed collector had not acknowledged.
                self.duplicates += 1
            else:
                self.reject("replay", msg, f"(boot_id, seq) = ({record.boot_id}, {record.seq}) "
                            f"already seen for {record.device_id}")
        if stored and self.on_stored is not None:
            self.on_stored(stored)

    # ------------------------------------------------------------ other topics

    def _online(self, device_id: str, msg: Incoming, now: datetime) -> None:
        if not msg.payload:
            return
        online = p.parse_online(msg.payload)
        # Unsigned, but broker-attested: the ACL lets only this device (or the broker,
        # for its will) write this topic (docs/mosquitto.md).
        if self.store.set_online(device_id, online, now) and self.on_online:
            self.on_online(device_id, online, now)

    def _inventory(self, device_id: str, token: bytes, now: datetime) -> None:
        parsed = p.parse_jws(token, p.MAX_INVENTORY_JWS_BYTES, typ=p.INVENTORY_TYP)
        known = self.certs.get(parsed.cert_sha256, now)
        if known is None:
            raise ProtocolError("unknown_cert", "inventory signed by an unknown certificate")
        if not known.trusted or known.identity != device_id:
            raise ProtocolError("identity_mismatch", "inventory not signed by this device")
        p.verify_jws(parsed, known.cert.public_key())
        inv = p.decode_message(p.Inventory, parsed.payload, max_bytes=p.MAX_INVENTORY_JWS_BYTES)
        if inv.device_id != device_id:
            raise ProtocolError("topic_mismatch", "inventory for another device")
        cas = tuple(CertRow(sha256=c.sha256, subject=c.subject, not_before=c.not_before,
                            not_after=c.not_after, is_ca=True) for c in inv.cas)
        self.store.put_inventory(InventoryRecord(device_id, inv.digest, json.dumps(
            [c.to_json() for c in inv.cas], separators=(",", ":")), now, cas))

    # ------------------------------------------------------------ rejections

    def reject(self, reason: str, msg: Incoming, detail: str) -> None:
        now = self.now()
        with self._lock:
            self.rejected[reason] += 1
        try:
            self.store.count_rejection(reason, at=now, topic=msg.topic[:256], detail=detail[:500],
                                       sample=msg.payload[:512])
        except Exception:
            log.exception("could not record a rejection")
        device = (p.parse_device_topic(self.prefix, msg.topic) or ("?", None))[0]
        key = (device, reason)
        last = self._logged.get(key)
        if last is None or now - last >= LOG_EVERY:
            self._logged[key] = now
            if len(self._logged) > 100_000:  # bounded, even under a flood of device ids
                self._logged.clear()
            log.warning("rejected %s from %s: %s", reason, msg.topic[:120], detail[:300])


def _cert_key(verified: Verified) -> tuple[str, str | None]:
    client = verified.status.client
    return verified.signer.facts.sha256, client.sha256 if client else None


def _cert_links(signer: KnownCert, status: p.Status
                ) -> tuple[tuple[CertLink, ...], frozenset[CertRole]]:
    """The certificate rows a status implies, and the roles they replace."""
    def chain(facts: Sequence[pki.CertFacts], der: Sequence[bytes]) -> list[CertLink]:
        return [CertLink(CertRow.from_facts(f, d), CertRole.CLIENT if i == 0 else CertRole.CHAIN)
                for i, (f, d) in enumerate(zip(facts, der, strict=True))]

    client_sha = status.client.sha256 if status.client else None
    if client_sha is None or client_sha == signer.facts.sha256:
        # Signed with the TLS key: the signing chain is the client chain.
        return (tuple(chain(signer.chain_facts, signer.chain_der)),
                frozenset({CertRole.CLIENT, CertRole.CHAIN}))
    # A dedicated signing key: the signing certificate in its own role, and the client
    # chain from the cert message when it names the client certificate of this status.
    links = [CertLink(CertRow.from_facts(signer.facts, signer.chain_der[0]), CertRole.SIGNING)]
    roles = {CertRole.SIGNING}
    facts = signer.client_chain_facts
    if facts and facts[0].sha256 == client_sha:
        links += chain(facts, signer.client_chain_der)
        roles |= {CertRole.CLIENT, CertRole.CHAIN}
    return tuple(links), frozenset(roles)
