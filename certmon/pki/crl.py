"""Certificate revocation lists: files → CRLs → facts → findings.

Owns reading CRL files (PEM with several `X509 CRL` blocks, or concatenated DER) into
`CrlFile`s without raising, the facts one CRL states about itself (`CrlFacts`: issuer,
thisUpdate, nextUpdate, CRL number, revoked serials, which CA's key its signature
verifies under) and every judgement about a CRL: expiry (`CRL_EXPIRED`,
`CRL_EXPIRING`, `CRL_NOT_YET_VALID`), signature and issuer (`CRL_SIGNATURE_INVALID`,
`CRL_ISSUER_UNKNOWN`), a trusted CA without a CRL (`CRL_MISSING`) and revocation of
a certificate (`CERT_REVOKED`).
Must not: read the clock (every rule takes `now`), open sockets, or import paho, the
agent or the collector.

Why an expired CRL is critical, not a warning: OpenSSL, with CRL checking on (what
Mosquitto's `crlfile` does), fails every verification whose CRL is past nextUpdate
with "CRL has expired", so a broker refuses every client, valid ones included
(eclipse-mosquitto/mosquitto#1826; tests/test_brokerhost_lockout.py shows it).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from ..errors import unreadable_hint
from ..files import read_regular
from .model import CertFacts, Finding, FindingCode, LoadedCert, Policy, Severity, iso_utc
from .rules import days_of, human_days

_ISSUER_KEYS = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
                ed448.Ed448PublicKey, dsa.DSAPublicKey)
_Ext = TypeVar("_Ext", x509.AuthorityKeyIdentifier, x509.SubjectKeyIdentifier)
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----(.*?)-----END X509 CRL-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class CrlFacts:
    """What one CRL says about itself, and which CA (if any) signed it."""

    issuer: str
    this_update: datetime
    next_update: datetime | None  # None: the CRL never goes stale (OpenSSL accepts it)
    crl_number: int | None
    revoked_count: int
    revoked_serials: tuple[int, ...]
    signature_algorithm: str
    # SHA-256 of the CA certificate whose key verifies the signature; None when no CA
    # given has the issuer's name, or when none of them verifies it.
    signed_by_sha256: str | None
    signed_by: str | None  # that CA's name, for messages
    # Some CA given carries the CRL issuer's name (and, when both carry one, the key
    # identifier its authority key identifier names).
    has_known_issuer: bool
    source: str = ""
    index: int = 0

    @property
    def is_verified(self) -> bool:
        """Its signature verifies under a CA given: only then are its entries believed."""
        return self.signed_by_sha256 is not None


@dataclass(frozen=True, slots=True)
class CrlFile:
    """The CRLs read from one file, plus a finding for every block that failed."""

    source: str
    crls: tuple[CrlFacts, ...] = ()
    findings: tuple[Finding, ...] = ()


def parse_crls(data: bytes, source: str, cas: Sequence[LoadedCert] = ()) -> CrlFile:
    """Every CRL in `data` (PEM blocks or concatenated DER), never raising. `cas` are
    the CAs whose keys may have signed them (the broker's cafile/capath)."""
    ders: list[bytes | None]
    if b"-----BEGIN" in data:
        ders = [_b64(m.group(1)) for m in _PEM_CRL.finditer(data)]
    else:
        ders = list(_der_elements(data))
    crls: list[CrlFacts] = []
    findings: list[Finding] = []
    for index, der in enumerate(ders):
        facts = _facts(der, source, index, cas) if der is not None else None
        if facts is None:
            findings.append(Finding(FindingCode.CRL_UNPARSEABLE, Severity.CRITICAL,
                                    f"{source}: CRL block #{index} does not parse",
                                    source=source))
        else:
            crls.append(facts)
    if not ders:
        findings.append(Finding(FindingCode.CRL_UNPARSEABLE, Severity.CRITICAL,
                                f"{source}: {_why_no_crl(data)}", source=source))
    return CrlFile(source, tuple(crls), tuple(findings))


def read_crls(path: str | Path, cas: Sequence[LoadedCert] = ()) -> CrlFile:
    """Read a CRL file; an unreadable file is a finding, never an exception."""
    source = str(path)
    try:
        data = read_regular(path)  # a FIFO or device would block the read
    except OSError as exc:
        return CrlFile(source, findings=(Finding(
            FindingCode.FILE_UNREADABLE, Severity.CRITICAL,
            f"{source}: cannot read CRL: {exc.strerror or exc}{unreadable_hint(exc)}",
            source=source),))
    return parse_crls(data, source, cas)


def crl_findings(crl: CrlFacts, now: datetime, policy: Policy) -> list[Finding]:
    """Expiry, signature and issuer of one CRL at `now`, with the certificate
    thresholds: warn/crit days and lifetime fraction (thisUpdate → nextUpdate)."""
    out: list[Finding] = []
    label = f"CRL of {crl.issuer} ({crl.source})"
    if not crl.has_known_issuer:
        out.append(_about(crl, FindingCode.CRL_ISSUER_UNKNOWN, Severity.WARNING,
                          f"{label}: no CA given has its issuer's name, so its signature "
                          "cannot be checked (and clients of that CA have no CRL)"))
    elif crl.signed_by_sha256 is None:
        out.append(_about(crl, FindingCode.CRL_SIGNATURE_INVALID, Severity.CRITICAL,
                          f"{label}: its signature does not verify under any CA named "
                          f"{crl.issuer}; OpenSSL refuses it (\"CRL signature failure\") "
                          "and with it every client of that CA"))
    if now < crl.this_update:
        out.append(_about(crl, FindingCode.CRL_NOT_YET_VALID, Severity.CRITICAL,
                          f"{label}: thisUpdate {iso_utc(crl.this_update)} is "
                          f"{human_days(days_of(crl.this_update - now))} ahead; a broker "
                          "using it refuses every client until then"))
    if crl.next_update is None:
        return out
    left = days_of(crl.next_update - now)
    if left <= 0:
        out.append(_about(crl, FindingCode.CRL_EXPIRED, Severity.CRITICAL,
                          f"{label}: nextUpdate {iso_utc(crl.next_update)} passed "
                          f"{human_days(-left)} ago; a broker using it refuses every client "
                          f"from {iso_utc(crl.next_update)}"))
        return out
    lifetime_s = (crl.next_update - crl.this_update).total_seconds()
    fraction = (crl.next_update - now).total_seconds() / lifetime_s if lifetime_s > 0 else 0.0
    severity = Severity.OK
    if left <= policy.crit_days or fraction <= policy.crit_fraction:
        severity = Severity.CRITICAL
    elif left <= policy.warn_days or fraction <= policy.warn_fraction:
        severity = Severity.WARNING
    if severity != Severity.OK:
        out.append(_about(crl, FindingCode.CRL_EXPIRING, severity,
                          f"{label}: nextUpdate {iso_utc(crl.next_update)} (in "
                          f"{human_days(left)}, {fraction:.0%} of its lifetime left); a "
                          f"broker using it refuses every client from "
                          f"{iso_utc(crl.next_update)} unless it is reissued"))
    return out


def revoked_findings(certs: Iterable[CertFacts], crls: Iterable[CrlFacts],
                     holder: str = "") -> list[Finding]:
    """`CERT_REVOKED` for every certificate a CRL of its issuer lists. `holder` says
    who holds the certificate ("device gw-7", "broker listener 8883")."""
    crl_list = list(crls)
    out: list[Finding] = []
    for cert in certs:
        crl = revoked_by(cert.issuer, cert.serial_hex, crl_list)
        if crl is not None:
            who = f"{holder} " if holder else ""
            out.append(Finding(FindingCode.CERT_REVOKED, Severity.CRITICAL,
                               f"{who}certificate {cert.name} (serial {cert.serial_hex}) "
                               f"is revoked by the CRL of {crl.issuer} ({crl.source})",
                               cert_sha256=cert.sha256, subject=cert.subject,
                               source=crl.source, not_after=cert.not_after))
    return out


def missing_crl_findings(cas: Sequence[CertFacts], crls: Sequence[CrlFacts],
                         crlfile: str) -> list[Finding]:
    """`CRL_MISSING` for each trusted CA that has no CRL in `crlfile`. With CRL checking
    on, OpenSSL needs a CRL from the issuer of every client certificate and refuses
    the client without one ("unable to get certificate CRL"). A CA that issues other
    CAs of the same trust store is skipped: it probably issues no client directly."""
    issuers_of_cas = {ca.issuer for ca in cas if not ca.is_self_issued}
    have = {crl.issuer for crl in crls}
    out: list[Finding] = []
    for ca in cas:
        if ca.subject in have or ca.subject in issuers_of_cas:
            continue
        out.append(Finding(FindingCode.CRL_MISSING, Severity.WARNING,
                           f"{crlfile} holds no CRL of trusted CA {ca.name}: a broker using "
                           "it refuses every client whose certificate that CA issued "
                           "(\"unable to get certificate CRL\")",
                           cert_sha256=ca.sha256, subject=ca.subject, source=crlfile,
                           not_after=ca.not_after))
    return out


def revoked_by(issuer: str | None, serial_hex: str | None,
               crls: Iterable[CrlFacts]) -> CrlFacts | None:
    """The CRL that revokes the certificate (issuer DN as `CertFacts.issuer` spells it,
    serial as `CertFacts.serial_hex`), if any. Only a CRL whose signature verifies
    under a CA given is believed: one whose issuer is unknown cannot be checked, and a
    CRL fetched over plain HTTP that anyone could forge must never revoke a device (it
    stays a finding, CRL_ISSUER_UNKNOWN or CRL_SIGNATURE_INVALID)."""
    serial = _serial_of(serial_hex)
    if serial is None or issuer is None:
        return None
    for crl in crls:
        if crl.is_verified and crl.issuer == issuer and serial in crl.revoked_serials:
            return crl
    return None


def _serial_of(serial_hex: str | None) -> int | None:
    try:
        return int(serial_hex, 16) if serial_hex else None
    except ValueError:  # "?" when the serial could not be read
        return None


def _about(crl: CrlFacts, code: FindingCode, severity: Severity, message: str) -> Finding:
    return Finding(code, severity, message, subject=crl.issuer, source=crl.source,
                   not_after=crl.next_update)


def _facts(der: bytes, source: str, index: int, cas: Sequence[LoadedCert]) -> CrlFacts | None:
    # Untrusted bytes meet a parser: any exception means "does not parse".
    try:
        crl = x509.load_der_x509_crl(der)
        issuer = crl.issuer.rfc4514_string()
        serials = tuple(r.serial_number for r in crl)
        number: int | None
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        named = [ca for ca in cas if _may_have_signed(crl, ca)]
        signer = next((ca for ca in named if _verifies(crl, ca)), None)
        return CrlFacts(
            issuer=issuer, this_update=crl.last_update_utc, next_update=crl.next_update_utc,
            crl_number=number, revoked_count=len(serials), revoked_serials=serials,
            signature_algorithm=crl.signature_algorithm_oid._name,
            signed_by_sha256=signer.facts.sha256 if signer else None,
            signed_by=signer.facts.name if signer else None,
            has_known_issuer=bool(named), source=source, index=index)
    except Exception:  # noqa: BLE001
        return None


def _may_have_signed(crl: x509.CertificateRevocationList, ca: LoadedCert) -> bool:
    """The CA's name is the CRL's issuer and, when both carry one, its subject key
    identifier is the CRL's authority key identifier: a CA re-keyed under the same
    name (an old and a new intermediate side by side) is told apart by its key, not
    its DN."""
    if ca.cert.subject != crl.issuer:
        return False
    aki = _extension(crl.extensions, x509.AuthorityKeyIdentifier)
    ski = _extension(ca.cert.extensions, x509.SubjectKeyIdentifier)
    if aki is None or aki.key_identifier is None or ski is None:
        return True
    return aki.key_identifier == ski.digest


def _extension(extensions: x509.Extensions, kind: type[_Ext]) -> _Ext | None:
    try:
        return extensions.get_extension_for_class(kind).value
    except Exception:  # noqa: BLE001 - absent, or a malformed extension: not there
        return None


def _verifies(crl: x509.CertificateRevocationList, ca: LoadedCert) -> bool:
    try:
        key = ca.cert.public_key()
        if not isinstance(key, _ISSUER_KEYS):
            return False
        return crl.is_signature_valid(key)
    except Exception:  # noqa: BLE001
        return False


def _b64(body: bytes) -> bytes | None:
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _der_elements(data: bytes) -> Iterable[bytes | None]:
    """Concatenated DER TLVs; a malformed tail yields one None (one finding)."""
    offset = 0
    while offset < len(data):
        rest = data[offset:]
        if len(rest) < 2 or rest[0] != 0x30:
            yield None
            return
        first = rest[1]
        if first < 0x80:
            end = 2 + first
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or len(rest) < 2 + n:
                yield None
                return
            end = 2 + n + int.from_bytes(rest[2:2 + n], "big")
        if end > len(rest):
            yield None
            return
        yield rest[:end]
        offset += end


def _why_no_crl(data: bytes) -> str:
    if not data.strip():
        return "empty file, no CRL in it"
    if b"-----BEGIN CERTIFICATE-----" in data:
        return ("holds certificates, not a CRL (a CRL starts -----BEGIN X509 CRL-----; "
                "a broker given it as crlfile refuses to start)")
    if b"-----BEGIN" in data:
        return "no CRL found (no -----BEGIN X509 CRL----- block)"
    return "no CRL found (neither a PEM X509 CRL block nor DER)"
