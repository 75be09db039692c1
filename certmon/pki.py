"""Certificate facts and findings: bundles → certificates → facts → findings.

This module owns the certificate facts and every per-certificate rule (the expiry rule,
the weak-key rule, the key rules …); the chain rule is in certmon.chain, built on it.
It is pure: every judgement takes `now` (a tz-aware UTC datetime) and a `Policy`;
the only I/O is the thin `read_*` shells at the bottom,
which turn an unreadable file into a finding instead of an exception.
It must not import paho, the agent or the collector.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import re
import stat
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

__all__ = [
    "Bundle",
    "CertFacts",
    "ChainResult",
    "Finding",
    "FindingCode",
    "KeyFacts",
    "Policy",
    "Severity",
]


class Severity(enum.IntEnum):
    """Nagios-compatible: the value is the check's exit code."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3

    def __str__(self) -> str:
        return self.name


class FindingCode(enum.StrEnum):
    """Stable finding codes: they travel on the wire and key alert rules."""

    CERT_EXPIRING = "CERT_EXPIRING"
    CERT_EXPIRED = "CERT_EXPIRED"
    CERT_NOT_YET_VALID = "CERT_NOT_YET_VALID"
    CHAIN_INVALID = "CHAIN_INVALID"
    INTERMEDIATE_EXPIRING = "INTERMEDIATE_EXPIRING"
    INTERMEDIATE_EXPIRES_BEFORE_LEAF = "INTERMEDIATE_EXPIRES_BEFORE_LEAF"
    CA_EXPIRING = "CA_EXPIRING"
    CA_EXPIRED = "CA_EXPIRED"
    KEY_MISMATCH = "KEY_MISMATCH"
    KEY_PERMISSIONS = "KEY_PERMISSIONS"
    KEY_UNREADABLE = "KEY_UNREADABLE"
    WEAK_KEY = "WEAK_KEY"
    WEAK_SIGNATURE = "WEAK_SIGNATURE"
    DUPLICATE_CERT = "DUPLICATE_CERT"
    FILE_UNREADABLE = "FILE_UNREADABLE"
    NO_CERTIFICATE = "NO_CERTIFICATE"
    UNPARSEABLE_BLOCK = "UNPARSEABLE_BLOCK"
    NOT_A_CA = "NOT_A_CA"
    HOSTNAME_MISMATCH = "HOSTNAME_MISMATCH"
    SELF_SIGNED_LEAF = "SELF_SIGNED_LEAF"
    INCOMPLETE_CHAIN = "INCOMPLETE_CHAIN"
    CHAIN_MISORDERED = "CHAIN_MISORDERED"
    CLOCK_UNSYNCED = "CLOCK_UNSYNCED"
    CLOCK_IMPLAUSIBLE = "CLOCK_IMPLAUSIBLE"
    CLOCK_BEHIND = "CLOCK_BEHIND"
    CLOCK_AHEAD = "CLOCK_AHEAD"
    BROKER_CERT_EXPIRING = "BROKER_CERT_EXPIRING"
    BROKER_CERT_EXPIRED = "BROKER_CERT_EXPIRED"
    BROKER_CHAIN_INVALID = "BROKER_CHAIN_INVALID"
    TRUST_STORE_MISSING_CA = "TRUST_STORE_MISSING_CA"


@dataclass(frozen=True, slots=True)
class Policy:
    """Thresholds for the expiry rules. Both the day and the lifetime-fraction rule
    apply; the stricter one wins (a 7-day ACME-style cert at 2 days left is past
    70 % of its life even though 2 > crit_days would not be reached with 1-day certs).
    """

    warn_days: float = 30.0
    crit_days: float = 7.0
    # Fraction of the certificate's lifetime remaining at which to warn/go critical.
    warn_fraction: float = 0.0
    crit_fraction: float = 0.0
    # Trust-store CAs expiring within this horizon are reported.
    ca_horizon_days: float = 90.0
    min_rsa_bits: int = 2048
    min_ec_bits: int = 256

    @property
    def warn_window(self) -> timedelta:
        return timedelta(days=self.warn_days)


