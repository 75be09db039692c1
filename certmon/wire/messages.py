"""The messages: status v1, heartbeat, inventory, cert message, beacon, and their parts.

Owns each message's fields, limits and cross-field rules (as frozen dataclasses
decoded by `codec`), the builders that turn certificate facts into wire parts, and
`trust_store_digest` — the identity of a trust store both halves compute.

It must not sign or verify (`jws`), name topics (`topics`), do I/O or read the clock.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certmon.pki import CertFacts, Finding, Severity

from .codec import (
    CERT_REF_RE,
    SHA256_RE,
    Message,
    Wire,
    b64std,
    bad_schema,
    cert_ref,
    decode_message,
    encode_message,
    wire_meta,
)
from .topics import MAX_DEVICE_ID_LEN, validate_device_id

# The heartbeat's JWS typ (beside jws.STATUS_TYP and INVENTORY_TYP; here with its message).
HEARTBEAT_TYP = "certmon-heartbeat+jws"
# A heartbeat JWS is ~500 bytes; this cap keeps a flood of big "heartbeats" cheap to refuse.
MAX_HEARTBEAT_JWS_BYTES = 2048

_TEXT = wire_meta(max_len=256)
_NAME = wire_meta(max_len=512)  # RFC 4514 subject/issuer


@dataclass(frozen=True, slots=True)
class CertSummary(Wire):
    """The client certificate: its identity plus what only the device can see.

    Subject, issuer, serial, key and signature algorithm are *not* repeated here:
    the collector holds the certificate itself (the retained cert topic, needed
    anyway to verify the signature) and derives them with the same pki code. That
    is ~300 of the 1 400 bytes a status may spend (docs/protocol.md, "Size").
    """

    sha256: str = field(metadata=wire_meta(pattern=SHA256_RE))
    not_after: datetime
    key_matches: bool | None  # None: key unreadable
    key_mode: str | None = field(metadata=wire_meta(pattern=r"^[0-7]{4}$"))  # "0600"


@dataclass(frozen=True, slots=True)
class CertBrief(Wire):
    """A certificate named compactly: trust-store CAs, broker chain elements."""

    ref: str = field(metadata=wire_meta(pattern=CERT_REF_RE))  # cert_ref(sha256)
    subject: str = field(metadata=_NAME)
    not_after: datetime


@dataclass(frozen=True, slots=True)
class ChainSummary(Wire):
    """Client cert → fleet CA, as the device's own trust store builds it."""

    valid_now: bool
    valid_at_warn: bool  # at now + the warn window
    method: str = field(metadata=wire_meta(max_len=32))
    error: str | None = field(metadata=_TEXT)
    path: tuple[str, ...] = field(metadata=wire_meta(pattern=CERT_REF_RE, max_items=10))
    earliest_not_after: datetime | None
    earliest_ref: str | None = field(metadata=wire_meta(pattern=CERT_REF_RE))


@dataclass(frozen=True, slots=True)
class TrustStoreSummary(Wire):
    count: int = field(metadata=wire_meta(hi=100_000))
    digest: str = field(metadata=wire_meta(pattern=SHA256_RE))  # see trust_store_digest()
    expiring: tuple[CertBrief, ...] = field(metadata=wire_meta(max_items=32))


@dataclass(frozen=True, slots=True)
class BrokerSeen(Wire):
    """The chain the broker presented on the agent's own TLS session."""

    host: str = field(metadata=wire_meta(max_len=253))
    port: int = field(metadata=wire_meta(lo=1, hi=65535))
    tls_version: str | None = field(metadata=wire_meta(max_len=16))
    chain: tuple[CertBrief, ...] = field(metadata=wire_meta(max_items=10))
    valid_now: bool | None  # None: not evaluated (no chain captured)
    valid_at_warn: bool | None
    error: str | None = field(metadata=_TEXT)
    seen_at: datetime


@dataclass(frozen=True, slots=True)
class BeaconEcho(Wire):
    """The last collector beacon the device heard: an upper bound on its clock offset."""

    beacon_ts: datetime  # the beacon's own `ts`, echoed
    received_mono_s: float = field(metadata=wire_meta(lo=0))  # same clock as Status.mono_s


