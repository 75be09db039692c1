"""Deciding whether a status message is genuine: DESIGN.md §4, in one place.

Owns the acceptance rule: the JWS verifies with the certificate its `x5t#S256`
names; that certificate chains to a configured fleet CA (judged at min(now,
not_after − 1 s), so an *expired* device certificate is still reported, not
dropped); the device id in the payload equals the certificate's identity equals the
topic segment; the schema version is known. Replay is the store's atomic check.
Pure apart from an in-memory cache of certificate verdicts; no MQTT, no database.
Every rejection is a `ProtocolError` with a stable `reason` token.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certmon import pki
from certmon import wire as p
from certmon.chain import verify_chain
from certmon.errors import ProtocolError

# Reasons added here on top of certmon.wire's parsing reasons; the last three are
# ingest's (a bug caught per message, a row the database refused, a heartbeat naming a
# full status the collector does not know).
REASONS = (*p.PROTOCOL_REASONS, "unknown_cert", "untrusted_cert", "identity_mismatch",
           "topic_mismatch", "bad_topic", "replay", "bad_cert_message",
           "internal_error", "store_refused", "heartbeat_unknown_status")


@dataclass(frozen=True, slots=True)
class KnownCert:
    """A device certificate the collector has seen on a cert topic and judged."""

    cert: x509.Certificate
    facts: pki.CertFacts
    chain: tuple[x509.Certificate, ...]  # as the device published it, leaf first
    identity: str | None
    trusted: bool
    trust_error: str | None
    # Facts and DER of every chain element, computed once here rather than per status
    # (the ingest hot path stores them only when a device's certificate changes).
    chain_facts: tuple[pki.CertFacts, ...] = ()
    chain_der: tuple[bytes, ...] = ()
    public_key_der: bytes = b""  # SubjectPublicKeyInfo, what verifier workers receive
    # With a dedicated signing key, the device's client (TLS) chain as its cert message
    # carried it (`client_x5c`), leaf first: recorded as the device's client
    # certificate, while `cert` above is the signing certificate. Empty otherwise.
    client_chain: tuple[x509.Certificate, ...] = ()
    client_chain_facts: tuple[pki.CertFacts, ...] = ()
    client_chain_der: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Verified:
    status: p.Status
    signer: KnownCert
    payload: bytes  # the signed JSON, canonical as the agent encoded it


class CertCache:
    """Device certificates by SHA-256, each judged once against the fleet CAs.

    Bounded (LRU) so a flood of junk cert messages cannot grow memory; a verdict is
    re-judged after `ttl` because "valid at min(now, not_after − 1 s)" moves with now.
    """

    def __init__(self, fleet_cas: Sequence[x509.Certificate], *, max_entries: int = 200_000,
                 ttl: timedelta = timedelta(hours=1)) -> None:
        self.fleet_cas = list(fleet_cas)
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[str, tuple[KnownCert, datetime]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def chain_certs(self) -> set[x509.Certificate]:
        """The certificates above the leaf of every trusted device chain held here:
        the intermediates a fleet CRL may be signed by (collector.revocation admits
        each by signature)."""
        with self._lock:
            held = [known for known, _ in self._entries.values() if known.trusted]
        return {c for known in held for c in (*known.chain[1:], *known.client_chain[1:])}

    def get(self, sha256: str, now: datetime) -> KnownCert | None:
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is None:
                return None
            self._entries.move_to_end(sha256)
        known, judged_at = entry
        if now - judged_at > self.ttl:
            return self.add(known.chain, now, client_chain=known.client_chain)
        return known

    def add(self, chain: Sequence[x509.Certificate], now: datetime, *,
            client_chain: Sequence[x509.Certificate] = ()) -> KnownCert:
        """Judge a device's signing chain (leaf first) and remember it under the leaf's
        SHA-256; `client_chain` is its TLS chain when it signs with a dedicated key."""
        leaf, *rest = chain
        facts = pki.facts_from_cert(leaf)
        # An expired device certificate must still be reported: judge the chain at
        # the last instant it could have been valid, so "expired" stays a finding in
        # its status rather than a silent rejection of the device.
        at = min(now, facts.not_after - timedelta(seconds=1))
        result = verify_chain(leaf, rest, self.fleet_cas, at, purpose="client")
        known = KnownCert(leaf, facts, tuple(chain), pki.identity_of(facts), result.is_valid,
                          result.error,
                          chain_facts=(facts, *(pki.facts_from_cert(c) for c in rest)),
                          chain_der=tuple(c.public_bytes(serialization.Encoding.DER)
                                          for c in chain),
                          public_key_der=leaf.public_key().public_bytes(
                              serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo),
                          client_chain=tuple(client_chain),
                          client_chain_facts=tuple(pki.facts_from_cert(c) for c in client_chain),
                          client_chain_der=tuple(c.public_bytes(serialization.Encoding.DER)
                                                 for c in client_chain))
        with self._lock:
            self._entries[facts.sha256] = (known, now)
            self._entries.move_to_end(facts.sha256)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return known


def accept_cert_message(cache: CertCache, device_id: str, payload: bytes,
                        now: datetime) -> KnownCert:
    """A retained `cert` topic message: the device's signing chain. Unsigned, because
    a certificate authenticates itself by chaining to the fleet CA; refused if it
    does not, or if it names another device."""
    msg = p.decode_message(p.CertMessage, payload, max_bytes=p.MAX_MESSAGE_BYTES)
    if msg.device_id != device_id:
        raise ProtocolError("topic_mismatch", f"cert message for {msg.device_id!r} on the "
                            f"topic of {device_id!r}")
    client_chain = msg.certificates(client=True) if msg.client_x5c else []
    return judge_device_chain(cache, device_id, msg.certificates(), now,
                              client_chain=client_chain)


def judge_device_chain(cache: CertCache, device_id: str | None,
                       chain: Sequence[x509.Certificate], now: datetime, *,
                       client_chain: Sequence[x509.Certificate] = ()) -> KnownCert:
    """A device's signing chain, from its cert message or a status's `x5c` header (one
    rule for both): remembered with its verdict, refused unless it chains to a fleet CA
    and names `device_id` (None: the identity is checked with the status instead)."""
    known = cache.add(chain, now, client_chain=client_chain)
    if not known.trusted:
        raise ProtocolError("untrusted_cert", f"{device_id or known.identity}: certificate "
                            f"{known.facts.subject} does not chain to a fleet CA: "
                            f"{known.trust_error}")
    if device_id is not None and known.identity != device_id:
        raise ProtocolError("identity_mismatch", f"certificate identity {known.identity!r} "
                            f"is not the device id {device_id!r}")
    return known


def resolve_signer(cache: CertCache, parsed: p.ParsedJWS, now: datetime,
                   device_id: str | None = None) -> KnownCert:
    """The cheap half: the certificate a parsed JWS names, trusted, or refused. A
    certificate not yet known is learnt from the header's `x5c` when it carries one
    (`mqtt.status_x5c`: brokers that do not retain the cert topic), judged exactly as
    a cert message on `device_id`'s topic would be."""
    known = cache.get(parsed.cert_sha256, now)
    if known is None and parsed.x5c:
        try:
            chain = [x509.load_der_x509_certificate(der) for der in parsed.x5c]
        except ValueError as exc:
            raise ProtocolError("bad_header", f"x5c does not hold certificates: {exc}") from exc
        return judge_device_chain(cache, device_id, chain, now)
    if known is None:
        raise ProtocolError("unknown_cert", f"no certificate known for x5t#S256 "
                            f"{parsed.cert_sha256[:16]}… (publish it on the cert topic, "
                            "or set the agent's mqtt.status_x5c)")
    if not known.trusted:
        raise ProtocolError("untrusted_cert", f"signing certificate {known.facts.subject} "
                            f"does not chain to a fleet CA: {known.trust_error}")
    return known


def check_signed(parsed: p.ParsedJWS, public_key: object, identity: str | None,
                 topic_device: str) -> p.Status:
    """The expensive half (signature, decoding) and the identity rule. Runs in-process
    or in a collector.verifypool worker; both call exactly this."""
    p.verify_jws(parsed, public_key)  # type: ignore[arg-type]
    status = p.decode_status(parsed.payload)
    if identity != status.device_id:
        raise ProtocolError("identity_mismatch", f"status for {status.device_id!r} signed by "
                            f"the certificate of {identity!r}")
    if status.device_id != topic_device:
        raise ProtocolError("topic_mismatch", f"status for {status.device_id!r} published on "
                            f"the topic of {topic_device!r}")
    return status

