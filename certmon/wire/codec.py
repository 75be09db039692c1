"""The codec of every certmon message: canonical JSON <-> typed frozen dataclasses.

Owns the schema version, the size limits, instants on the wire (RFC 3339 UTC, whole
seconds), the field-driven encoder/decoder (`Wire`, `Message`: a dataclass field's
type and `wire_meta` say how it travels and what a decoder accepts), strict JSON
(duplicate keys and NaN refused) and the `PROTOCOL_REASONS` a decoder may raise.

It must not know topics or signatures (`topics`, `jws`), import paho, do I/O or read
the clock. Every malformed input becomes a `ProtocolError`; nothing else escapes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Self, TypeVar

from certmon.errors import ProtocolError
from certmon.pki import Severity

SCHEMA_VERSION = 1
# A status JWS is ~2 KB; 16 KiB leaves room for x5c on the first message after a
# certificate change. An inventory of a full Mozilla bundle is ~30 KB.
MAX_STATUS_JWS_BYTES = 16 * 1024
MAX_INVENTORY_JWS_BYTES = 512 * 1024
MAX_MESSAGE_BYTES = 512 * 1024
PROTOCOL_REASONS = (
    "oversized", "not_jws", "bad_base64", "bad_header", "unsupported_alg",
    "alg_mismatch", "bad_signature", "not_json", "bad_schema", "unknown_version",
)

SHA256_RE = r"^[0-9a-f]{64}$"
CERT_REF_RE = r"^[0-9a-f]{16}$"  # a certificate reference inside one status
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


def bad_schema(path: str, problem: str) -> ProtocolError:
    return ProtocolError("bad_schema", f"{path or '(message)'}: {problem}")


def wire_meta(**kw: Any) -> dict[str, Any]:
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
            raise bad_schema(p, "expected string")
        if len(v) > max_len:
            raise bad_schema(p, f"longer than {max_len} characters")
        if pattern is not None and not pattern.fullmatch(v):
            raise bad_schema(p, f"does not match {pattern.pattern}")
        if check is not None and (problem := check(v)) is not None:
            raise bad_schema(p, problem)
        if not v.isascii():
            try:  # json.loads lets lone surrogates ("\ud800") through; stores choke on them
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_schema(p, "invalid unicode (lone surrogate)") from None
        if "\x00" in v:  # PostgreSQL text cannot hold NUL
            raise bad_schema(p, "contains NUL")
        return v

    return enc, dec


def _scalar_codec(tp: Any, m: Mapping[str, Any]) -> tuple[_Enc, _Dec]:
    if tp is str:
        return _str_codec(m)
    if tp is bool:
        def dec_bool(v: Any, p: str) -> bool:
            if not isinstance(v, bool):
                raise bad_schema(p, "expected boolean")
            return v
        return (lambda v: v), dec_bool
    if tp is int:
        lo: int = m.get("lo", 0)
        hi: int = m.get("hi", _MAX_INT)

        def dec_int(v: Any, p: str) -> int:
            if not isinstance(v, int) or isinstance(v, bool):  # bool is an int in Python
                raise bad_schema(p, "expected int")
            if not lo <= v <= hi:
                raise bad_schema(p, f"expected int in [{lo}, {hi}]")
            return v
        return (lambda v: v), dec_int
    if tp is float:
        flo: float = m.get("lo", -math.inf)

        def dec_float(v: Any, p: str) -> float:
            # JSON has one number type: 300 is a fine float; 1e400 parses to inf.
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise bad_schema(p, "expected finite number")
            if v < flo:
                raise bad_schema(p, f"expected number >= {flo}")
            return float(v)
        # Microsecond resolution on the wire: deterministic, and 17-digit monotonic
        # readings would otherwise cost bytes in a message that must stay < 2 KB.
        return (lambda v: round(v, 6)), dec_float
    if tp is datetime:
        def dec_instant(v: Any, p: str) -> datetime:
            when = parse_instant(v) if isinstance(v, str) else None
            if when is None:
                raise bad_schema(p, "expected RFC 3339 UTC instant like 2026-01-02T03:04:05Z")
            return when
        return format_instant, dec_instant
    if tp is Severity:
        def dec_sev(v: Any, p: str) -> Severity:
            if not isinstance(v, str) or v not in Severity.__members__:
                raise bad_schema(p, f"expected one of {', '.join(Severity.__members__)}")
            return Severity[v]
        return (lambda v: v.name), dec_sev
    if isinstance(tp, type) and issubclass(tp, Wire):
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
                raise bad_schema(p, "expected array")
            if len(v) > max_items:
                raise bad_schema(p, f"more than {max_items} items")
            return tuple(item_dec(x, f"{p}[{i}]") for i, x in enumerate(v))
        # Clamped like free text: the agent sorts by importance before building.
        return (lambda v: [item_enc(x) for x in v[:max_items]]), dec_list
    return _scalar_codec(tp, m)


class Wire:
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
            raise bad_schema(path, "expected object")
        kwargs: dict[str, Any] = {}
        for name, _enc, dec, optional in cls._wire_fields():
            p = f"{path}.{name}" if path else name
            if name in data:
                kwargs[name] = dec(data[name], p)
            elif optional:
                kwargs[name] = None
            else:
                raise bad_schema(p, "missing")
        obj = cls(**kwargs)
        obj._check()
        return obj

    def _check(self) -> None:
        """Cross-field rules, raising ProtocolError. (A hook rather than overriding
        from_json: zero-argument super() breaks in slots=True dataclasses.)"""


class Message(Wire):
    """A top-level message: carries "v" and checks it before anything else."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return {"v": SCHEMA_VERSION, **super().to_json()}

    @classmethod
    def from_json(cls, data: Any, path: str = "") -> Self:
        if not isinstance(data, dict):
            raise bad_schema(path, "expected object")
        v = data.get("v")
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad_schema("v", "missing" if v is None else "expected int")
        if v != SCHEMA_VERSION:
            raise ProtocolError("unknown_version",
                                f"v: schema version {v} is not supported "
                                f"(this is {SCHEMA_VERSION})")
        return super().from_json(data, path)


def b64std(s: str, path: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except binascii.Error as exc:
        raise bad_schema(path, "invalid base64") from exc


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


def strict_loads(data: bytes, what: str) -> Any:
    try:
        # The duplicate-key hook costs ~4 µs a status (measured: cheaper than any
        # "parse plainly, then prove there were no duplicates" trick).
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and ints beyond sys.get_int_max_str_digits;
        # RecursionError a payload of 10 000 '['.
        raise ProtocolError("not_json", f"{what} is not UTF-8 JSON: {exc}") from exc


_M = TypeVar("_M", bound=Message)


def encode_message(msg: Message) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8 — the same Status always gives
    the same bytes, which is what the golden files pin."""
    return json.dumps(msg.to_json(), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode_message(cls: type[_M], payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> _M:
    if len(payload) > max_bytes:
        raise ProtocolError("oversized",
                            f"{cls.__name__} of {len(payload)} bytes (limit {max_bytes})")
    return cls.from_json(strict_loads(payload, cls.__name__))
