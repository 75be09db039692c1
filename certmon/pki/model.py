"""The vocabulary of certificate checking: severities, finding codes, the policy, the
facts about a certificate, a bundle and a key, a finding, a chain result, and their
JSON form.

Owns these frozen types and `as_json`/`iso_utc`, nothing that computes them.
Must not: read files, parse certificates or judge (that is `bundle`, `facts`, `keys`
and `rules`), or import paho, the agent or the collector.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509


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
    # An expired or expiring CA that no chain of the device goes through (severity OK:
    # information, agent.report.judged_by_use); never sent in a status.
    STALE_CA = "STALE_CA"
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
    # What only a scan of an endpoint can find (certmon.scanverdict).
    PROBE_FAILED = "PROBE_FAILED"
    MQTT_CONNACK_REFUSED = "MQTT_CONNACK_REFUSED"
    CLIENT_CERT_REQUIRED = "CLIENT_CERT_REQUIRED"
    CLIENT_CERT_REJECTED = "CLIENT_CERT_REJECTED"
    # The device's certificate renewal (agent.renewal, docs/renewal.md), judged by the
    # collector from the status's `renewal` part.
    RENEWAL_FAILING = "RENEWAL_FAILING"
    RENEWAL_OVERDUE = "RENEWAL_OVERDUE"
    # Certificate revocation lists (certmon.pki.crl) and the broker host's own files
    # (agent.brokerhost): an expired CRL makes a broker with `crlfile` refuse every client.
    CRL_EXPIRED = "CRL_EXPIRED"
    CRL_EXPIRING = "CRL_EXPIRING"
    CRL_NOT_YET_VALID = "CRL_NOT_YET_VALID"
    CRL_SIGNATURE_INVALID = "CRL_SIGNATURE_INVALID"
    CRL_ISSUER_UNKNOWN = "CRL_ISSUER_UNKNOWN"
    CRL_UNPARSEABLE = "CRL_UNPARSEABLE"
    CRL_MISSING = "CRL_MISSING"
    CERT_REVOKED = "CERT_REVOKED"
    BROKER_CERT_NOT_RELOADED = "BROKER_CERT_NOT_RELOADED"
    BROKER_CONFIG_UNKNOWN = "BROKER_CONFIG_UNKNOWN"
    BROKER_CONFIG_INVALID = "BROKER_CONFIG_INVALID"


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


def iso_utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_json(value: object) -> object:
    """Facts and findings as JSON-safe values: instants as RFC 3339 UTC strings with
    'Z', enums by name, dataclasses as dicts (the `--json` output of every command)."""
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, Severity):
        return value.name
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return {name: as_json(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value
