"""The wire: topics, device ids, status v1 and its siblings, canonical JSON, JWS.

Owns everything an agent and a collector must agree on byte for byte:
`SCHEMA_VERSION`, the MQTT topic names and the device-id rule, the message
dataclasses (`Status`, `Inventory`, `CertMessage`, `Beacon`) with their canonical
JSON, and JWS compact signing (agent side, through joserfc) and parsing and
verification (collector side, straight on `cryptography` for speed).

It must not import paho, the agent or the collector, do I/O or read the clock:
callers pass instants in. Every malformed input becomes a `ProtocolError` whose
`reason` is one of `PROTOCOL_REASONS`; nothing else escapes the decoders.
docs/protocol.md is the human description; tests/data/golden pins the bytes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import json
import math
import re
import types
import typing
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Self, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey

from certmon.errors import PKIError, ProtocolError
from certmon.pki import CertFacts, Finding, FindingCode, Severity

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "certmon/v1"
STATUS_TYP = "certmon-status+jws"
INVENTORY_TYP = "certmon-inventory+jws"
# Payloads of the retained online topic; the broker publishes OFFLINE as the LWT.
ONLINE = b"online"
OFFLINE = b"offline"
# A status JWS is ~2 KB; 16 KiB leaves room for x5c on the first message after a
# certificate change. An inventory of a full Mozilla bundle is ~30 KB.
MAX_STATUS_JWS_BYTES = 16 * 1024
MAX_INVENTORY_JWS_BYTES = 512 * 1024
MAX_MESSAGE_BYTES = 512 * 1024
PROTOCOL_REASONS = (
    "oversized", "not_jws", "bad_base64", "bad_header", "unsupported_alg",
    "alg_mismatch", "bad_signature", "not_json", "bad_schema", "unknown_version",
)

# --------------------------------------------------------------------------- topics

RESERVED_DEVICE_IDS = frozenset({"fleet", "alerts"})
MAX_DEVICE_ID_LEN = 64


class TopicKind(enum.StrEnum):
    STATUS = "status"
    CERT = "cert"
    ONLINE = "online"
    INVENTORY = "inventory"


def validate_device_id(device_id: str) -> str | None:
    """The problem with `device_id` as a device id, or None. The canonical rule:
    the agent refuses such an id at start and the collector rejects its messages."""
    if not device_id:
        return "is empty"
    if len(device_id) > MAX_DEVICE_ID_LEN:
        return f"is {len(device_id)} characters long (at most {MAX_DEVICE_ID_LEN})"
    for ch in device_id:
        if ch in "+#/":
            return f"must not contain {ch!r} (MQTT wildcard or topic level separator)"
        # Categories C* and Z*: controls, format characters such as U+202E (which
        # would reorder a dashboard line), unassigned code points and every space.
        if unicodedata.category(ch)[0] in "CZ" or ch.isspace():
            return f"must not contain whitespace or control characters (U+{ord(ch):04X})"
    if device_id in RESERVED_DEVICE_IDS:
        return f"{device_id!r} is reserved for fleet and collector topics"
    if device_id.startswith("_"):
        return "must not start with '_' (reserved for collector topics)"
    return None


def _checked(device_id: str) -> str:
    # A bad id here is a programming error upstream (config validates at start);
    # refusing it keeps a '+' or '#' from ever being published as a topic.
    if (problem := validate_device_id(device_id)) is not None:
        raise ValueError(f"device id {device_id!r} {problem}")
    return device_id


def device_topic(prefix: str, device_id: str, kind: TopicKind) -> str:
    return f"{prefix}/{_checked(device_id)}/{kind}"


def status_topic(prefix: str, device_id: str) -> str:
    return device_topic(prefix, device_id, TopicKind.STATUS)


def cert_topic(prefix: str, device_id: str) -> str:
    return device_topic(prefix, device_id, TopicKind.CERT)


def online_topic(prefix: str, device_id: str) -> str:
    return device_topic(prefix, device_id, TopicKind.ONLINE)


def inventory_topic(prefix: str, device_id: str) -> str:
    return device_topic(prefix, device_id, TopicKind.INVENTORY)


def beacon_topic(prefix: str) -> str:
    return f"{prefix}/_collector/time"


def fleet_summary_topic(prefix: str) -> str:
    return f"{prefix}/fleet/summary"


def fleet_device_topic(prefix: str, device_id: str) -> str:
    # fleet/devices/<dev>, not fleet/<dev>: a device named "summary" must not collide.
    return f"{prefix}/fleet/devices/{_checked(device_id)}"


def alerts_topic(prefix: str, device_id: str | None = None) -> str:
    return f"{prefix}/alerts" if device_id is None else f"{prefix}/alerts/{_checked(device_id)}"


def device_topic_filter(prefix: str, kind: TopicKind | None = None) -> str:
    """Subscription filter for one kind (or all kinds) of every device's topics."""
    return f"{prefix}/+/{kind or '+'}"