@dataclass(frozen=True, slots=True)
class ClockSummary(Wire):
    synced: bool | None  # kernel: maxerror < 16 s; None when adjtimex is unavailable
    source: str | None = field(metadata=wire_meta(max_len=32))  # chrony, timesyncd, sntp …
    offset_s: float | None
    maxerror_s: float | None = field(metadata=wire_meta(lo=0))
    plausible: bool
    beacon: BeaconEcho | None


@dataclass(frozen=True, slots=True)
class FindingWire(Wire):
    # A string, not FindingCode: a newer agent may report a code an older collector
    # does not know yet, and that must not get its whole status rejected.
    code: str = field(metadata=wire_meta(pattern=r"^[A-Z][A-Z0-9_]{0,63}$"))
    severity: Severity
    cert: str | None = field(metadata=wire_meta(pattern=CERT_REF_RE))  # cert_ref()
    msg: str = field(metadata=_TEXT)
    not_after: datetime | None = None


@dataclass(frozen=True, slots=True)
class AgentSelf(Wire):
    version: str = field(metadata=wire_meta(max_len=32))
    uptime_s: float = field(metadata=wire_meta(lo=0))
    rss_bytes: int | None
    last_publish_ok_at: datetime | None
    spool_depth: int
    spool_dropped: int


@dataclass(frozen=True, slots=True)
class RenewalState(Wire):
    """The client certificate's renewal (docs/renewal.md), when the agent renews it.

    Optional in Status: an agent without `[renewal] enabled` omits it, so its statuses
    are byte-identical to before; a collector that predates it ignores it."""

    due_at: datetime  # the renewal point of the current certificate
    is_due: bool
    next_attempt_at: datetime | None  # None: not while the clock is known to be wrong
    last_attempt_at: datetime | None
    outcome: str | None = field(metadata=wire_meta(pattern=r"^(renewed|failed)$"))
    reason: str | None = field(metadata=_TEXT)
    failures: int = field(metadata=wire_meta(lo=0, hi=1_000_000))  # consecutive


@dataclass(frozen=True, slots=True)
class CrlBrief(Wire):
    """One CRL a broker host's crlfile holds (docs/broker-host.md)."""

    issuer: str = field(metadata=_NAME)
    this_update: datetime
    next_update: datetime | None  # None: the CRL never goes stale
    crl_number: int | None
    revoked_count: int = field(metadata=wire_meta(hi=10_000_000))
    signed_by: str | None = field(metadata=_TEXT)  # the CA whose key verifies it; None: none


@dataclass(frozen=True, slots=True)
class BrokerFile(Wire):
    """One file (or capath directory) a broker's config names, as the agent read it."""

    directive: str = field(metadata=wire_meta(max_len=32))  # "certfile", "bridge_cafile"
    path: str = field(metadata=_TEXT)
    at: str = field(metadata=_TEXT)  # the config FILE:LINE naming it
    severity: Severity  # the worst of this file's findings (OK: none)
    cert_count: int = field(metadata=wire_meta(hi=100_000))
    # A certfile's leaf first; a CA file's earliest-expiring first (its full list is
    # not needed: the findings name the CA that matters).
    certs: tuple[CertBrief, ...] = field(metadata=wire_meta(max_items=4))
    crls: tuple[CrlBrief, ...] = field(metadata=wire_meta(max_items=4))


@dataclass(frozen=True, slots=True)
class BrokerEndpointState(Wire):
    """A listener or bridge of the broker host, its files and what it serves."""

    kind: str = field(metadata=wire_meta(pattern=r"^(listener|bridge)$"))
    name: str = field(metadata=wire_meta(max_len=128))  # "listener 8883 0.0.0.0"
    at: str = field(metadata=_TEXT)
    port: int | None = field(metadata=wire_meta(lo=0, hi=65535))
    is_tls: bool
    require_certificate: bool
    files: tuple[BrokerFile, ...] = field(metadata=wire_meta(max_items=6))
    # A listener: the leaf it presented on a handshake; a bridge: the leaf its remote
    # presented to the agent's own probe.
    served: CertBrief | None
    served_error: str | None = field(metadata=_TEXT)
    # True: it serves its certfile's leaf; False: renewed on disk, not reloaded
    # (BROKER_CERT_NOT_RELOADED); None: not compared.
    is_reloaded: bool | None


