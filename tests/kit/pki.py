"""The test suite's one certificate factory: roots, intermediates and leaves with
explicit validity.

Owns: issuing every X.509 certificate the tests and benchmarks use (the scenario
chains of `kit.scenarios`, the simulated devices of `kit.fleet`, the brokers and
collectors of tests/conftest.py and bench/), their keys, and writing them as the
PEM files mosquitto, paho and the agent read.

Must not: read the wall clock (every date derives from the injected `now`), commit
anything to the repository (certificates whose validity ends must not be), or know
what a device or a status is (that is `kit.fleet`).

Every date is derived from `now`, so a test can say "expires in exactly 20 days"
and assert it to the second. Key generation dominates the cost (RSA-2048 ≈ 50-100 ms,
RSA-1024 less, EC/Ed25519 microseconds), so keys are cached per (key_type, name)
inside a factory, and RSA keys additionally in a module-level pool shared by every
factory of the session. Ask for a distinct `name` (or pass `key=new_key(...)`) when a
test needs a fresh key, e.g. for key rotation. `hash_alg="sha1"` is possible although
cryptography refuses to sign with SHA-1: see `kit.der`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, TypedDict, Unpack

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kit.der import resign_sha1

__all__ = [
    "CertOptions",
    "Issued",
    "KeyType",
    "LeafOptions",
    "PKIFactory",
    "new_key",
    "write_bundle",
    "write_crls",
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


class CertOptions(TypedDict, total=False):
    """What every kind of certificate may be given besides its own arguments.

    `days` defaults per kind (root 3650, intermediate 1825, leaf 365); `not_before`
    to an hour before `now` (small clock differences between peers); `not_after` to
    `not_before` + `days`; `name` (the cache key and file stem) to the CN made
    file-safe; `key` to the cached key for (key_type, name).
    """

    days: float
    not_before: datetime | None
    not_after: datetime | None
    key_type: KeyType
    key: PrivateKey | None
    name: str | None
    hash_alg: HashAlg
    # Extra non-critical extensions, e.g. x509.CRLDistributionPoints,
    # x509.AuthorityInformationAccess or x509.TLSFeature (must-staple).
    extensions: Sequence[x509.ExtensionType]


class LeafOptions(CertOptions, total=False):
    """A leaf's own options: its SANs (DNS names or IP literals) and its extended key
    usage (None: no EKU extension)."""

    sans: Sequence[str]
    usage: Usage


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


def write_crls(path: Path, crls: Iterable[x509.CertificateRevocationList]) -> Path:
    """Concatenate PEM CRLs into one file (what Mosquitto's `crlfile` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls))
    return path


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

    def root(self, cn: str, **opts: Unpack[CertOptions]) -> Issued:
        """A self-signed CA. Two roots with the same `cn` need distinct `name`s to get
        distinct keys (that is exactly the `fake_root` scenario)."""
        return self._issue(cn, None, opts, 3650, ca_path_length=None, usage=None)

    def intermediate(
        self, issuer: Issued, cn: str, *, path_length: int | None = 0,
        **opts: Unpack[CertOptions],
    ) -> Issued:  # fmt: skip
        return self._issue(cn, issuer, opts, 1825, ca_path_length=path_length, usage=None)

    def leaf(
        self, issuer: Issued, cn: str, *, uri_sans: Sequence[str] = (),
        **opts: Unpack[LeafOptions],
    ) -> Issued:  # fmt: skip
        """A client certificate unless `usage` says otherwise."""
        return self._issue(
            cn, issuer, opts, 365, ca_path_length=False, usage=opts.get("usage", "client"),
            sans=opts.get("sans", ()), uri_sans=uri_sans,
        )  # fmt: skip

    def self_signed_leaf(self, cn: str, **opts: Unpack[LeafOptions]) -> Issued:
        """A non-CA certificate that signs itself (the "quick openssl req" broker); a
        server certificate unless `usage` says otherwise."""
        return self._issue(
            cn, None, opts, 365, ca_path_length=False, usage=opts.get("usage", "server"),
            sans=opts.get("sans", ()),
        )  # fmt: skip

    def crl(
        self, issuer: Issued, *, this_update: datetime, next_update: datetime,
        revoked: Iterable[Issued | x509.Certificate] = (), number: int = 1,
        signer: PrivateKey | None = None,
    ) -> x509.CertificateRevocationList:  # fmt: skip
        """A CRL of `issuer` with explicit thisUpdate/nextUpdate (cryptography cannot
        build one without nextUpdate) listing `revoked`; `signer` signs it instead of the issuer's key (a forged CRL)."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(_whole_second(this_update))
            .next_update(_whole_second(next_update))
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for entry in revoked:
            cert = entry.cert if isinstance(entry, Issued) else entry
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                .revocation_date(_whole_second(this_update)).build())
        key = signer or issuer.key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return builder.sign(key, None)
        return builder.sign(key, hashes.SHA256())

    def _validity(
        self, days: float, not_before: datetime | None, not_after: datetime | None
    ) -> tuple[datetime, datetime]:
        # One hour of back-dating tolerates small clock differences between peers.
        start = _whole_second(not_before) if not_before else self.now - timedelta(hours=1)
        end = _whole_second(not_after) if not_after else start + timedelta(days=days)
        return start, _whole_second(end)

    def _issue(
        self,
        cn: str,
        issuer: Issued | None,
        opts: CertOptions,
        default_days: float,
        *,
        ca_path_length: int | Literal[False] | None,
        usage: Usage,
        sans: Sequence[str] = (),
        uri_sans: Sequence[str] = (),
    ) -> Issued:
        """`ca_path_length=False` means a leaf; None or an int means a CA."""
        name = opts.get("name") or _file_name(cn)
        key = opts.get("key") or self.key(opts.get("key_type", "p256"), name)
        days = opts.get("days", default_days)
        start, end = self._validity(days, opts.get("not_before"), opts.get("not_after"))
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
                    path_length=ca_path_length if is_ca else None,
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
        for extension in opts.get("extensions", ()):
            builder = builder.add_extension(extension, critical=False)
        cert = _sign(builder, signer_key, opts.get("hash_alg", "sha256"))
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
        return resign_sha1(builder.sign(key, hashes.SHA256()), key)
    return builder.sign(key, _HASHES[hash_alg])