def parse_device_topic(prefix: str, topic: str) -> tuple[str, TopicKind] | None:
    """(device_id, kind) of a per-device topic under `prefix`, or None for anything else
    (fleet, alerts and collector topics, bad ids, unknown kinds)."""
    if not topic.startswith(prefix + "/"):
        return None
    device_id, sep, kind = topic[len(prefix) + 1 :].partition("/")
    if not sep or kind not in TopicKind.__members__.values():
        return None
    if validate_device_id(device_id) is not None:
        return None
    return device_id, TopicKind(kind)


# --------------------------------------------------------------------------- codec

_SHA256_RE = r"^[0-9a-f]{64}$"
_PREFIX_RE = r"^[0-9a-f]{16}$"  # a certificate reference inside one status
_INSTANT_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")
_MAX_INT = 2**63 - 1  # fits a BIGINT column
CERT_REF_LEN = 16


def format_instant(when: datetime) -> str:
    """RFC 3339, UTC, 'Z', whole seconds (truncated): 2026-01-02T03:04:05Z."""
    if when.utcoffset() is None:
        raise ValueError(f"naive datetime {when!r}: certmon instants are UTC-aware")
    u = when.astimezone(UTC)
    return f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}Z"


def parse_instant(text: str) -> datetime | None:
    m = _INSTANT_RE.fullmatch(text)
    if m is None:
        return None
    try:
        y, mo, d, h, mi, sec = map(int, m.groups())
        return datetime(y, mo, d, h, mi, sec, tzinfo=UTC)
    except ValueError:  # 2026-02-30, a leap second
        return None


def cert_ref(sha256: str) -> str:
    """The 16-hex-digit prefix by which findings and chain paths name a certificate."""
    return sha256[:CERT_REF_LEN]


def _bad(path: str, problem: str) -> ProtocolError:
    return ProtocolError("bad_schema", f"{path or '(message)'}: {problem}")


def _meta(**kw: Any) -> dict[str, Any]:
    return {"wire": kw}


_Enc = Callable[[Any], Any]
_Dec = Callable[[Any, str], Any]


def _str_codec(m: Mapping[str, Any]) -> tuple[_Enc, _Dec]:
    max_len: int = m.get("max_len", 256)
    pattern = re.compile(m["pattern"]) if "pattern" in m else None
    check: Callable[[str], str | None] | None = m.get("check")

    def enc(v: str) -> str:
        if pattern is not None or check is not None:
            return v  # identifiers are never rewritten; a bad one fails at the collector
        # Free text is clamped so that a pathological certificate (a 2 KB subject, a
        # NUL in a CN) still lets the report go out instead of failing the collector.
        v = v.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
        return v if len(v) <= max_len else v[: max_len - 1] + "…"

    def dec(v: Any, p: str) -> str:
        if not isinstance(v, str):
            raise _bad(p, "expected string")
        if len(v) > max_len:
            raise _bad(p, f"longer than {max_len} characters")
        if pattern is not None and not pattern.fullmatch(v):
            raise _bad(p, f"does not match {pattern.pattern}")
        if check is not None and (problem := check(v)) is not None:
            raise _bad(p, problem)
        if not v.isascii():
            try:  # json.loads lets lone surrogates ("\ud800") through; stores choke on them
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad(p, "invalid unicode (lone surrogate)") from None
        if "\x00" in v:  # PostgreSQL text cannot hold NUL
            raise _bad(p, "contains NUL")
        return v

    return enc, dec