@dataclass(frozen=True, slots=True)
class BrokerHostState(Wire):
    """The broker host's own side (`[broker]` in agent.toml, docs/broker-host.md).

    Optional in Status: only an agent on a broker host sends it, so every other
    status is byte-identical to before; a collector that predates it ignores it. Its
    findings travel in Status.findings like the device's own."""

    kind: str = field(metadata=wire_meta(max_len=32))  # "mosquitto"
    config: str = field(metadata=_TEXT)
    checked_at: datetime
    severity: Severity
    files_read: int = field(metadata=wire_meta(hi=10_000))
    endpoints: tuple[BrokerEndpointState, ...] = field(metadata=wire_meta(max_items=16))


@dataclass(frozen=True, slots=True)
class Status(Message):
    """Status v1 (DESIGN.md §3). (boot_id, seq) orders messages; ts is a measurement."""

    device_id: str = field(metadata=wire_meta(max_len=MAX_DEVICE_ID_LEN, check=validate_device_id))
    boot_id: str = field(metadata=wire_meta(pattern=r"^[0-9A-Za-z._-]{1,64}$"))
    seq: int
    ts: datetime  # device wall clock at signing
    mono_s: float = field(metadata=wire_meta(lo=0))
    interval_s: int = field(metadata=wire_meta(lo=1, hi=86400 * 7))
    client: CertSummary | None
    client_chain: ChainSummary | None
    trust_store: TrustStoreSummary | None
    broker: BrokerSeen | None
    clock: ClockSummary
    findings: tuple[FindingWire, ...] = field(metadata=wire_meta(max_items=64))
    agent: AgentSelf
    renewal: RenewalState | None = None
    broker_host: BrokerHostState | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """The compact signed heartbeat (typ HEARTBEAT_TYP, on the heartbeat topic, not
    retained): sent instead of a status while nothing but time and counters changed.
    Same signing key, same (boot_id, seq) space as statuses, so one replay window and
    one order cover both; `status_digest` names the full status it stands for (see
    `status_digest()`), which the collector must hold. Every byte counts (≤ 600 as
    JWS): the beacon echo is the beacon's `ts` and how long before `ts` the device
    heard it (a status says the same as two monotonic readings)."""

    device_id: str = field(metadata=wire_meta(max_len=MAX_DEVICE_ID_LEN, check=validate_device_id))
    boot_id: str = field(metadata=wire_meta(pattern=r"^[0-9A-Za-z._-]{1,64}$"))
    seq: int
    ts: datetime  # device wall clock at signing: the clock-offset sample
    interval_s: int = field(metadata=wire_meta(lo=1, hi=86400 * 7))
    status_digest: str = field(metadata=wire_meta(pattern=r"^[A-Za-z0-9_-]{43}$"))
    beacon_ts: datetime | None = None  # the last collector beacon heard, its own `ts`
    beacon_age_s: float | None = field(default=None, metadata=wire_meta(lo=0))

    def _check(self) -> None:
        if (self.beacon_ts is None) != (self.beacon_age_s is None):
            raise bad_schema("beacon_age_s", "beacon_ts and beacon_age_s go together")


def status_digest(payload: bytes) -> str:
    """What a heartbeat's `status_digest` names: the SHA-256 of a status's signed
    payload, unpadded base64url (43 characters, like `x5t#S256`)."""
    return base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class CaEntry(Wire):
    sha256: str = field(metadata=wire_meta(pattern=SHA256_RE))
    subject: str = field(metadata=_NAME)
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class Inventory(Message):
    """The whole trust store, signed (typ INVENTORY_TYP), retained, sent on change.
    Content-addressed: the collector keeps it only if `digest` equals the digest in
    the device's latest status, so replaying an old inventory is harmless."""

    device_id: str = field(metadata=wire_meta(max_len=MAX_DEVICE_ID_LEN, check=validate_device_id))
    ts: datetime
    digest: str = field(metadata=wire_meta(pattern=SHA256_RE))
    cas: tuple[CaEntry, ...] = field(metadata=wire_meta(max_items=2048))

    def _check(self) -> None:
        if trust_store_digest(c.sha256 for c in self.cas) != self.digest:
            raise bad_schema("digest", "does not match the fingerprints in cas")


_X5C = wire_meta(max_len=16384, pattern=r"^[A-Za-z0-9+/]+={0,2}$", max_items=8)


