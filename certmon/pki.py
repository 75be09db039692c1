"""Certificate facts and findings: bundles → certificates → facts → findings.

This module owns every certificate rule in certmon (the expiry rule, the chain rule,
the weak-key rule …). It is pure: every judgement takes `now` (a tz-aware UTC
datetime) and a `Policy`; the only I/O is the thin `read_*` shells at the bottom,
which turn an unreadable file into a finding instead of an exception.
It must not import paho, the agent or the collector.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
    CHAIN_EXPIRES_SOON = "CHAIN_EXPIRES_SOON"
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
    FILE_EMPTY = "FILE_EMPTY"
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