def _scalar_codec(tp: Any, m: Mapping[str, Any]) -> tuple[_Enc, _Dec]:
    if tp is str:
        return _str_codec(m)
    if tp is bool:
        def dec_bool(v: Any, p: str) -> bool:
            if not isinstance(v, bool):
                raise _bad(p, "expected boolean")
            return v
        return (lambda v: v), dec_bool
    if tp is int:
        lo: int = m.get("lo", 0)
        hi: int = m.get("hi", _MAX_INT)

        def dec_int(v: Any, p: str) -> int:
            if not isinstance(v, int) or isinstance(v, bool):  # bool is an int in Python
                raise _bad(p, "expected int")
            if not lo <= v <= hi:
                raise _bad(p, f"expected int in [{lo}, {hi}]")
            return v
        return (lambda v: v), dec_int
    if tp is float:
        flo: float = m.get("lo", -math.inf)

        def dec_float(v: Any, p: str) -> float:
            # JSON has one number type: 300 is a fine float; 1e400 parses to inf.
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise _bad(p, "expected finite number")
            if v < flo:
                raise _bad(p, f"expected number >= {flo}")
            return float(v)
        # Microsecond resolution on the wire: deterministic, and 17-digit monotonic
        # readings would otherwise cost bytes in a message that must stay < 2 KB.
        return (lambda v: round(v, 6)), dec_float
    if tp is datetime:
        def dec_instant(v: Any, p: str) -> datetime:
            when = parse_instant(v) if isinstance(v, str) else None
            if when is None:
                raise _bad(p, "expected RFC 3339 UTC instant like 2026-01-02T03:04:05Z")
            return when
        return format_instant, dec_instant
    if tp is Severity:
        def dec_sev(v: Any, p: str) -> Severity:
            if not isinstance(v, str) or v not in Severity.__members__:
                raise _bad(p, f"expected one of {', '.join(Severity.__members__)}")
            return Severity[v]
        return (lambda v: v.name), dec_sev
    if isinstance(tp, type) and issubclass(tp, _Wire):
        return (lambda v: v.to_json()), tp.from_json
    raise TypeError(f"no wire codec for {tp!r}")  # pragma: no cover - a developer error


def _codec(tp: Any, m: Mapping[str, Any]) -> tuple[_Enc, _Dec]:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):  # X | None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        enc, dec = _codec(inner, m)
        return (lambda v: None if v is None else enc(v)), (
            lambda v, p: None if v is None else dec(v, p))
    if origin is tuple:  # tuple[X, ...] travels as a JSON array
        item_enc, item_dec = _codec(typing.get_args(tp)[0], m)
        max_items: int = m.get("max_items", 16)

        def dec_list(v: Any, p: str) -> tuple[Any, ...]:
            if not isinstance(v, list):
                raise _bad(p, "expected array")
            if len(v) > max_items:
                raise _bad(p, f"more than {max_items} items")
            return tuple(item_dec(x, f"{p}[{i}]") for i, x in enumerate(v))
        # Clamped like free text: the agent sorts by importance before building.
        return (lambda v: [item_enc(x) for x in v[:max_items]]), dec_list
    return _scalar_codec(tp, m)


