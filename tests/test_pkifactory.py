"""The test PKI says exactly what it was asked to: dates, keys, chains, scenarios.

Every expiry test in the suite trusts these dates to the second, so they are pinned
here against a fixed `now`, not the wall clock.
"""

from __future__ import annotations

import itertools
import stat
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID
from kit.pki import Issued, KeyType, PKIFactory, write_bundle
from kit.scenarios import SCENARIOS, scenario

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture
def factory() -> PKIFactory:
    return PKIFactory(NOW)


def public_bytes(issued_or_key: object) -> bytes:
    key = issued_or_key.cert.public_key() if isinstance(issued_or_key, Issued) else issued_or_key
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def test_default_validity_is_backdated_one_hour(factory: PKIFactory) -> None:
    root = factory.root("Root")
    inter = factory.intermediate(root, "Inter")
    leaf = factory.leaf(inter, "leaf")
    for issued, days in ((root, 3650), (inter, 1825), (leaf, 365)):
        assert issued.cert.not_valid_before_utc == NOW - HOUR
        assert issued.cert.not_valid_after_utc == NOW - HOUR + timedelta(days=days)


def test_explicit_dates_are_kept_to_the_second(factory: PKIFactory) -> None:
    root = factory.root("Root")
    start = NOW - timedelta(days=10, microseconds=999)  # X.509 has no sub-seconds
    leaf = factory.leaf(root, "a", not_before=start, not_after=NOW + timedelta(days=20))
    assert leaf.cert.not_valid_before_utc == start.replace(microsecond=0)
    assert leaf.cert.not_valid_after_utc == NOW + timedelta(days=20)
    assert factory.leaf(root, "b", not_before=start, days=1.5).cert.not_valid_after_utc == (
        start.replace(microsecond=0) + timedelta(days=1.5)
    )


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        PKIFactory(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("name", "not_before", "not_after"),
    [
        ("expired", NOW - timedelta(days=30), NOW - timedelta(days=1)),
        ("not_yet_valid", NOW + timedelta(days=1), NOW + timedelta(days=31)),
        ("expiring_leaf_20d", NOW - HOUR, NOW + timedelta(days=20)),
        ("expiring_leaf_3d", NOW - HOUR, NOW + timedelta(days=3)),
    ],
)
def test_scenario_leaf_dates(
    factory: PKIFactory, name: str, not_before: datetime, not_after: datetime
) -> None:
    leaf = scenario(factory, name).leaf.cert
    assert (leaf.not_valid_before_utc, leaf.not_valid_after_utc) == (not_before, not_after)


def test_intermediate_scenarios(factory: PKIFactory) -> None:
    expiring = scenario(factory, "expiring_intermediate")
    assert expiring.intermediates[0].cert.not_valid_after_utc == NOW + timedelta(days=10)
    assert expiring.leaf.cert.not_valid_after_utc == NOW + timedelta(days=300)
    expired = scenario(factory, "expired_intermediate")
    inter = expired.intermediates[0].cert
    assert inter.not_valid_after_utc == NOW - timedelta(days=2)
    assert inter.not_valid_before_utc <= expired.leaf.cert.not_valid_before_utc


@pytest.mark.parametrize(
    ("key_type", "cls", "size"),
    [
        ("rsa2048", rsa.RSAPublicKey, 2048),
        ("rsa1024", rsa.RSAPublicKey, 1024),
        ("p256", ec.EllipticCurvePublicKey, 256),
        ("p384", ec.EllipticCurvePublicKey, 384),
        ("ed25519", ed25519.Ed25519PublicKey, None),
    ],
)
def test_key_types_for_issuer_and_leaf(
    factory: PKIFactory, key_type: KeyType, cls: type, size: int | None
) -> None:
    root = factory.root(f"{key_type} root", key_type=key_type)
    leaf = factory.leaf(root, f"{key_type} leaf", key_type=key_type)
    for issued in (root, leaf):
        key = issued.cert.public_key()
        assert isinstance(key, cls)
        assert getattr(key, "key_size", None) == size
        assert public_bytes(issued) == public_bytes(issued.key.public_key())
    leaf.cert.verify_directly_issued_by(root.cert)
    expected_hash = None if key_type == "ed25519" else "sha256"
    assert getattr(leaf.cert.signature_hash_algorithm, "name", None) == expected_hash


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "sha1_signed"])
def test_every_scenario_chain_verifies_link_by_link(factory: PKIFactory, name: str) -> None:
    chain = scenario(factory, name).leaf.chain()
    assert len(chain) == 3
    for child, parent in itertools.pairwise(chain):
        assert child.issuer is parent
        child.cert.verify_directly_issued_by(parent.cert)
    chain[-1].cert.verify_directly_issued_by(chain[-1].cert)  # the root signs itself


