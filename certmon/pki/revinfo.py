"""Where a certificate says its revocation status is published, and what a stapled
OCSP response says: facts only.

Owns `revocation_pointers` (CRL Distribution Points, the AIA's OCSP responders, the
TLS Feature "must-staple" flag of one certificate, each read defensively) and
`ocsp_staple_status` (the certificate status in a stapled OCSP response).
Must not: fetch anything (no network: a scan reports where the CRL is, it does not
download it unless asked), judge, or read files.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID


@dataclass(frozen=True, slots=True)
class RevocationPointers:
    """One certificate's revocation pointers; empty tuples when it names none."""

    crl_urls: tuple[str, ...] = ()
    ocsp_urls: tuple[str, ...] = ()
    is_must_staple: bool = False


def revocation_pointers(cert: x509.Certificate) -> RevocationPointers:
    return RevocationPointers(_crl_urls(cert), _ocsp_urls(cert), _must_staple(cert))


def ocsp_staple_status(response_der: bytes) -> str:
    """"good", "revoked", "unknown" (the responder's word), or why there is none:
    "unsuccessful:<status>" or "unparseable"."""
    try:
        response = ocsp.load_der_ocsp_response(response_der)
        if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            return f"unsuccessful:{response.response_status.name.lower()}"
        return response.certificate_status.name.lower()
    except Exception:  # noqa: BLE001 - untrusted bytes from the peer: any failure is a fact
        return "unparseable"


def _crl_urls(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except Exception:  # noqa: BLE001 - absent or malformed: no pointer
        return ()
    return tuple(name.value for point in points for name in (point.full_name or ())
                 if isinstance(name, x509.UniformResourceIdentifier))


def _ocsp_urls(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except Exception:  # noqa: BLE001
        return ()
    return tuple(d.access_location.value for d in access
                 if d.access_method == AuthorityInformationAccessOID.OCSP
                 and isinstance(d.access_location, x509.UniformResourceIdentifier))


def _must_staple(cert: x509.Certificate) -> bool:
    try:
        feature = cert.extensions.get_extension_for_class(x509.TLSFeature).value
    except Exception:  # noqa: BLE001
        return False
    return x509.TLSFeatureType.status_request in feature