class _Wire:
    """Mixin: field-driven JSON for frozen dataclasses (wire name = attribute name)."""

    __slots__ = ()
    _fields: ClassVar[tuple[tuple[str, _Enc, _Dec, bool], ...]]

    @classmethod
    def _wire_fields(cls) -> tuple[tuple[str, _Enc, _Dec, bool], ...]:
        # Built on first use (all classes must exist for the type hints to resolve),
        # then cached per class: decoding is on the collector's hot path.
        if "_fields" not in cls.__dict__:
            hints = typing.get_type_hints(cls)
            # Nullable fields are omitted when None and read as None when absent:
            # typical statuses carry several, and every byte counts (< 2 KB as JWS).
            cls._fields = tuple(
                (f.name, *_codec(hints[f.name], f.metadata.get("wire", {})),
                 type(None) in typing.get_args(hints[f.name]))
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            )
        return cls._fields

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, enc, _dec, optional in self._wire_fields():
            value = getattr(self, name)
            if not (optional and value is None):
                out[name] = enc(value)
        return out

    @classmethod
    def from_json(cls, data: Any, path: str = "") -> Self:
        """Decode; unknown keys are ignored (forward compatibility inside v1)."""
        if not isinstance(data, dict):
            raise _bad(path, "expected object")
        kwargs: dict[str, Any] = {}
        for name, _enc, dec, optional in cls._wire_fields():
            p = f"{path}.{name}" if path else name
            if name in data:
                kwargs[name] = dec(data[name], p)
            elif optional:
                kwargs[name] = None
            else:
                raise _bad(p, "missing")
        obj = cls(**kwargs)
        obj._check()
        return obj

    def _check(self) -> None:
        """Cross-field rules, raising ProtocolError. (A hook rather than overriding
        from_json: zero-argument super() breaks in slots=True dataclasses.)"""


class _Message(_Wire):
    """A top-level message: carries "v" and checks it before anything else."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **super().to_json()}

    @classmethod
    def from_json(cls, data: Any, path: str = "") -> Self:
        if not isinstance(data, dict):
            raise _bad(path, "expected object")
        v = data.get("v")
        if not isinstance(v, int) or isinstance(v, bool):
            raise _bad("v", "missing" if v is None else "expected int")
        if v != SCHEMA_VERSION:
            raise ProtocolError("unknown_version",
                                f"v: schema version {v} is not supported "
                                f"(this is {SCHEMA_VERSION})")
        return super().from_json(data, path)


# --------------------------------------------------------------------------- messages

_TEXT = _meta(max_len=256)
_NAME = _meta(max_len=512)  # RFC 4514 subject/issuer


@dataclass(frozen=True, slots=True)
class CertSummary(_Wire):
    """The client certificate: its identity plus what only the device can see.

    Subject, issuer, serial, key and signature algorithm are *not* repeated here:
    the collector holds the certificate itself (the retained cert topic, needed
    anyway to verify the signature) and derives them with the same pki code. That
    is ~300 of the 1 400 bytes a status may spend (docs/protocol.md, "Size").
    """

    sha256: str = field(metadata=_meta(pattern=_SHA256_RE))
    not_after: datetime
    key_matches: bool | None  # None: key unreadable
    key_mode: str | None = field(metadata=_meta(pattern=r"^[0-7]{4}$"))  # "0600"


@dataclass(frozen=True, slots=True)
class CertBrief(_Wire):
    """A certificate named compactly: trust-store CAs, broker chain elements."""

    ref: str = field(metadata=_meta(pattern=_PREFIX_RE))  # cert_ref(sha256)
    subject: str = field(metadata=_NAME)
    not_after: datetime


@dataclass(frozen=True, slots=True)
class ChainSummary(_Wire):
    """Client cert → fleet CA, as the device's own trust store builds it."""

    valid_now: bool
    valid_at_warn: bool  # at now + the warn window
    method: str = field(metadata=_meta(max_len=32))
    error: str | None = field(metadata=_TEXT)
    path: tuple[str, ...] = field(metadata=_meta(pattern=_PREFIX_RE, max_items=10))
    earliest_not_after: datetime | None
    earliest_ref: str | None = field(metadata=_meta(pattern=_PREFIX_RE))


@dataclass(frozen=True, slots=True)
class TrustStoreSummary(_Wire):
    count: int = field(metadata=_meta(hi=100_000))
    digest: str = field(metadata=_meta(pattern=_SHA256_RE))  # see trust_store_digest()
    expiring: tuple[CertBrief, ...] = field(metadata=_meta(max_items=32))


