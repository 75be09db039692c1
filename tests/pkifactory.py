"""Generated test PKI: roots, intermediates and leaves with explicit validity.

Every date is derived from the injected `now` (never the wall clock), so a test can
say "expires in exactly 20 days" and assert it to the second. Nothing here is
committed to the repository: certificates whose validity ends must not be.

Key generation dominates the cost (RSA-2048 ≈ 50-100 ms, RSA-1024 less, EC/Ed25519
microseconds), so keys are cached per (key_type, name) inside a factory, and RSA
keys additionally in a module-level pool shared by every factory of the session.
Ask for a distinct `name` (or pass `key=new_key(...)`) when a test needs a fresh key,
e.g. for key rotation.

SHA-1: cryptography 50 refuses `hashes.SHA1()` in `CertificateBuilder.sign()`
("Hash algorithm "sha1" not supported for signatures") and in
`verify_directly_issued_by` ("Unsupported signature algorithm"), but still loads
such certificates and signs raw bytes with SHA-1. `hash_alg="sha1"` therefore builds
the certificate normally, rewrites the signature AlgorithmIdentifier in the DER and
re-signs the TBS bytes (see `_resign_sha1`); `openssl verify` accepts the result.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "SCENARIOS",
    "Issued",
    "KeyType",
    "PKIFactory",
    "Scenario",
    "new_key",
    "scenario",
    "write_bundle",
]

KeyType = Literal["rsa2048", "rsa1024", "p256", "p384", "ed25519"]
HashAlg = Literal["sha256", "sha1", "sha384"]
Usage = Literal["client", "server", "both"] | None
PrivateKey = CertificateIssuerPrivateKeyTypes

_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
}
_EKU = {
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "both": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
}

# RSA keys survive across factories for the whole interpreter: the only slow part.
_RSA_POOL: dict[tuple[KeyType, str], PrivateKey] = {}


def new_key(key_type: KeyType) -> PrivateKey:
    """A freshly generated, uncached private key."""
    match key_type:
        case "rsa2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case "rsa1024":
            return rsa.generate_private_key(public_exponent=65537, key_size=1024)
        case "p256":
            return ec.generate_private_key(ec.SECP256R1())
        case "p384":
            return ec.generate_private_key(ec.SECP384R1())
        case "ed25519":
            return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}")


def _file_name(cn: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", cn).strip("-") or "cert"


def _whole_second(when: datetime) -> datetime:
    """X.509 times have one-second resolution; truncate so dates compare exactly."""
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: pass a tz-aware UTC datetime")
    return when.replace(microsecond=0)


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


@dataclass(frozen=True)
class Issued:
    """One certificate with its private key and the Issued that signed it."""

    name: str
    cert: x509.Certificate
    key: PrivateKey
    issuer: Issued | None = field(repr=False)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """PKCS#8, unencrypted: what mosquitto, paho and the agent all read."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain(self) -> list[Issued]:
        """This certificate, then its issuers up to (and including) the root."""
        out: list[Issued] = []
        node: Issued | None = self
        while node is not None:
            out.append(node)
            node = node.issuer
        return out

    def write(
        self, directory: Path, *, chain: bool = False, key_mode: int = 0o600
    ) -> tuple[Path, Path]:
        """Write `<name>.crt` and `<name>.key`; with `chain`, intermediates (never the
        root) follow the certificate, as a TLS peer must present them."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{self.name}.crt"
        key_path = directory / f"{self.name}.key"
        members = self.chain()[:-1] if chain and self.issuer is not None else [self]
        cert_path.write_bytes(b"".join(m.cert_pem() for m in members))
        key_path.write_bytes(self.key_pem())
        os.chmod(key_path, key_mode)
        return cert_path, key_path


def write_bundle(path: Path, certs: Iterable[Issued | x509.Certificate]) -> Path:
    """Concatenate PEM certificates into one CA bundle file."""
    pems = [
        (c.cert if isinstance(c, Issued) else c).public_bytes(serialization.Encoding.PEM)
        for c in certs
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(pems))
    return path


class PKIFactory:
    """Issues certificates relative to `now` (tz-aware; truncated to whole seconds)."""

    def __init__(self, now: datetime) -> None:
        self.now = _whole_second(now)
        self._keys: dict[tuple[KeyType, str], PrivateKey] = {}

    def key(self, key_type: KeyType, name: str) -> PrivateKey:
        """The cached key for (key_type, name), generated on first use."""
        cache_key = (key_type, name)
        if cache_key not in self._keys:
            if key_type.startswith("rsa"):
                if cache_key not in _RSA_POOL:
                    _RSA_POOL[cache_key] = new_key(key_type)
                self._keys[cache_key] = _RSA_POOL[cache_key]
            else:
                self._keys[cache_key] = new_key(key_type)
        return self._keys[cache_key]

    def _validity(
        self, days: float, not_before: datetime | None, not_after: datetime | None
    ) -> tuple[datetime, datetime]:
        # One hour of back-dating tolerates small clock differences between peers.
        start = _whole_second(not_before) if not_before else self.now - timedelta(hours=1)
        end = _whole_second(not_after) if not_after else start + timedelta(days=days)
        return start, _whole_second(end)

    def root(
        self,
        cn: str,
        *,
        key_type: KeyType = "p256",
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        days: float = 3650,
        key: PrivateKey | None = None,
        name: str | None = None,
        hash_alg: HashAlg = "sha256",
    ) -> Issued:
        """A self-signed CA. Two roots with the same `cn` need distinct `name`s to get
        distinct keys (that is exactly the `fake_root` scenario)."""
        name = name or _file_name(cn)
        key = key or self.key(key_type, name)
        return self._issue(
            name, cn, key, None, days, not_before, not_after,
            ca_path_length=None, usage=None, sans=(), uri_sans=(), hash_alg=hash_alg,
        )  # fmt: skip

    def intermediate(
        self,
        issuer: Issued,
        cn: str,
        *,
        days: float = 1825,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        key_type: KeyType = "p256",
        path_length: int | None = 0,
        key: PrivateKey | None = None,
        name: str | None = None,
        hash_alg: HashAlg = "sha256",
    ) -> Issued:
        name = name or _file_name(cn)
        key = key or self.key(key_type, name)
        return self._issue(
            name, cn, key, issuer, days, not_before, not_after,
            ca_path_length=path_length, usage=None, sans=(), uri_sans=(), hash_alg=hash_alg,
        )  # fmt: skip

    def leaf(
        self,
        issuer: Issued,
        cn: str,
        *,
        days: float = 365,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        key_type: KeyType = "p256",
        sans: Sequence[str] = (),
        usage: Usage = "client",
        hash_alg: HashAlg = "sha256",
        key: PrivateKey | None = None,
        uri_sans: Sequence[str] = (),
        name: str | None = None,
    ) -> Issued:
        name = name or _file_name(cn)
        key = key or self.key(key_type, name)
        return self._issue(
            name, cn, key, issuer, days, not_before, not_after,
            ca_path_length=False, usage=usage, sans=sans, uri_sans=uri_sans, hash_alg=hash_alg,
        )  # fmt: skip

    def self_signed_leaf(
        self,
        cn: str,
        *,
        sans: Sequence[str] = (),
        days: float = 365,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        key_type: KeyType = "p256",
        usage: Usage = "server",
        hash_alg: HashAlg = "sha256",
        key: PrivateKey | None = None,
        name: str | None = None,
    ) -> Issued:
        """A non-CA certificate that signs itself (the "quick openssl req" broker)."""
        name = name or _file_name(cn)
        key = key or self.key(key_type, name)
        return self._issue(
            name, cn, key, None, days, not_before, not_after,
            ca_path_length=False, usage=usage, sans=sans, uri_sans=(), hash_alg=hash_alg,
        )  # fmt: skip

    def _issue(
        self,
        name: str,
        cn: str,
        key: PrivateKey,
        issuer: Issued | None,
        days: float,
        not_before: datetime | None,
        not_after: datetime | None,
        *,
        ca_path_length: int | Literal[False] | None,
        usage: Usage,
        sans: Sequence[str],
        uri_sans: Sequence[str],
        hash_alg: HashAlg,
    ) -> Issued:
        """`ca_path_length=False` means a leaf; None or an int means a CA."""
        start, end = self._validity(days, not_before, not_after)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        signer_key = issuer.key if issuer else key
        is_ca = ca_path_length is not False
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        aki = (
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.cert.public_key())  # type: ignore[arg-type]
            if issuer
            else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.cert.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(ski, critical=False)
            .add_extension(aki, critical=False)
            .add_extension(
                x509.BasicConstraints(
                    ca=is_ca,
                    path_length=ca_path_length if is_ca else None,  # type: ignore[arg-type]
                ),
                critical=True,
            )
            .add_extension(_key_usage(is_ca, key), critical=True)
        )
        if usage is not None and not is_ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage(_EKU[usage]), critical=False)
        names = [_general_name(s) for s in sans] + [
            x509.UniformResourceIdentifier(u) for u in uri_sans
        ]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = _sign(builder, signer_key, hash_alg)
        return Issued(name=name, cert=cert, key=key, issuer=issuer)


def _key_usage(is_ca: bool, key: PrivateKey) -> x509.KeyUsage:
    # RSA leaves also get keyEncipherment: TLS 1.2 RSA key exchange needs it.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not is_ca and isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=is_ca,
        crl_sign=is_ca,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(builder: x509.CertificateBuilder, key: PrivateKey, hash_alg: HashAlg) -> x509.Certificate:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        if hash_alg != "sha256":
            raise ValueError(f"Ed25519 signs without a separate hash; hash_alg={hash_alg!r}")
        return builder.sign(key, None)
    if hash_alg == "sha1":
        return _resign_sha1(builder.sign(key, hashes.SHA256()), key)
    return builder.sign(key, _HASHES[hash_alg])


# --- SHA-1 re-signing: the smallest DER surgery that yields a valid SHA-1 cert. ---
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


def _resign_sha1(cert: x509.Certificate, key: PrivateKey) -> x509.Certificate:
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


# --- Named scenarios ---------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A chain plus the trust store a relying party holds for it.

    `extra` carries what a scenario adds beyond the chain: the fake root for
    `fake_root`, the mismatching key for `wrong_key`.
    """

    name: str
    root: Issued
    intermediates: list[Issued]
    leaf: Issued
    trust: list[Issued]
    extra: dict[str, object] = field(default_factory=dict)

    def write(self, directory: Path) -> tuple[Path, Path, Path]:
        """(cert with intermediates, key, trust bundle) under `directory`."""
        cert_path, key_path = self.leaf.write(directory, chain=True)
        bundle = write_bundle(directory / f"{self.leaf.name}-trust.pem", self.trust)
        return cert_path, key_path, bundle