@dataclass(frozen=True, slots=True)
class CertFacts:
    """What one certificate says about itself, with no judgement attached."""

    subject: str
    issuer: str
    serial_hex: str
    sha256: str
    not_before: datetime
    not_after: datetime
    key_type: str  # "RSA", "EC", "Ed25519", "Ed448", "DSA", "unknown"
    key_bits: int
    signature_algorithm: str  # e.g. "sha256WithRSAEncryption", "ecdsa-with-SHA256", "ed25519"
    signature_hash: str | None  # "sha256", "sha1", "md5", None for Ed25519
    is_ca: bool
    is_self_issued: bool
    ski: str | None
    aki: str | None
    sans: tuple[str, ...]
    common_name: str | None
    source: str = ""  # file path or "tls:host:port"
    index: int = 0  # position of the certificate in its source

    @property
    def name(self) -> str:
        """A short name for messages: the CN, or the whole subject when there is none.
        Findings travel in every status, where a full DN costs bytes and says little."""
        return self.common_name or self.subject

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400.0

    @property
    def lifetime_s(self) -> float:
        return (self.not_after - self.not_before).total_seconds()


@dataclass(frozen=True, slots=True)
class Finding:
    """A judgement: a code, a severity, the certificate it is about and a human message."""

    code: FindingCode
    severity: Severity
    message: str
    cert_sha256: str | None = None
    subject: str | None = None
    source: str | None = None
    not_after: datetime | None = None


@dataclass(frozen=True, slots=True)
class LoadedCert:
    cert: x509.Certificate
    facts: CertFacts


@dataclass(frozen=True, slots=True)
class Bundle:
    """Certificates read from one source, plus findings for every block that failed."""

    source: str
    certs: tuple[LoadedCert, ...] = ()
    findings: tuple[Finding, ...] = ()

    @property
    def facts(self) -> tuple[CertFacts, ...]:
        return tuple(c.facts for c in self.certs)


@dataclass(frozen=True, slots=True)
class KeyFacts:
    source: str
    key_type: str
    key_bits: int
    public_sha256: str  # SHA-256 of the SubjectPublicKeyInfo DER: matches CertFacts' key
    mode: int | None = None  # file permission bits, None when unknown