@dataclass(frozen=True, slots=True)
class BrokerSeen(_Wire):
    """The chain the broker presented on the agent's own TLS session."""

    host: str = field(metadata=_meta(max_len=253))
    port: int = field(metadata=_meta(lo=1, hi=65535))
    tls_version: str | None = field(metadata=_meta(max_len=16))
    chain: tuple[CertBrief, ...] = field(metadata=_meta(max_items=10))
    valid_now: bool | None  # None: not evaluated (no chain captured)
    valid_at_warn: bool | None
    error: str | None = field(metadata=_TEXT)
    seen_at: datetime


@dataclass(frozen=True, slots=True)
class BeaconEcho(_Wire):
    """The last collector beacon the device heard: an upper bound on its clock offset."""

    beacon_ts: datetime  # the beacon's own `ts`, echoed
    received_mono_s: float = field(metadata=_meta(lo=0))  # same clock as Status.mono_s


@dataclass(frozen=True, slots=True)
class ClockSummary(_Wire):
    synced: bool | None  # kernel: maxerror < 16 s; None when adjtimex is unavailable
    source: str | None = field(metadata=_meta(max_len=32))  # chrony, timesyncd, sntp …
    offset_s: float | None
    maxerror_s: float | None = field(metadata=_meta(lo=0))
    plausible: bool
    beacon: BeaconEcho | None


@dataclass(frozen=True, slots=True)
class FindingWire(_Wire):
    # A string, not FindingCode: a newer agent may report a code an older collector
    # does not know yet, and that must not get its whole status rejected.
    code: str = field(metadata=_meta(pattern=r"^[A-Z][A-Z0-9_]{0,63}$"))
    severity: Severity
    cert: str | None = field(metadata=_meta(pattern=_PREFIX_RE))  # cert_ref()
    msg: str = field(metadata=_TEXT)
    not_after: datetime | None = None


@dataclass(frozen=True, slots=True)
class AgentSelf(_Wire):
    version: str = field(metadata=_meta(max_len=32))
    uptime_s: float = field(metadata=_meta(lo=0))
    rss_bytes: int | None
    last_publish_ok_at: datetime | None
    spool_depth: int
    spool_dropped: int


@dataclass(frozen=True, slots=True)
class Status(_Message):
    """Status v1 (DESIGN.md §3). (boot_id, seq) orders messages; ts is a measurement."""

    device_id: str = field(metadata=_meta(max_len=MAX_DEVICE_ID_LEN, check=validate_device_id))
    boot_id: str = field(metadata=_meta(pattern=r"^[0-9A-Za-z._-]{1,64}$"))
    seq: int
    ts: datetime  # device wall clock at signing
    mono_s: float = field(metadata=_meta(lo=0))
    interval_s: int = field(metadata=_meta(lo=1, hi=86400 * 7))
    client: CertSummary | None
    client_chain: ChainSummary | None
    trust_store: TrustStoreSummary | None
    broker: BrokerSeen | None
    clock: ClockSummary
    findings: tuple[FindingWire, ...] = field(metadata=_meta(max_items=64))
    agent: AgentSelf


@dataclass(frozen=True, slots=True)
class CaEntry(_Wire):
    sha256: str = field(metadata=_meta(pattern=_SHA256_RE))
    subject: str = field(metadata=_NAME)
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class Inventory(_Message):
    """The whole trust store, signed (typ INVENTORY_TYP), retained, sent on change.
    Content-addressed: the collector keeps it only if `digest` equals the digest in
    the device's latest status, so replaying an old inventory is harmless."""

    device_id: str = field(metadata=_meta(max_len=MAX_DEVICE_ID_LEN, check=validate_device_id))
    ts: datetime
    digest: str = field(metadata=_meta(pattern=_SHA256_RE))
    cas: tuple[CaEntry, ...] = field(metadata=_meta(max_items=2048))

    def _check(self) -> None:
        if trust_store_digest(c.sha256 for c in self.cas) != self.digest:
            raise _bad("digest", "does not match the fingerprints in cas")


