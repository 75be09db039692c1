"""SHA-1 re-signing for `kit.pki`: the smallest DER surgery that yields a valid SHA-1
certificate.

Owns: turning a SHA-256-signed certificate into the same certificate signed with
SHA-1 (RSA or EC issuer keys), for the scenarios that must show a weak signature.

Must not: build certificates (kit.pki does), or be used for anything but SHA-1.

cryptography 50 refuses `hashes.SHA1()` in `CertificateBuilder.sign()` ("Hash
algorithm "sha1" not supported for signatures") and in `verify_directly_issued_by`
("Unsupported signature algorithm"), but still loads such certificates and signs raw
bytes with SHA-1. So the certificate is built normally, the signature
AlgorithmIdentifier in the TBS is rewritten and the TBS bytes are signed again;
`openssl verify` accepts the result.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)

__all__ = ["resign_sha1"]

_SHA1_ALG_ID = {
    # sha1WithRSAEncryption (1.2.840.113549.1.1.5) with NULL parameters
    "rsa": bytes.fromhex("300d06092a864886f70d0101050500"),
    # ecdsa-with-SHA1 (1.2.840.10045.4.1), parameters absent
    "ec": bytes.fromhex("300906072a8648ce3d0401"),
}


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(value)) + value


def _der_element(buf: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a DER blob into (whole first element, its value, the bytes after it)."""
    length, offset = buf[1], 2
    if length & 0x80:  # long form: the low bits count the length octets
        count = length & 0x7F
        length, offset = int.from_bytes(buf[2 : 2 + count], "big"), 2 + count
    end = offset + length
    return buf[:end], buf[offset:end], buf[end:]


def _der_children(der: bytes) -> list[bytes]:
    """The encoded children of one constructed DER element."""
    _, body, _ = _der_element(der)
    out = []
    while body:
        child, _, body = _der_element(body)
        out.append(child)
    return out


def resign_sha1(
    cert: x509.Certificate, key: CertificateIssuerPrivateKeyTypes
) -> x509.Certificate:
    """`cert` (signed by `key` with any hash) signed again by `key` with SHA-1."""
    family = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ec"
    if family == "ec" and not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"SHA-1 signing needs an RSA or EC issuer key, not {type(key)}")
    alg_id = _SHA1_ALG_ID[family]
    fields = _der_children(cert.tbs_certificate_bytes)
    # TBSCertificate: [0] version, serial, *signature AlgorithmIdentifier*, issuer, …
    fields[2] = alg_id
    tbs = _tlv(0x30, b"".join(fields))
    if isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    else:
        sig = key.sign(tbs, ec.ECDSA(hashes.SHA1()))  # type: ignore[union-attr]
    der = _tlv(0x30, tbs + alg_id + _tlv(0x03, b"\x00" + sig))
    return x509.load_der_x509_certificate(der)
