"""certmon.pki on generated PKIs: every finding, with `now` injected."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from kit.pki import PKIFactory, write_bundle
from kit.scenarios import scenario

from certmon import pki
from certmon.chain import chain_findings, earliest_expiry, verify_chain
from certmon.pki import FindingCode as C
from certmon.pki import Severity as S

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
POLICY = pki.Policy(warn_days=30, crit_days=7)


@pytest.fixture(scope="module")
def factory() -> PKIFactory:
    return PKIFactory(NOW)


def codes(findings: list[pki.Finding]) -> dict[str, str]:
    return {f.code.value: f.severity.name for f in findings}


def facts(issued: object) -> pki.CertFacts:
    return pki.facts_from_cert(issued.cert)  # type: ignore[attr-defined]


def chain(sc: object, at: datetime = NOW, anchors: list[object] | None = None) -> pki.ChainResult:
    return verify_chain(
        sc.leaf.cert,  # type: ignore[attr-defined]
        [i.cert for i in sc.intermediates],  # type: ignore[attr-defined]
        [a.cert for a in (anchors or sc.trust)],  # type: ignore[attr-defined]
        at,
        purpose="client",
    )


# --- facts ------------------------------------------------------------------------


def test_facts_describe_the_certificate(factory: PKIFactory) -> None:
    root = factory.root("Facts Root")
    leaf = factory.leaf(root, "gw-0001", sans=["gw.example", "127.0.0.1"], days=90,
                        uri_sans=["urn:certmon:device:gw-0001"])
    f = facts(leaf)
    assert f.common_name == "gw-0001"
    assert f.subject == "CN=gw-0001"
    assert f.issuer == "CN=Facts Root"
    assert f.not_before == NOW - timedelta(hours=1)
    assert f.not_after == f.not_before + timedelta(days=90)
    assert f.not_after.tzinfo is not None
    assert (f.key_type, f.key_bits) == ("EC", 256)
    assert f.signature_algorithm == "ecdsa-with-SHA256" and f.signature_hash == "sha256"
    assert not f.is_ca and root_facts_is_ca(root)
    assert f.aki == facts(root).ski is not None
    assert "DNS:gw.example" in f.sans and "IP:127.0.0.1" in f.sans
    assert pki.identity_of(f) == "gw-0001"
    assert len(f.sha256) == 64
    assert f.days_left(NOW) == pytest.approx(90 - 1 / 24)


def root_facts_is_ca(root: object) -> bool:
    return facts(root).is_ca and facts(root).is_self_issued


@pytest.mark.parametrize("key_type,expected", [
    ("rsa2048", ("RSA", 2048)), ("rsa1024", ("RSA", 1024)), ("p256", ("EC", 256)),
    ("ed25519", ("Ed25519", 256)),
])
def test_key_type_and_size(factory: PKIFactory, key_type: str, expected: tuple[str, int]) -> None:
    root = factory.root("Key Root")
    leaf = factory.leaf(root, f"k-{key_type}", key_type=key_type)  # type: ignore[arg-type]
    assert (facts(leaf).key_type, facts(leaf).key_bits) == expected


def test_serial_keeps_leading_zero_octet() -> None:
    # openssl prints serial 0x0A1B as "0A1B"; an int round trip would print "A1B".
    der_serial = b"\x0a\x1b"
    assert pki._serial_hex(_cert_der_with_serial(der_serial)) == "0A1B"


def _cert_der_with_serial(serial: bytes) -> bytes:
    # Certificate SEQ { tbs SEQ { [0] version, INTEGER serial, ... } } — enough for the reader.
    version = b"\xa0\x03\x02\x01\x02"
    integer = b"\x02" + bytes([len(serial)]) + serial
    tbs = b"\x30" + bytes([len(version + integer)]) + version + integer
    return b"\x30" + bytes([len(tbs)]) + tbs


# --- loading ----------------------------------------------------------------------


def test_bundle_with_text_keys_junk_der_and_old_headers(factory: PKIFactory, tmp_path: Path) -> None:
    root = factory.root("Load Root")
    a, b = factory.leaf(root, "a"), factory.leaf(root, "b")
    old_header = a.cert_pem().replace(b"CERTIFICATE", b"X509 CERTIFICATE")
    data = (b"Certificate:\n    Data: human readable dump\n" + root.cert_pem()
            + b"junk between blocks\n" + a.key_pem() + old_header
            + b"-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n"
            + b.cert_pem())
    bundle = pki.parse_bundle(data, "mixed.pem")
    assert [c.facts.common_name for c in bundle.certs] == ["Load Root", "a", "b"]
    assert [(f.code, f.message) for f in bundle.findings] == [
        (C.UNPARSEABLE_BLOCK, "mixed.pem: certificate block #2 (CERTIFICATE) does not parse")]
    der = a.cert.public_bytes(serialization.Encoding.DER) + b.cert.public_bytes(
        serialization.Encoding.DER)
    assert [c.facts.common_name for c in pki.parse_bundle(der, "two.der").certs] == ["a", "b"]


def test_missing_empty_and_non_certificate_files_are_findings(tmp_path: Path) -> None:
    missing = pki.read_bundle(tmp_path / "nope.pem")
    assert [(f.code, f.severity) for f in missing.findings] == [(C.FILE_UNREADABLE, S.CRITICAL)]
    assert "nope.pem: cannot read: No such file or directory" in missing.findings[0].message
    (tmp_path / "empty.pem").write_bytes(b"")
    assert [f.code for f in pki.read_bundle(tmp_path / "empty.pem").findings] == [C.NO_CERTIFICATE]
    (tmp_path / "garbage.der").write_bytes(b"\x30\x82\xff\xff garbage")
    assert [f.code for f in pki.read_bundle(tmp_path / "garbage.der").findings] == [
        C.UNPARSEABLE_BLOCK]


# --- expiry -------------------------------------------------------------------------


@pytest.mark.parametrize("days_left,expected", [
    (200, None), (30.5, None), (29, "WARNING"), (8, "WARNING"), (7, "CRITICAL"), (0.5, "CRITICAL"),
])
def test_expiry_thresholds_in_days(factory: PKIFactory, days_left: float, expected: str | None) -> None:
    root = factory.root("Exp Root")
    leaf = factory.leaf(root, "exp", not_before=NOW - timedelta(days=300),
                        not_after=NOW + timedelta(days=days_left))
    found = codes(pki.expiry_findings(facts(leaf), NOW, POLICY, "client"))
    assert found == ({} if expected is None else {"CERT_EXPIRING": expected})


def test_expiry_threshold_as_fraction_of_lifetime(factory: PKIFactory) -> None:
    # A 10-day certificate with 3 days left is past 70 % of its life: by days alone it
    # would only warn at the 7-day mark; the fraction rule warns now.
    root = factory.root("Frac Root")
    leaf = factory.leaf(root, "short", not_before=NOW - timedelta(days=7), days=10)
    policy = pki.Policy(warn_days=2, crit_days=1, warn_fraction=0.33, crit_fraction=0.1)
    assert codes(pki.expiry_findings(facts(leaf), NOW, policy, "client")) == {
        "CERT_EXPIRING": "WARNING"}
    late = pki.expiry_findings(facts(leaf), NOW + timedelta(days=2.5), policy, "client")
    assert codes(late) == {"CERT_EXPIRING": "CRITICAL"}


def test_expired_and_not_yet_valid(factory: PKIFactory) -> None:
    expired = scenario(factory, "expired")
    assert codes(pki.expiry_findings(facts(expired.leaf), NOW, POLICY, "client")) == {
        "CERT_EXPIRED": "CRITICAL"}
    future = scenario(factory, "not_yet_valid")
    found = pki.expiry_findings(facts(future.leaf), NOW, POLICY, "client")
    assert codes(found) == {"CERT_NOT_YET_VALID": "CRITICAL"}
    assert "not valid before" in found[0].message


def test_roles_choose_the_code(factory: PKIFactory) -> None:
    root = factory.root("Role Root")
    leaf = factory.leaf(root, "role", not_after=NOW + timedelta(days=3))
    f = facts(leaf)
    assert set(codes(pki.expiry_findings(f, NOW, POLICY, "broker"))) == {"BROKER_CERT_EXPIRING"}
    assert set(codes(pki.expiry_findings(f, NOW, POLICY, "intermediate"))) == {
        "INTERMEDIATE_EXPIRING"}
    assert set(codes(pki.expiry_findings(f, NOW, POLICY, "ca"))) == {"CA_EXPIRING"}


# --- chains -----------------------------------------------------------------------


def test_valid_chain_now_and_at_warn_window(factory: PKIFactory) -> None:
    ok = scenario(factory, "ok")
    result = chain(ok)
    assert result.is_valid and result.method == "cryptography"
    assert [p.common_name for p in result.path] == ["ok.test", "ok Intermediate CA", "ok Root CA"]
    later = chain(ok, NOW + POLICY.warn_window)
    assert chain_findings(facts(ok.leaf), result, later, NOW, POLICY) == []


def test_intermediate_expiring_before_leaf_is_the_classic_outage(factory: PKIFactory) -> None:
    sc = scenario(factory, "expiring_intermediate")  # intermediate 10 days, leaf 300 days
    now_result, later = chain(sc), chain(sc, NOW + POLICY.warn_window)
    assert now_result.is_valid and not later.is_valid
    found = chain_findings(facts(sc.leaf), now_result, later, NOW, POLICY)
    assert codes(found) == {"INTERMEDIATE_EXPIRES_BEFORE_LEAF": "WARNING",
                            "INTERMEDIATE_EXPIRING": "WARNING"}
    inter_fp = facts(sc.intermediates[0]).sha256
    assert all(f.cert_sha256 == inter_fp for f in found)
    assert earliest_expiry(now_result.path).common_name == "expiring_intermediate Intermediate CA"  # type: ignore[union-attr]


def test_expired_intermediate_invalidates_chain_and_names_it(factory: PKIFactory) -> None:
    sc = scenario(factory, "expired_intermediate")
    result = chain(sc)
    assert not result.is_valid
    assert result.failing_cert_sha256 == facts(sc.intermediates[0]).sha256
    assert "expired" in (result.error or "")
    found = chain_findings(facts(sc.leaf), result, result, NOW, POLICY)
    assert codes(found) == {"CHAIN_INVALID": "CRITICAL"}
    assert found[0].cert_sha256 == facts(sc.intermediates[0]).sha256


def test_fake_root_with_same_subject_does_not_validate(factory: PKIFactory) -> None:
    sc = scenario(factory, "fake_root")
    fake = sc.extra["fake_root"]
    assert facts(fake).subject == facts(sc.root).subject
    result = chain(sc, anchors=[fake])
    assert not result.is_valid
    assert "signature" in result.extra["cryptography"]


def test_chain_valid_now_but_not_at_warn_window(factory: PKIFactory) -> None:
    root = factory.root("Soon Root", name="soon-root", not_after=NOW + timedelta(days=20))
    leaf = factory.leaf(root, "soon", not_after=NOW + timedelta(days=15))
    now_r = verify_chain(leaf.cert, [], [root.cert], NOW)
    later = verify_chain(leaf.cert, [], [root.cert], NOW + POLICY.warn_window)
    assert now_r.is_valid and not later.is_valid
    # The leaf expires first: that is the leaf's expiry finding, not a chain finding.
    assert chain_findings(facts(leaf), now_r, later, NOW, POLICY) == []


def test_weak_chains_fall_back_to_openssl_and_say_so(factory: PKIFactory) -> None:
    # cryptography refuses SHA-1 signatures and RSA-1024 issuers by design; the facts
    # still matter, so OpenSSL's store gives the verdict and the result says so.
    result = chain(scenario(factory, "sha1_signed"))
    assert result.is_valid and result.method == "pyopenssl"
    assert len(result.path) == 3
    weak_root = factory.root("Weak Root", key_type="rsa1024")
    leaf = factory.leaf(weak_root, "under-weak-root")
    result = verify_chain(leaf.cert, [], [weak_root.cert], NOW)
    assert result.is_valid and result.method == "pyopenssl"
    # A 1024-bit leaf key under a strong CA signs nothing in the chain: cryptography
    # validates it, and WEAK_KEY reports the key.
    assert chain(scenario(factory, "rsa1024")).method == "cryptography"


def test_ed25519_chain_uses_the_openssl_path(factory: PKIFactory) -> None:
    root = factory.root("Ed Root", key_type="ed25519")
    leaf = factory.leaf(root, "ed-leaf", key_type="ed25519")
    result = verify_chain(leaf.cert, [], [root.cert], NOW)
    assert result.is_valid and result.method == "pyopenssl"


def test_server_only_eku_is_not_a_client_certificate(factory: PKIFactory) -> None:
    root = factory.root("EKU Root")
    server = factory.leaf(root, "srv", usage="server")
    assert not verify_chain(server.cert, [], [root.cert], NOW, purpose="client").is_valid
    assert verify_chain(server.cert, [], [root.cert], NOW, purpose="server").is_valid
    no_eku = factory.leaf(root, "plain", usage=None)
    assert verify_chain(no_eku.cert, [], [root.cert], NOW, purpose="client").is_valid


def test_empty_trust_store() -> None:
    result = verify_chain(None, [], [], NOW)  # type: ignore[arg-type]
    assert not result.is_valid and result.error == "trust store is empty"


# --- strength, keys, trust store ----------------------------------------------------


def test_weak_key_and_weak_signature(factory: PKIFactory) -> None:
    assert codes(pki.strength_findings(facts(scenario(factory, "rsa1024").leaf), POLICY)) == {
        "WEAK_KEY": "CRITICAL"}
    assert codes(pki.strength_findings(facts(scenario(factory, "sha1_signed").leaf), POLICY)) == {
        "WEAK_SIGNATURE": "CRITICAL"}
    # A root's self-signature is never checked by anyone: SHA-1 there is not a finding.
    sha1_root = factory.root("SHA1 Root", key_type="rsa2048", hash_alg="sha1")
    assert pki.strength_findings(facts(sha1_root), POLICY) == []


def test_key_mismatch_and_permissions(factory: PKIFactory, tmp_path: Path) -> None:
    sc = scenario(factory, "wrong_key")
    _, key_path = sc.leaf.write(tmp_path)
    key_facts, problems, key = pki.read_private_key(key_path)
    assert problems == [] and key is not None and key_facts is not None
    spki = pki.cert_spki_sha256(sc.leaf.cert)
    assert pki.key_findings(key_facts, facts(sc.leaf), spki) == []

    other = tmp_path / "other.key"
    other.write_bytes(sc.extra["wrong_key"].private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(other, 0o644)
    other_facts, _, _ = pki.read_private_key(other)
    assert other_facts is not None and other_facts.mode == 0o644
    assert codes(pki.key_findings(other_facts, facts(sc.leaf), spki)) == {
        "KEY_MISMATCH": "CRITICAL", "KEY_PERMISSIONS": "CRITICAL"}
    os.chmod(other, 0o640)
    group_facts, _, _ = pki.read_private_key(other)
    assert codes(pki.key_findings(group_facts, None, None)) == {  # type: ignore[arg-type]
        "KEY_PERMISSIONS": "WARNING"}


def test_unreadable_and_encrypted_keys(tmp_path: Path, factory: PKIFactory) -> None:
    _, problems, key = pki.read_private_key(tmp_path / "missing.key")
    assert key is None and [f.code for f in problems] == [C.KEY_UNREADABLE]
    leaf = factory.leaf(factory.root("Enc Root"), "enc")
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(leaf.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    _, problems, _ = pki.read_private_key(encrypted)
    assert "encrypted and no passphrase" in problems[0].message
    assert "secret" not in problems[0].message


def test_trust_store_duplicates_expired_and_expiring_cas(factory: PKIFactory, tmp_path: Path) -> None:
    good = factory.root("Good Root")
    old = factory.root("Old Root", not_before=NOW - timedelta(days=900),
                       not_after=NOW - timedelta(days=5))
    soon = factory.root("Soon CA", not_after=NOW + timedelta(days=60))
    path = write_bundle(tmp_path / "bundle.pem", [good, old, soon, good])
    found = pki.trust_store_findings(pki.read_bundle(path), NOW, POLICY)
    assert codes(found) == {"CA_EXPIRED": "CRITICAL", "CA_EXPIRING": "WARNING",
                            "DUPLICATE_CERT": "WARNING"}
    dup = next(f for f in found if f.code == C.DUPLICATE_CERT)
    assert dup.message.endswith("certificate #3 (Good Root) duplicates #0")
    assert pki.worst_severity(found) == S.CRITICAL