_X5C = _meta(max_len=16384, pattern=r"^[A-Za-z0-9+/]+={0,2}$", max_items=8)


@dataclass(frozen=True, slots=True)
class CertMessage(_Message):
    """The signing certificate and its chain, retained on the cert topic, unsigned:
    certificates authenticate themselves by chaining to the fleet CA."""

    device_id: str = field(metadata=_meta(max_len=MAX_DEVICE_ID_LEN, check=validate_device_id))
    sha256: str = field(metadata=_meta(pattern=_SHA256_RE))  # of x5c[0]; hex of x5t#S256
    x5c: tuple[str, ...] = field(metadata=_X5C)  # standard base64 DER, leaf first (RFC 7515)
    # The client certificate and its chain as the device holds them, when the client
    # cert is not the signing cert (a dedicated signing key): the collector derives
    # the client certificate's facts from it (see CertSummary).
    client_x5c: tuple[str, ...] | None = field(default=None, metadata=_X5C)

    def _check(self) -> None:
        for name in ("x5c", "client_x5c"):
            for i, s in enumerate(getattr(self, name) or ()):
                _b64std(s, f"{name}[{i}]")
        if not self.x5c or \
                hashlib.sha256(_b64std(self.x5c[0], "x5c[0]")).hexdigest() != self.sha256:
            raise _bad("sha256", "does not match x5c[0]")

    def certificates(self, client: bool = False) -> list[x509.Certificate]:
        """The signing chain (or with `client`, the client chain; it defaults to the
        signing chain). Raises ProtocolError("bad_schema") for a non-certificate."""
        name = "client_x5c" if client and self.client_x5c else "x5c"
        out = []
        for i, s in enumerate(getattr(self, name)):
            try:
                out.append(x509.load_der_x509_certificate(_b64std(s, f"{name}[{i}]")))
            except ValueError as exc:
                raise _bad(f"{name}[{i}]", f"not a DER certificate ({exc})") from exc
        return out


@dataclass(frozen=True, slots=True)
class Beacon(_Message):
    """The collector's time beacon (plain JSON; devices echo `ts` in ClockSummary)."""

    ts: datetime


