"""Reading certificate bundles: bytes (PEM with text around it, or DER) → a `Bundle`.

Owns finding the certificate blocks in a file (PEM labels, RFC 1421 headers,
OpenSSL's TRUSTED CERTIFICATE form, concatenated DER), loading each one at a single
place where a lazily-failing certificate is caught, and `read_bundle`, the thin I/O
shell that turns an unreadable file into a finding.
Must not: raise on what a file contains (every bad block becomes a finding naming
the source and block index), judge the certificates, or read private keys.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..errors import unreadable_hint
from ..files import read_regular
from .facts import facts_from_cert, tolerant
from .model import Bundle, Finding, FindingCode, LoadedCert, Severity

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
                f"{source}: {_why_no_certificate(data)}",
                source=source,
            )
        )
    return Bundle(source=source, certs=tuple(certs), findings=tuple(findings))


def read_bundle(path: str | Path) -> Bundle:
    """Read a certificate file; an unreadable file is a finding, never an exception."""
    source = str(path)
    try:
        data = read_regular(path)
    except OSError as exc:
        return Bundle(source, findings=(Finding(
            FindingCode.FILE_UNREADABLE, Severity.CRITICAL,
            f"{source}: cannot read: {exc.strerror or exc}{unreadable_hint(exc)}",
            source=source),))
    return parse_bundle(data, source)


def _why_no_certificate(data: bytes) -> str:
    # The classic mix-up is the key file given where the certificate belongs.
    if not data.strip():
        return "empty file, no certificate in it"
    if _PRIVATE_KEY.search(data):
        return ("holds a private key, not a certificate (a key where a certificate is "
                "expected? a certificate starts -----BEGIN CERTIFICATE-----)")
    return "no certificate found (neither a PEM certificate block nor DER)"


_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


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
        with tolerant():
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
