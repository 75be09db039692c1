"""JWS compact serialization: how statuses and inventories are signed and checked.

Owns the one algorithm each key type may use, signing on the device (straight on
`cryptography`, the key used in place), and on the collector the cheap parse of a
token (size, shape, header, `x5t#S256`, optional `x5c`) separate from the expensive
signature check, so a token is parsed once and verified where its key is known.

It must not look certificates up, judge trust or decode message bodies: the
collector's verify module decides who signed, `messages` what was signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from certmon.errors import PKIError, ProtocolError

from .codec import b64std, strict_loads

STATUS_TYP = "certmon-status+jws"
INVENTORY_TYP = "certmon-inventory+jws"

# The only algorithm each key type may use. The header's alg is checked against
# this, never used to choose: that is what stops "alg": "none" / HS256-with-the-
# public-key tricks. Ed25519 is RFC 9864's fully specified name (the polymorphic
# "EdDSA" is refused).
_EC_ALGS = {"secp256r1": ("ES256", hashes.SHA256, 32), "secp384r1": ("ES384", hashes.SHA384, 48)}
SUPPORTED_ALGS = frozenset({"ES256", "ES384", "Ed25519", "PS256"})
# RFC 7518 §3.5: PSS with MGF1 on the same hash, salt as long as the hash.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


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


def jws_signature(key: PrivateKeyTypes, signing_input: bytes) -> bytes:
    """The JWS signature of `signing_input` with the one algorithm `key`'s type allows.
    Straight on cryptography: the key is used in place, never exported or copied."""
    alg = alg_for_key(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        _, hash_cls, size = _EC_ALGS[key.curve.name]
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hash_cls())))
        return r.to_bytes(size) + s.to_bytes(size)  # JWS ECDSA is r || s (RFC 7518 §3.4)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(signing_input)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(signing_input, _PSS, hashes.SHA256())
    raise ProtocolError("unsupported_alg", f"no JWS algorithm {alg} signer")  # pragma: no cover


def sign_jws(payload: bytes, key: PrivateKeyTypes, cert: x509.Certificate, *,
             typ: str = STATUS_TYP,
             include_x5c: bool = False, chain: Sequence[x509.Certificate] = ()) -> bytes:
    """JWS compact serialization of `payload`, signed by `key` (which `cert` certifies)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, spki):
        # Caught here, on the device, rather than as bad_signature at every collector.
        raise PKIError("the signing key does not match the signing certificate")
    header: dict[str, Any] = {"alg": alg_for_key(key), "typ": typ, "x5t#S256": x5t_s256(cert)}
    if include_x5c:
        header["x5c"] = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                         for c in (cert, *chain)]
    # Compact JSON in insertion order, ASCII: the same header bytes joserfc wrote, so
    # the golden Ed25519 token (tests/data/golden) is unchanged by the switch.
    header_json = json.dumps(header, ensure_ascii=True, separators=(",", ":"))
    signing_input = _b64url(header_json.encode("ascii")) + b"." + _b64url(payload)
    return signing_input + b"." + _b64url(jws_signature(key, signing_input))


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
    header = strict_loads(_unb64url(header_b64, "header"), "JWS header")
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
            x5c = tuple(b64std(s, "x5c") for s in raw)
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
            public_key.verify(sig, data, _PSS, hashes.SHA256())
    except InvalidSignature as exc:
        raise ProtocolError("bad_signature", "JWS signature does not verify") from exc