@dataclass(frozen=True, slots=True)
class CertMessage(Message):
    """The signing certificate and its chain, retained on the cert topic, unsigned:
    certificates authenticate themselves by chaining to the fleet CA."""

    device_id: str = field(metadata=wire_meta(max_len=MAX_DEVICE_ID_LEN, check=validate_device_id))
    sha256: str = field(metadata=wire_meta(pattern=SHA256_RE))  # of x5c[0]; hex of x5t#S256
    x5c: tuple[str, ...] = field(metadata=_X5C)  # standard base64 DER, leaf first (RFC 7515)
    # The client certificate and its chain as the device holds them, when the client
    # cert is not the signing cert (a dedicated signing key): the collector derives
    # the client certificate's facts from it (see CertSummary).
    client_x5c: tuple[str, ...] | None = field(default=None, metadata=_X5C)

    def _check(self) -> None:
        for name in ("x5c", "client_x5c"):
            for i, s in enumerate(getattr(self, name) or ()):
                b64std(s, f"{name}[{i}]")
        if not self.x5c or \
                hashlib.sha256(b64std(self.x5c[0], "x5c[0]")).hexdigest() != self.sha256:
            raise bad_schema("sha256", "does not match x5c[0]")

    def certificates(self, client: bool = False) -> list[x509.Certificate]:
        """The signing chain (or with `client`, the client chain; it defaults to the
        signing chain). Raises ProtocolError("bad_schema") for a non-certificate."""
        name = "client_x5c" if client and self.client_x5c else "x5c"
        out = []
        for i, s in enumerate(getattr(self, name)):
            try:
                out.append(x509.load_der_x509_certificate(b64std(s, f"{name}[{i}]")))
            except ValueError as exc:
                raise bad_schema(f"{name}[{i}]", f"not a DER certificate ({exc})") from exc
        return out


@dataclass(frozen=True, slots=True)
class Beacon(Message):
    """The collector's time beacon (plain JSON; devices echo `ts` in ClockSummary)."""

    ts: datetime


# --------------------------------------------------------------------------- builders


def trust_store_digest(fingerprints: Iterable[str]) -> str:
    """SHA-256 over the sorted, de-duplicated lowercase hex fingerprints joined by
    "\\n": the identity of a trust store's *set* of CAs, independent of file order."""
    return hashlib.sha256("\n".join(sorted(set(fingerprints))).encode("ascii")).hexdigest()


def cert_summary_from_facts(
    facts: CertFacts, *, key_matches: bool | None, key_mode: int | None
) -> CertSummary:
    mode = None if key_mode is None else f"{key_mode & 0o7777:04o}"
    return CertSummary(sha256=facts.sha256, not_after=facts.not_after,
                       key_matches=key_matches, key_mode=mode)


def cert_brief_from_facts(facts: CertFacts) -> CertBrief:
    # The CN (or the whole DN when there is none): a brief names a certificate for
    # people; the full subject is in the inventory and on the collector.
    return CertBrief(ref=cert_ref(facts.sha256), subject=facts.name, not_after=facts.not_after)


def finding_to_wire(finding: Finding) -> FindingWire:
    return FindingWire(
        code=str(finding.code), severity=finding.severity,
        cert=None if finding.cert_sha256 is None else cert_ref(finding.cert_sha256),
        msg=finding.message, not_after=finding.not_after,
    )


def cert_message(device_id: str, signing_chain: Sequence[x509.Certificate],
                 client_chain: Sequence[x509.Certificate] = ()) -> CertMessage:
    """The retained cert-topic message: the signing chain (leaf first) and, when the
    device signs with a dedicated key, its client chain beside it."""
    def b64(chain: Sequence[x509.Certificate]) -> tuple[str, ...]:
        return tuple(base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                     for c in chain)
    is_distinct = bool(client_chain) and client_chain[0] != signing_chain[0]
    return CertMessage(device_id=device_id, sha256=hashlib.sha256(
        signing_chain[0].public_bytes(serialization.Encoding.DER)).hexdigest(),
        x5c=b64(signing_chain), client_x5c=b64(client_chain) if is_distinct else None)


def encode_status(status: Status) -> bytes:
    return encode_message(status)


def decode_status(payload: bytes) -> Status:
    return decode_message(Status, payload)


def decode_heartbeat(payload: bytes) -> Heartbeat:
    return decode_message(Heartbeat, payload, max_bytes=MAX_HEARTBEAT_JWS_BYTES)