def scenario(factory: PKIFactory, name: str) -> Scenario:
    """Build a named scenario. Each gets its own CA names, so scenarios never share keys
    with each other (they do share them with the same scenario built again)."""
    now = factory.now
    root = factory.root(f"{name} Root CA", name=f"{name}-root")
    inter_kw: dict[str, object] = {}
    leaf_kw: dict[str, object] = {}
    extra: dict[str, object] = {}
    match name:
        case "ok" | "fake_root" | "wrong_key" | "wrong_host":
            pass
        case "expired":
            leaf_kw = {"not_before": now - timedelta(days=30), "not_after": now - timedelta(days=1)}
        case "not_yet_valid":
            leaf_kw = {"not_before": now + timedelta(days=1), "days": 30}
        case "expiring_intermediate":
            inter_kw = {"not_after": now + timedelta(days=10)}
            leaf_kw = {"not_after": now + timedelta(days=300)}
        case "expired_intermediate":
            inter_kw = {
                "not_before": now - timedelta(days=400),
                "not_after": now - timedelta(days=2),
            }
            leaf_kw = {"not_before": now - timedelta(days=100)}  # issued while it was valid
        case "sha1_signed":
            root = factory.root(f"{name} Root CA", name=f"{name}-root", key_type="rsa2048")
            inter_kw = {"key_type": "rsa2048"}
            leaf_kw = {"hash_alg": "sha1", "key_type": "rsa2048"}
        case "rsa1024":
            leaf_kw = {"key_type": "rsa1024"}
        case "expiring_leaf_20d":
            leaf_kw = {"not_after": now + timedelta(days=20)}
        case "expiring_leaf_3d":
            leaf_kw = {"not_after": now + timedelta(days=3)}
        case _:
            raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    inter = factory.intermediate(root, f"{name} Intermediate CA", name=f"{name}-int", **inter_kw)  # type: ignore[arg-type]
    sans = ("wrong.example",) if name == "wrong_host" else ("localhost", "127.0.0.1")
    leaf = factory.leaf(
        inter,
        f"{name}.test",
        name=f"{name}-leaf",
        usage="both",
        sans=sans,
        **leaf_kw,  # type: ignore[arg-type]
    )
    if name == "fake_root":
        # Same subject DN, another key: a name-only trust check would accept it.
        extra["fake_root"] = factory.root(f"{name} Root CA", name=f"{name}-fake-root")
    if name == "wrong_key":
        extra["wrong_key"] = factory.key("p256", f"{name}-other-key")
    return Scenario(name, root, [inter], leaf, [root], extra)


SCENARIOS = (
    "ok",
    "expired",
    "not_yet_valid",
    "expiring_intermediate",
    "expired_intermediate",
    "fake_root",
    "wrong_key",
    "wrong_host",
    "sha1_signed",
    "rsa1024",
    "expiring_leaf_20d",
    "expiring_leaf_3d",
)
