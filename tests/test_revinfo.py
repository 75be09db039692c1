"""Revocation facts a scan reports without fetching anything: each presented
certificate's CRL Distribution Points, OCSP responders and must-staple flag, and
whether the server stapled an OCSP response (and what it says). Against real peers:
Mosquitto (which staples nothing) and a pyOpenSSL server that staples."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import MosquittoFactory
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID
from kit.broker import Listener
from kit.pki import Issued, PKIFactory
from OpenSSL import SSL

from certmon import pki
from certmon.pki.revinfo import ocsp_staple_status, revocation_pointers
from certmon.scanverdict import judge, trust_from_bundles
from certmon.tlsprobe import ProbeTarget, probe

NOW = datetime.now(UTC).replace(microsecond=0)
CRL_URL = "http://pki.example/devices.crl"
OCSP_URL = "http://ocsp.example/"


def _pointed(factory: PKIFactory, issuer: Issued, *, must_staple: bool = False) -> Issued:
    extensions: list[x509.ExtensionType] = [
        x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(CRL_URL)], None, None, None)]),
        x509.AuthorityInformationAccess([x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(OCSP_URL))])]
    if must_staple:
        extensions.append(x509.TLSFeature([x509.TLSFeatureType.status_request]))
    return factory.leaf(issuer, "broker.test", usage="server", sans=["127.0.0.1"],
                        extensions=extensions, name=f"pointed-{must_staple}")


def _ocsp_response(leaf: Issued, issuer: Issued, *, revoked: bool = False) -> bytes:
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=leaf.cert, issuer=issuer.cert, algorithm=hashes.SHA256(),
        cert_status=ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD,
        this_update=NOW, next_update=NOW + timedelta(days=1),
        revocation_time=NOW if revoked else None, revocation_reason=None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.cert)
    return builder.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def test_pointers_are_read_from_the_certificate() -> None:
    factory = PKIFactory(NOW)
    root = factory.root("Rev Root")
    pointed = revocation_pointers(_pointed(factory, root, must_staple=True).cert)
    assert pointed.crl_urls == (CRL_URL,) and pointed.ocsp_urls == (OCSP_URL,)
    assert pointed.is_must_staple
    bare = revocation_pointers(factory.leaf(root, "bare").cert)
    assert (bare.crl_urls, bare.ocsp_urls, bare.is_must_staple) == ((), (), False)


def test_staple_status_good_revoked_unsuccessful_unparseable() -> None:
    factory = PKIFactory(NOW)
    root = factory.root("Rev Root")
    leaf = factory.leaf(root, "broker.test", usage="server")
    assert ocsp_staple_status(_ocsp_response(leaf, root)) == "good"
    assert ocsp_staple_status(_ocsp_response(leaf, root, revoked=True)) == "revoked"
    unauthorized = ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.UNAUTHORIZED).public_bytes(serialization.Encoding.DER)
    assert ocsp_staple_status(unauthorized) == "unsuccessful:unauthorized"
    assert ocsp_staple_status(b"\x30\x03junk") == "unparseable"


def test_mosquitto_staples_nothing_and_the_scan_says_so(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    factory = PKIFactory(NOW)
    root = factory.root("Rev Root")
    cert, key = _pointed(factory, root).write(tmp_path)
    broker = mosquitto_factory([Listener(tls=True, certfile=cert, keyfile=key)])
    seen = probe(ProbeTarget(host="127.0.0.1", port=broker.port))
    assert seen.error is None and seen.ocsp_response == b""
    report = judge(seen, trust_from_bundles(pki.parse_bundle(root.cert_pem(), "ca")), NOW,
                   pki.Policy())
    assert report.ocsp_stapled is False and report.ocsp_status is None
    assert report.revocation[0].crl_urls == (CRL_URL,)
    assert report.revocation[0].ocsp_urls == (OCSP_URL,)
    document = pki.as_json(report)
    assert isinstance(document, dict) and document["ocsp_stapled"] is False
    assert document["revocation"] == [{"crl_urls": [CRL_URL], "ocsp_urls": [OCSP_URL],
                                       "is_must_staple": False}]


@contextmanager
def stapling_server(leaf: Issued, staple: bytes) -> Iterator[int]:
    """One pyOpenSSL TLS server on loopback that staples `staple`; its port."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate(leaf.cert)  # type: ignore[arg-type]
    ctx.use_privatekey(leaf.key)  # type: ignore[arg-type]
    ctx.set_ocsp_server_callback(lambda _conn, _data: staple)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        conn = SSL.Connection(ctx, sock)
        conn.set_accept_state()
        try:
            conn.do_handshake()
            conn.shutdown()
        except (SSL.Error, OSError):
            pass
        finally:
            sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)


def test_a_stapled_response_is_seen_and_read() -> None:
    factory = PKIFactory(NOW)
    root = factory.root("Rev Root")
    leaf = _pointed(factory, root, must_staple=True)
    with stapling_server(leaf, _ocsp_response(leaf, root)) as port:
        seen = probe(ProbeTarget(host="127.0.0.1", port=port))
    assert seen.error is None, seen.error
    report = judge(seen, trust_from_bundles(pki.parse_bundle(root.cert_pem(), "ca")), NOW,
                   pki.Policy())
    assert (report.ocsp_stapled, report.ocsp_status) == (True, "good")
    assert report.revocation[0].is_must_staple
