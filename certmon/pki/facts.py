"""Certificate facts: what one parsed certificate says about itself, read defensively.

Owns `facts_from_cert` (every field that can fail degrades to a marker instead of
raising), the raw DER reading of the serial, the device identity a certificate
carries (`identity_of`), and `tolerant`, the one place that silences cryptography's
warnings about non-conforming certificates real bundles still contain.
Must not: judge (no severities here; that is `rules`), read files, or import paho,
the agent or the collector.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from .keys import describe_public_key
from .model import CertFacts


@contextlib.contextmanager
def tolerant() -> Iterator[None]:
    # cryptography warns (and will later refuse) on non-conforming certificates that
    # real bundles still contain: a zero or negative serial in an old root, UTF-8 in a
    # VisibleString policy notice, a two-letter country field that is eight letters long
    # (a plain UserWarning). A monitoring tool must read them, not fail on them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def facts_from_cert(cert: x509.Certificate, *, source: str = "", index: int = 0) -> CertFacts:
    """What the certificate says, with every field that can fail degraded to a marker."""
    der = cert.public_bytes(serialization.Encoding.DER)
    with tolerant():
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


def identity_of(facts: CertFacts) -> str | None:
    """The device identity a certificate carries: a `urn:certmon:device:ID` or
    `certmon://device/ID` SAN URI when present (stable across CN conventions), else
    the subject CN."""
    for san in facts.sans:
        for prefix in ("URI:urn:certmon:device:", "URI:certmon://device/"):
            if san.startswith(prefix):
                return san[len(prefix) :]
    return facts.common_name


def _name(get: Callable[[], x509.Name]) -> str:
    try:
        return str(get().rfc4514_string())
    except (ValueError, TypeError):
        return "<unparseable name>"


def _raw_names_equal(cert: x509.Certificate) -> bool:
    try:
        return cert.subject.public_bytes() == cert.issuer.public_bytes()
    except ValueError:
        return False


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
    return describe_public_key(key)


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