def _b64std(s: str, path: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except binascii.Error as exc:
        raise _bad(path, "invalid base64") from exc


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


def finding_from_wire(wire: FindingWire) -> Finding | None:
    """The Finding, or None for a code this version does not know (keep the wire
    form then). `cert_sha256` is the 16-digit reference; `Status.resolve` widens it."""
    if wire.code not in FindingCode.__members__:
        return None
    return Finding(FindingCode(wire.code), wire.severity, wire.msg,
                   cert_sha256=wire.cert, not_after=wire.not_after)


# --------------------------------------------------------------------------- JSON


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        # Two parsers that pick different duplicates see different messages under one
        # signature; refuse instead of choosing.
        dup = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise ProtocolError("not_json", f"duplicate key {dup!r}")
    return out


def _no_constant(name: str) -> Any:
    raise ProtocolError("not_json", f"{name} is not JSON")


def _loads(data: bytes, what: str) -> Any:
    try:
        # The duplicate-key hook costs ~4 µs a status (measured: cheaper than any
        # "parse plainly, then prove there were no duplicates" trick).
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and ints beyond sys.get_int_max_str_digits;
        # RecursionError a payload of 10 000 '['.
        raise ProtocolError("not_json", f"{what} is not UTF-8 JSON: {exc}") from exc


_M = TypeVar("_M", bound=_Message)


def encode_message(msg: _Message) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 — the same Status always gives
    the same bytes, which is what the golden files pin."""
    return json.dumps(msg.to_json(), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode_message(cls: type[_M], payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> _M:
    if len(payload) > max_bytes:
        raise ProtocolError("oversized",
                            f"{cls.__name__} of {len(payload)} bytes (limit {max_bytes})")
    return cls.from_json(_loads(payload, cls.__name__))


def encode_status(status: Status) -> bytes:
    return encode_message(status)


def decode_status(payload: bytes) -> Status:
    return decode_message(Status, payload)


# --------------------------------------------------------------------------- JWS

# The only algorithm each key type may use. The header's alg is checked against
# this, never used to choose: that is what stops "alg": "none" / HS256-with-the-
# public-key tricks. Ed25519 is RFC 9864's fully specified name; joserfc 1.8 flags
# the polymorphic "EdDSA" with a deprecation SecurityWarning.
_EC_ALGS = {"secp256r1": ("ES256", hashes.SHA256, 32), "secp384r1": ("ES384", hashes.SHA384, 48)}
SUPPORTED_ALGS = frozenset({"ES256", "ES384", "Ed25519", "PS256"})


def alg_for_key(key: PrivateKeyTypes | PublicKeyTypes) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name in _EC_ALGS:
            return _EC_ALGS[key.curve.name][0]
    elif isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    elif isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "PS256"
    name = getattr(getattr(key, "curve", None), "name", type(key).__name__)
    raise ProtocolError("unsupported_alg", f"no JWS algorithm for {name} keys "
                        "(use P-256, P-384, Ed25519 or RSA)")


def _b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def x5t_s256(cert: x509.Certificate) -> str:
    return _b64url(cert.fingerprint(hashes.SHA256())).decode("ascii")


def sign_jws(payload: bytes, key: PrivateKeyTypes, cert: x509.Certificate, *, typ: str,
             include_x5c: bool = False, chain: Sequence[x509.Certificate] = ()) -> bytes:
    """JWS compact serialization of `payload`, signed by `key` (which `cert` certifies)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, spki):
        # Caught here, on the device, rather than as bad_signature at every collector.
        raise PKIError("the signing key does not match the signing certificate")
    alg = alg_for_key(key)
    header: dict[str, Any] = {"alg": alg, "typ": typ, "x5t#S256": x5t_s256(cert)}
    if include_x5c:
        header["x5c"] = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                         for c in (cert, *chain)]
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    jwk: ECKey | OKPKey | RSAKey
    if alg.startswith("ES"):
        jwk = ECKey.import_key(der)
    elif alg == "Ed25519":
        jwk = OKPKey.import_key(der)
    else:
        jwk = RSAKey.import_key(der)
    return jws.serialize_compact(header, payload, jwk, algorithms=[alg]).encode("ascii")


def sign_status(payload: bytes, key: PrivateKeyTypes, cert: x509.Certificate, *,
                include_x5c: bool = False, chain: Sequence[x509.Certificate] = ()) -> bytes:
    return sign_jws(payload, key, cert, typ=STATUS_TYP, include_x5c=include_x5c, chain=chain)


@dataclass(frozen=True, slots=True)
class ParsedJWS:
    header: Mapping[str, Any]
    alg: str
    cert_sha256: str  # hex of the header's x5t#S256: the key to look the cert up by
    x5c: tuple[bytes, ...]  # DER, leaf first; empty unless the header carried x5c
    payload: bytes
    signing_input: bytes
    signature: bytes


_B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_URL_TO_STD = bytes.maketrans(b"-_", b"+/")


def _unb64url(part: bytes, what: str) -> bytes:
    # Hot path (a 3 KB payload per message): one C-level strict decode instead of a
    # regex plus a re-encode. '+', '/' and '=' belong to the other alphabet.
    rem = len(part) % 4
    if rem == 1 or b"+" in part or b"/" in part or b"=" in part:
        raise ProtocolError("bad_base64", f"{what}: not unpadded base64url")
    try:
        raw = binascii.a2b_base64(part.translate(_URL_TO_STD) + b"=" * (-rem % 4), strict_mode=True)
    except binascii.Error as exc:
        raise ProtocolError("bad_base64", f"{what}: not unpadded base64url") from exc
    # Non-zero trailing bits would give one value several spellings ("AQ" and "AR").
    if rem and _B64URL.index(part[-1]) & (0b1111 if rem == 2 else 0b11):
        raise ProtocolError("bad_base64", f"{what}: non-canonical base64url")
    return raw


def _header_error(msg: str) -> ProtocolError:
    return ProtocolError("bad_header", f"JWS header: {msg}")