def test_ok_scenario_passes_cryptography_webpki_verifier(factory: PKIFactory) -> None:
    """SKI/AKI, BasicConstraints, KeyUsage and EKU are what a strict verifier wants."""
    sc = scenario(factory, "ok")
    verifier = (
        xv.PolicyBuilder()
        .store(xv.Store([sc.root.cert]))
        .time(NOW)
        .build_server_verifier(x509.DNSName("localhost"))
    )
    chain = verifier.verify(sc.leaf.cert, [sc.intermediates[0].cert])
    assert [c.subject for c in chain] == [i.cert.subject for i in sc.leaf.chain()]


def test_sha1_signed_is_a_real_sha1_signature(factory: PKIFactory) -> None:
    """cryptography refuses to sign or verify_directly_issued_by SHA-1; the raw
    signature must still verify, or the fixture would be testing garbage."""
    sc = scenario(factory, "sha1_signed")
    leaf, issuer = sc.leaf.cert, sc.intermediates[0].cert
    assert leaf.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA1
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA1)
    issuer_key = issuer.public_key()
    assert isinstance(issuer_key, rsa.RSAPublicKey)
    issuer_key.verify(leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA1())
    with pytest.raises(ValueError, match="Unsupported signature algorithm"):
        leaf.verify_directly_issued_by(issuer)


def test_sha1_with_ec_issuer(factory: PKIFactory) -> None:
    root = factory.root("EC SHA1 Root")
    leaf = factory.leaf(root, "ec-sha1", hash_alg="sha1").cert
    assert leaf.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA1
    root_key = root.cert.public_key()
    assert isinstance(root_key, ec.EllipticCurvePublicKey)
    root_key.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA1()))


def test_fake_root_same_subject_other_key(factory: PKIFactory) -> None:
    sc = scenario(factory, "fake_root")
    fake = sc.extra["fake_root"]
    assert isinstance(fake, Issued)
    assert fake.cert.subject == sc.root.cert.subject
    assert public_bytes(fake) != public_bytes(sc.root)
    sc.intermediates[0].cert.verify_directly_issued_by(sc.root.cert)
    with pytest.raises(InvalidSignature):
        sc.intermediates[0].cert.verify_directly_issued_by(fake.cert)


def test_wrong_key_is_not_the_leafs(factory: PKIFactory) -> None:
    sc = scenario(factory, "wrong_key")
    other = sc.extra["wrong_key"]
    assert public_bytes(other.public_key()) != public_bytes(sc.leaf)  # type: ignore[attr-defined]


def test_extensions_for_ca_and_leaf(factory: PKIFactory) -> None:
    root = factory.root("Ext Root")
    inter = factory.intermediate(root, "Ext Inter", path_length=1)
    leaf = factory.leaf(
        inter, "dev-1", usage="both", sans=("localhost", "127.0.0.1", "::1"),
        uri_sans=("urn:certmon:device:dev-1",),
    )  # fmt: skip
    bc = inter.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    assert inter.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    leaf_bc = leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert leaf_bc.critical and not leaf_bc.value.ca
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1"), ip_address("::1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:certmon:device:dev-1"]
    eku = leaf.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = leaf.cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = inter.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    no_eku = factory.leaf(inter, "no-eku", usage=None)
    with pytest.raises(x509.ExtensionNotFound):
        no_eku.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_self_signed_leaf(factory: PKIFactory) -> None:
    leaf = factory.self_signed_leaf("broker.local", sans=("broker.local",))
    assert leaf.issuer is None and leaf.chain() == [leaf]
    assert leaf.cert.issuer == leaf.cert.subject
    assert not leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf.cert.verify_directly_issued_by(leaf.cert)


def test_keys_are_cached_by_name_and_rsa_pooled_across_factories(factory: PKIFactory) -> None:
    root = factory.root("Cache Root")
    assert factory.leaf(root, "same").key is factory.leaf(root, "same").key
    assert factory.leaf(root, "same").key is not factory.leaf(root, "other").key
    rsa_key = factory.key("rsa2048", "pooled")
    assert PKIFactory(NOW).key("rsa2048", "pooled") is rsa_key


def test_write_files_chain_and_key_mode(factory: PKIFactory, tmp_path: Path) -> None:
    sc = scenario(factory, "ok")
    cert_path, key_path = sc.leaf.write(tmp_path, chain=True, key_mode=0o640)
    assert (cert_path.name, key_path.name) == ("ok-leaf.crt", "ok-leaf.key")
    written = x509.load_pem_x509_certificates(cert_path.read_bytes())
    assert written == [sc.leaf.cert, sc.intermediates[0].cert]  # root never included
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o640
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    bundle = write_bundle(tmp_path / "bundle.pem", [sc.root, sc.intermediates[0].cert])
    loaded = x509.load_pem_x509_certificates(bundle.read_bytes())
    assert loaded == [sc.root.cert, sc.intermediates[0].cert]


def test_unknown_scenario_names_the_known_ones(factory: PKIFactory) -> None:
    with pytest.raises(KeyError, match="expiring_leaf_3d"):
        scenario(factory, "nope")
