"""Key facts: what a public key is (type, size, SPKI fingerprint) and reading a private key.

Owns describing a key, the SubjectPublicKeyInfo fingerprint that ties a key to its
certificate, and `read_private_key`, a thin I/O shell that turns an unreadable or
unusable key file into a finding instead of an exception.
Must not: judge whether a key fits its certificate or is kept private (that is
`rules.key_findings`), or log or serialise key material: the loaded key object is
handed back for signing and nothing else.
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ..errors import unreadable_hint
from ..files import read_regular
from .model import Finding, FindingCode, KeyFacts, Severity


def describe_public_key(key: object) -> tuple[str, int]:
    """(type, bits) of a public key, ("unknown", 0) for kinds certmon has no rule for."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC", key.curve.key_size
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448", 456
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size
    return "unknown", 0


def spki_sha256(key: PublicKeyTypes) -> str:
    """SHA-256 of a public key's SubjectPublicKeyInfo: the key's identity."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def cert_spki_sha256(cert: x509.Certificate) -> str | None:
    try:
        return spki_sha256(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return None


def read_private_key(
    path: str | Path, password: bytes | None = None
) -> tuple[KeyFacts | None, list[Finding], object | None]:
    """Load a private key: (facts, findings, key object). The key object stays in
    memory for signing and is never logged or serialised by certmon."""
    source = str(path)
    try:
        data = read_regular(path)
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError as exc:
        return None, [Finding(FindingCode.KEY_UNREADABLE, Severity.CRITICAL,
                              f"{source}: cannot read private key: {exc.strerror or exc}"
                              f"{unreadable_hint(exc)}", source=source)], None
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=password)
        else:
            key = serialization.load_der_private_key(data, password=password)
    except TypeError:
        return None, [Finding(FindingCode.KEY_UNREADABLE, Severity.CRITICAL,
                              f"{source}: private key is encrypted and no passphrase was given",
                              source=source)], None
    except (ValueError, UnsupportedAlgorithm) as exc:
        # The exception text from cryptography never contains key material.
        why = (" (it holds a certificate: a certificate where the key is expected?)"
               if b"-----BEGIN CERTIFICATE-----" in data else f" ({type(exc).__name__})")
        return None, [Finding(FindingCode.KEY_UNREADABLE, Severity.CRITICAL,
                              f"{source}: not a usable private key{why}",
                              source=source)], None
    key_type, key_bits = describe_public_key(key.public_key())
    facts = KeyFacts(source, key_type, key_bits, spki_sha256(key.public_key()), mode)
    return facts, [], key