def parse_jws(token: bytes, max_bytes: int, *, typ: str = STATUS_TYP) -> ParsedJWS:
    """Split and check a compact JWS without verifying it (that needs the cert, which
    the caller finds by `cert_sha256`). Cheap checks first: size, shape, header."""
    if len(token) > max_bytes:
        raise ProtocolError("oversized", f"JWS of {len(token)} bytes (limit {max_bytes})")
    parts = bytes(token).split(b".")
    if len(parts) != 3:
        raise ProtocolError("not_jws", f"expected 3 '.'-separated parts, got {len(parts)}")
    header_b64, payload_b64, sig_b64 = parts
    header = _loads(_unb64url(header_b64, "header"), "JWS header")
    payload = _unb64url(payload_b64, "payload")
    signature = _unb64url(sig_b64, "signature")
    if not isinstance(header, dict):
        raise _header_error("expected a JSON object")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise _header_error("alg missing")
    if alg not in SUPPORTED_ALGS:
        raise ProtocolError("unsupported_alg", f"JWS alg {alg[:32]!r} is not one of "
                            f"{', '.join(sorted(SUPPORTED_ALGS))}")
    if header.get("typ") != typ:
        raise _header_error(f"typ is {str(header.get('typ'))[:40]!r}, expected {typ!r}")
    for name in ("crit", "b64"):  # extensions we do not implement must not be ignored
        if name in header:
            raise _header_error(f"{name} is not supported")
    thumb = header.get("x5t#S256")
    if not isinstance(thumb, str) or len(thumb) != 43:
        raise _header_error("x5t#S256 missing or not a SHA-256 thumbprint")
    try:
        digest = _unb64url(thumb.encode("ascii"), "x5t#S256")
    except (ProtocolError, UnicodeEncodeError) as exc:
        raise _header_error("x5t#S256 is not base64url") from exc
    x5c: tuple[bytes, ...] = ()
    if "x5c" in header:
        raw = header["x5c"]
        if not isinstance(raw, list) or not raw or len(raw) > 8 or \
                not all(isinstance(s, str) for s in raw):
            raise _header_error("x5c must be a list of 1-8 base64 strings")
        try:
            x5c = tuple(_b64std(s, "x5c") for s in raw)
        except ProtocolError as exc:
            raise _header_error("x5c holds invalid base64") from exc
        if hashlib.sha256(x5c[0]).digest() != digest:
            raise _header_error("x5c[0] does not match x5t#S256")
    return ParsedJWS(header=header, alg=alg, cert_sha256=digest.hex(), x5c=x5c, payload=payload,
                     signing_input=header_b64 + b"." + payload_b64, signature=signature)


def verify_jws(parsed: ParsedJWS, public_key: PublicKeyTypes) -> None:
    """Raise ProtocolError unless `parsed` is signed by `public_key` with the one
    algorithm that key type allows. Calls cryptography directly: as fast as joserfc
    (ECDSA dominates; docs/protocol.md has the numbers), but without joserfc's
    512-byte header cap that x5c exceeds, and with one precise reason per failure."""
    expected = alg_for_key(public_key)
    if parsed.alg != expected:
        raise ProtocolError("alg_mismatch", f"JWS alg {parsed.alg} but the certificate's key "
                            f"requires {expected}")
    sig, data = parsed.signature, parsed.signing_input
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            _, hash_cls, size = _EC_ALGS[public_key.curve.name]
            if len(sig) != 2 * size:  # JWS ECDSA is r || s, fixed width (RFC 7518 §3.4)
                raise InvalidSignature
            r, s = int.from_bytes(sig[:size]), int.from_bytes(sig[size:])
            public_key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hash_cls()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(sig, data)
        elif isinstance(public_key, rsa.RSAPublicKey):
            # RFC 7518 §3.5: PSS with MGF1 on the same hash, salt as long as the hash.
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            public_key.verify(sig, data, pss, hashes.SHA256())
    except InvalidSignature as exc:
        raise ProtocolError("bad_signature", "JWS signature does not verify") from exc