@dataclass(frozen=True, slots=True)
class ChainResult:
    """The outcome of validating one leaf against a trust store at one instant."""

    is_valid: bool
    checked_at: datetime
    method: str  # "cryptography" or "pyopenssl"
    path: tuple[CertFacts, ...] = ()  # leaf first, trust anchor last, when valid
    error: str | None = None
    failing_cert_sha256: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- loading

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL
)
# Labels that carry a certificate. "X509 CERTIFICATE" is the pre-RFC 7468 header some
# old tools still write; "TRUSTED CERTIFICATE" is OpenSSL's cert + trust-settings form.
_CERT_LABELS = {b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE"}


def parse_bundle(data: bytes, source: str) -> Bundle:
    """Every certificate in `data` (PEM with text around it, or DER), never raising.

    A block that looks like a certificate but does not parse becomes an
    UNPARSEABLE_BLOCK finding naming the source and block index; private keys, DH
    parameters and other non-certificate blocks are ignored (a CA file that carries
    a key is common on gateways and not this rule's business).
    """
    certs: list[LoadedCert] = []
    findings: list[Finding] = []
    if b"-----BEGIN" in data:
        blocks = [(m.group(1), m.group(2)) for m in _PEM_BLOCK.finditer(data)]
        for index, (label, body) in enumerate(b for b in blocks if b[0] in _CERT_LABELS):
            der = _pem_body_to_der(body)
            cert = _load_der(der) if der is not None else None
            if cert is None and der is not None and label == b"TRUSTED CERTIFICATE":
                cert = _load_der(_first_der_element(der))
            loaded = _loaded(cert, source, index) if cert is not None else None
            if loaded is None:
                findings.append(_unparseable(source, index, label.decode()))
                continue
            certs.append(loaded)
    elif data[:1] == b"\x30":
        # DER: one certificate, or several concatenated (some vendors ship that).
        offset, index = 0, 0
        while offset < len(data):
            element = _first_der_element(data[offset:])
            cert = _load_der(element) if element else None
            loaded = _loaded(cert, source, index) if cert is not None else None
            if loaded is None:
                findings.append(_unparseable(source, index, "DER"))
                break
            certs.append(loaded)
            offset += len(element)
            index += 1
    if not certs and not findings:
        findings.append(
            Finding(
                FindingCode.NO_CERTIFICATE,
                Severity.CRITICAL,
                f"{source}: no certificate found (neither a PEM certificate block nor DER)",
                source=source,
            )
        )
    return Bundle(source=source, certs=tuple(certs), findings=tuple(findings))


def _loaded(cert: x509.Certificate, source: str, index: int) -> LoadedCert | None:
    # Last line of defence: the field readers degrade one by one, but a certificate
    # odd enough to break them anyway is reported as unparseable, never raised.
    try:
        return LoadedCert(cert, facts_from_cert(cert, source=source, index=index))
    except Exception:  # noqa: BLE001
        return None


def _unparseable(source: str, index: int, label: str) -> Finding:
    return Finding(
        FindingCode.UNPARSEABLE_BLOCK,
        Severity.WARNING,
        f"{source}: certificate block #{index} ({label}) does not parse",
        source=source,
    )


def _pem_body_to_der(body: bytes) -> bytes | None:
    # RFC 1421-style headers ("Proc-Type: …") may precede the base64 text.
    lines = [ln.strip() for ln in body.splitlines() if ln.strip() and b":" not in ln]
    try:
        return base64.b64decode(b"".join(lines), validate=True)
    except (binascii.Error, ValueError):
        return None


def _first_der_element(data: bytes) -> bytes:
    """The first DER TLV in `data` (by its length header), or b"" if it is malformed."""
    if len(data) < 2 or data[0] != 0x30:
        return b""
    first = data[1]
    if first < 0x80:
        end = 2 + first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or len(data) < 2 + n:
            return b""
        end = 2 + n + int.from_bytes(data[2 : 2 + n], "big")
    return data[:end] if end <= len(data) else b""


def _load_der(der: bytes) -> x509.Certificate | None:
    try:
        with _tolerant():
            cert = x509.load_der_x509_certificate(der)
            # Touch the fields every later step needs so that a lazily-failing
            # certificate is caught here, at one place, and not in the middle of a rule.
            _ = cert.not_valid_after_utc, cert.not_valid_before_utc
            _ = cert.fingerprint(hashes.SHA256())
    # Untrusted bytes meet a parser: cryptography raises ValueError, InvalidVersion,
    # UnsupportedAlgorithm … depending on the defect. Any of them means "does not
    # parse", which the caller turns into a finding naming the block.
    except Exception:  # noqa: BLE001
        return None
    return cert


def raw_serial(der: bytes) -> bytes | None:
    """The serialNumber INTEGER's content octets, read straight from the DER.

    cryptography turns the serial into an int (losing leading zero octets) and warns
    on every access when it is zero or negative, which real CA bundles still contain
    (e.g. an old root in Debian's ca-certificates). Certificate → tbsCertificate →
    optional [0] version → INTEGER serial.
    """
    try:
        _, body = _der_tlv(der, 0)  # Certificate
        _, tbs = _der_tlv(der, body)  # tbsCertificate
        tag_at = tbs
        if der[tag_at] == 0xA0:  # explicit [0] version
            end, _ = _der_tlv(der, tag_at)
            tag_at = end
        if der[tag_at] != 0x02:
            return None
        end, start = _der_tlv(der, tag_at)
        return der[start:end]
    except IndexError:
        return None


def _der_tlv(der: bytes, at: int) -> tuple[int, int]:
    """(end offset, content offset) of the TLV at `at`."""
    first = der[at + 1]
    if first < 0x80:
        return at + 2 + first, at + 2
    n = first & 0x7F
    length = int.from_bytes(der[at + 2 : at + 2 + n], "big")
    return at + 2 + n + length, at + 2 + n


@contextlib.contextmanager
def _tolerant() -> Iterator[None]:
    # cryptography warns (and will later refuse) on non-conforming certificates that
    # real bundles still contain: a zero or negative serial in an old root, UTF-8 in a
    # VisibleString policy notice, a two-letter country field that is eight letters long
    # (a plain UserWarning). A monitoring tool must read them, not fail on them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


# --------------------------------------------------------------------------- facts


def facts_from_cert(cert: x509.Certificate, *, source: str = "", index: int = 0) -> CertFacts:
    """What the certificate says, with every field that can fail degraded to a marker."""
    der = cert.public_bytes(serialization.Encoding.DER)
    with _tolerant():
        return _facts(cert, der, source, index)


def _facts(cert: x509.Certificate, der: bytes, source: str, index: int) -> CertFacts:
    key_type, key_bits = _key_facts(cert)
    sig_name, sig_hash = _signature_facts(cert)
    return CertFacts(
        subject=_name(lambda: cert.subject),
        issuer=_name(lambda: cert.issuer),
        serial_hex=_serial_hex(der),
        sha256=cert.fingerprint(hashes.SHA256()).hex(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key_type=key_type,
        key_bits=key_bits,
        signature_algorithm=sig_name,
        signature_hash=sig_hash,
        is_ca=_is_ca(cert),
        is_self_issued=_raw_names_equal(cert),
        ski=_ski(cert),
        aki=_aki(cert),
        sans=_sans(cert),
        common_name=_common_name(cert),
        source=source,
        index=index,
    )


def _name(get: object) -> str:
    try:
        return str(get().rfc4514_string())  # type: ignore[operator]
    except (ValueError, TypeError):
        return "<unparseable name>"


def _raw_names_equal(cert: x509.Certificate) -> bool:
    try:
        return cert.subject.public_bytes() == cert.issuer.public_bytes()
    except ValueError:
        return False


def _serial_hex(der: bytes) -> str:
    # Upper-case hex of the serial as encoded, as `openssl x509 -serial` prints it: a
    # serial whose first octet is 0x0A stays "0A…" instead of becoming "A…". The one
    # 0x00 octet DER adds before a high bit is dropped, as openssl does.
    serial = raw_serial(der)
    if serial is None:
        return "?"
    if len(serial) > 1 and serial[0] == 0 and serial[1] & 0x80:
        serial = serial[1:]
    return serial.hex().upper()


def _key_facts(cert: x509.Certificate) -> tuple[str, int]:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unknown", 0
    return _describe_public_key(key)


def _describe_public_key(key: object) -> tuple[str, int]:
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


def _signature_facts(cert: x509.Certificate) -> tuple[str, str | None]:
    oid = cert.signature_algorithm_oid
    name = getattr(oid, "_name", None) or oid.dotted_string
    try:
        algorithm = cert.signature_hash_algorithm
    except ValueError:  # e.g. "Invalid RSA PSS parameters"
        return name, "unknown"
    except UnsupportedAlgorithm:
        # cryptography does not know the hash (MD2, MD4 …): read it off the OID name.
        lowered = name.lower()
        guess = next((h for h in ("md2", "md4", "md5", "sha1") if lowered.startswith(h)), None)
        return name, guess or "unknown"
    return name, algorithm.name if algorithm is not None else None


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except Exception:  # noqa: BLE001 - a malformed extension is "absent" for facts
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    bc = _ext(cert, x509.BasicConstraints)
    return isinstance(bc, x509.BasicConstraints) and bc.ca


def _ski(cert: x509.Certificate) -> str | None:
    ski = _ext(cert, x509.SubjectKeyIdentifier)
    return ski.digest.hex() if isinstance(ski, x509.SubjectKeyIdentifier) else None


def _aki(cert: x509.Certificate) -> str | None:
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    if isinstance(aki, x509.AuthorityKeyIdentifier) and aki.key_identifier is not None:
        return aki.key_identifier.hex()
    return None


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    san = _ext(cert, x509.SubjectAlternativeName)
    if not isinstance(san, x509.SubjectAlternativeName):
        return ()
    out: list[str] = []
    for name in san:
        if isinstance(name, x509.DNSName):
            out.append(f"DNS:{name.value}")
        elif isinstance(name, x509.IPAddress):
            out.append(f"IP:{name.value}")
        elif isinstance(name, x509.UniformResourceIdentifier):
            out.append(f"URI:{name.value}")
        elif isinstance(name, x509.RFC822Name):
            out.append(f"email:{name.value}")
    return tuple(out)


def _common_name(cert: x509.Certificate) -> str | None:
    try:
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    return str(attrs[0].value) if attrs else None


def identity_of(facts: CertFacts) -> str | None:
    """The device identity a certificate carries: a `urn:certmon:device:ID` or
    `certmon://device/ID` SAN URI when present (stable across CN conventions), else
    the subject CN."""
    for san in facts.sans:
        for prefix in ("URI:urn:certmon:device:", "URI:certmon://device/"):
            if san.startswith(prefix):
                return san[len(prefix) :]
    return facts.common_name


def spki_sha256(key: object) -> str:
    """SHA-256 of a public key's SubjectPublicKeyInfo: the key's identity."""
    der = key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def cert_spki_sha256(cert: x509.Certificate) -> str | None:
    try:
        return spki_sha256(cert.public_key())
    except (ValueError, UnsupportedAlgorithm):
        return None


# --------------------------------------------------------------------------- rules


def finding_about(
    code: FindingCode, severity: Severity, message: str, facts: CertFacts,
    cert_sha256: str | None = None,
) -> Finding:
    """A finding about one certificate (`cert_sha256` overrides which one, e.g. the
    intermediate that broke a chain rather than the leaf it was reached from)."""
    return Finding(code, severity, message, cert_sha256=cert_sha256 or facts.sha256,
                   subject=facts.subject, source=facts.source, not_after=facts.not_after)


def days_of(delta: timedelta) -> float:
    return delta.total_seconds() / 86400.0


def human_days(days: float) -> str:
    if abs(days) < 1:
        return f"{days * 24:.1f} hours"
    return f"{days:.1f} days"


def expiry_findings(facts: CertFacts, now: datetime, policy: Policy, role: str) -> list[Finding]:
    """The expiry rule, in one place.

    `role` is "client", "server", "broker", "intermediate" or "ca" (trust store) and
    only chooses the finding code: an intermediate that expires is a different
    operational problem (every leaf under it breaks) from a leaf that expires.
    """
    label = _ROLE_LABEL.get(role, "certificate")
    if now < facts.not_before:
        ahead = human_days(days_of(facts.not_before - now))
        return [finding_about(FindingCode.CERT_NOT_YET_VALID, Severity.CRITICAL,
                              f"{label} {facts.name} is not valid before "
                              f"{iso_utc(facts.not_before)} ({ahead} from now)", facts)]
    left = days_of(facts.not_after - now)
    expired_code, expiring_code = _ROLE_CODES.get(role, _ROLE_CODES["client"])
    if left <= 0:
        return [finding_about(expired_code, Severity.CRITICAL,
                        f"{label} {facts.name} expired {iso_utc(facts.not_after)} "
                        f"({human_days(-left)} ago)", facts)]
    lifetime_s = facts.lifetime_s
    fraction = (facts.not_after - now).total_seconds() / lifetime_s if lifetime_s > 0 else 0.0
    severity = Severity.OK
    if left <= policy.crit_days or fraction <= policy.crit_fraction:
        severity = Severity.CRITICAL
    elif left <= policy.warn_days or fraction <= policy.warn_fraction:
        severity = Severity.WARNING
    if role == "ca" and severity == Severity.OK and left <= policy.ca_horizon_days:
        severity = Severity.WARNING
    if severity == Severity.OK:
        return []
    return [finding_about(expiring_code, severity,
                    f"{label} {facts.name} expires {iso_utc(facts.not_after)} "
                    f"(in {human_days(left)}, {fraction:.0%} of its lifetime left)",
                    facts)]


_ROLE_LABEL = {"client": "client certificate", "server": "server certificate",
               "broker": "broker certificate", "intermediate": "intermediate CA",
               "ca": "trusted CA"}
_ROLE_CODES = {
    "client": (FindingCode.CERT_EXPIRED, FindingCode.CERT_EXPIRING),
    "server": (FindingCode.CERT_EXPIRED, FindingCode.CERT_EXPIRING),
    "broker": (FindingCode.BROKER_CERT_EXPIRED, FindingCode.BROKER_CERT_EXPIRING),
    "intermediate": (FindingCode.CERT_EXPIRED, FindingCode.INTERMEDIATE_EXPIRING),
    "ca": (FindingCode.CA_EXPIRED, FindingCode.CA_EXPIRING),
}


def iso_utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def strength_findings(facts: CertFacts, policy: Policy) -> list[Finding]:
    """Weak keys and weak signatures. A self-signed root's own signature is never
    checked by anyone (the anchor is trusted by fingerprint), so it is exempt."""
    out: list[Finding] = []
    weak_key = (
        (facts.key_type == "RSA" and facts.key_bits < policy.min_rsa_bits)
        or (facts.key_type == "EC" and facts.key_bits < policy.min_ec_bits)
        or facts.key_type == "DSA"
    )
    if weak_key:
        out.append(finding_about(FindingCode.WEAK_KEY, Severity.CRITICAL,
                           f"{facts.name} has a weak key ({facts.key_type}-{facts.key_bits}); "
                           "OpenSSL 3 at security level 2 refuses it", facts))
    if not facts.is_self_issued and facts.signature_hash in {"md2", "md4", "md5", "sha1"}:
        out.append(finding_about(FindingCode.WEAK_SIGNATURE, Severity.CRITICAL,
                           f"{facts.name} is signed with {facts.signature_algorithm}; "
                           "current TLS stacks reject it", facts))
    return out


def trust_store_findings(bundle: Bundle, now: datetime, policy: Policy) -> list[Finding]:
    """Findings about a CA bundle as a whole: unparseable blocks, duplicates, CAs that
    expired or expire within the horizon, non-CA certificates sitting in it."""
    out = list(bundle.findings)
    seen: dict[str, CertFacts] = {}
    for facts in bundle.facts:
        if facts.sha256 in seen:
            out.append(Finding(FindingCode.DUPLICATE_CERT, Severity.WARNING,
                               f"{facts.source}: certificate #{facts.index} ({facts.name}) "
                               f"duplicates #{seen[facts.sha256].index}",
                               cert_sha256=facts.sha256, subject=facts.subject,
                               source=facts.source, not_after=facts.not_after))
            continue
        seen[facts.sha256] = facts
        out.extend(expiry_findings(facts, now, policy, "ca"))
        out.extend(strength_findings(facts, policy))
    return out


def key_findings(key: KeyFacts, cert: CertFacts | None, cert_spki: str | None) -> list[Finding]:
    """Whether the private key belongs to the certificate and is kept private."""
    out: list[Finding] = []
    if cert is not None and cert_spki is not None and cert_spki != key.public_sha256:
        out.append(Finding(FindingCode.KEY_MISMATCH, Severity.CRITICAL,
                           f"private key {key.source} does not belong to certificate "
                           f"{cert.name} ({cert.source}): TLS handshakes will fail",
                           cert_sha256=cert.sha256, subject=cert.subject, source=key.source,
                           not_after=cert.not_after))
    if key.mode is not None and key.mode & 0o077:
        # World access is a leak waiting to happen; group access is sometimes a
        # deliberate `ssl-cert` group setup, so it only warns.
        severity = Severity.CRITICAL if key.mode & 0o007 else Severity.WARNING
        out.append(Finding(FindingCode.KEY_PERMISSIONS, severity,
                           f"private key {key.source} has mode {key.mode:04o}; "
                           "it should be 0600 (or 0640 with a dedicated group)",
                           source=key.source))
    return out


def worst(findings: Iterable[Finding]) -> Severity:
    return max((f.severity for f in findings), default=Severity.OK)


# --------------------------------------------------------------------------- I/O shells


def read_bundle(path: str | Path) -> Bundle:
    """Read a certificate file; an unreadable file is a finding, never an exception."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Bundle(source, findings=(Finding(
            FindingCode.FILE_UNREADABLE, Severity.CRITICAL,
            f"{source}: cannot read: {exc.strerror or exc}", source=source),))
    return parse_bundle(data, source)


def read_private_key(
    path: str | Path, password: bytes | None = None
) -> tuple[KeyFacts | None, list[Finding], object | None]:
    """Load a private key: (facts, findings, key object). The key object stays in
    memory for signing and is never logged or serialised by certmon."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError as exc:
        return None, [Finding(FindingCode.KEY_UNREADABLE, Severity.CRITICAL,
                              f"{source}: cannot read private key: {exc.strerror or exc}",
                              source=source)], None
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
        return None, [Finding(FindingCode.KEY_UNREADABLE, Severity.CRITICAL,
                              f"{source}: not a usable private key ({type(exc).__name__})",
                              source=source)], None
    key_type, key_bits = _describe_public_key(key.public_key())
    facts = KeyFacts(source, key_type, key_bits, spki_sha256(key.public_key()), mode)
    return facts, [], key




def as_json(value: object) -> object:
    """Facts and findings as JSON-safe values: instants as RFC 3339 UTC strings with
    'Z', enums by name, dataclasses as dicts (the `--json` output of every command)."""
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, Severity):
        return value.name
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "__dataclass_fields__"):
        return {name: as_json(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value
