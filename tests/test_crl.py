"""certmon.pki.crl: CRL files read without raising, their facts, and the rules judged at
an injected `now` (no clock read, no sleep)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from kit.pki import PKIFactory, write_crls

from certmon import pki
from certmon.pki.crl import crl_findings, parse_crls, read_crls, revoked_findings

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
POLICY = pki.Policy(warn_days=30, crit_days=7)


def test_several_pem_crls_and_their_facts(tmp_path: Path) -> None:
    factory = PKIFactory(NOW)
    root, other = factory.root("CRL Root"), factory.root("Other Root")
    client = factory.leaf(root, "gw-revoked")
    path = write_crls(tmp_path / "crl.pem", [
        factory.crl(root, this_update=NOW - timedelta(days=1), next_update=NOW + timedelta(days=29),
                    revoked=[client], number=42),
        factory.crl(other, this_update=NOW, next_update=NOW + timedelta(days=365))])
    read = read_crls(path, [pki.parse_bundle(root.cert_pem(), "ca").certs[0]])
    assert read.findings == ()
    first, second = read.crls
    assert first.issuer == "CN=CRL Root" and first.crl_number == 42
    assert first.this_update == NOW - timedelta(days=1)
    assert first.next_update == NOW + timedelta(days=29)
    assert first.revoked_count == 1 and first.revoked_serials == (client.cert.serial_number,)
    assert first.signed_by == "CRL Root" and first.signed_by_sha256 is not None
    assert second.next_update == NOW + timedelta(days=365) and not second.has_known_issuer
    # Other Root is no CA we were given: its signature cannot be checked.
    assert [f.code for f in crl_findings(second, NOW, POLICY)] == [
        pki.FindingCode.CRL_ISSUER_UNKNOWN]


def test_der_crl_is_read(tmp_path: Path) -> None:
    factory = PKIFactory(NOW)
    root = factory.root("CRL Root")
    crl = factory.crl(root, this_update=NOW, next_update=NOW + timedelta(days=10))
    read = parse_crls(crl.public_bytes(serialization.Encoding.DER) * 2, "crl.der")
    assert [c.next_update for c in read.crls] == [NOW + timedelta(days=10)] * 2


def test_expiry_rules_with_days_and_lifetime_fraction() -> None:
    factory = PKIFactory(NOW)
    root = factory.root("CRL Root")
    ca = pki.parse_bundle(root.cert_pem(), "ca").certs

    def judged(next_in: timedelta, lifetime: timedelta) -> list[pki.Finding]:
        crl = factory.crl(root, this_update=NOW + next_in - lifetime, next_update=NOW + next_in)
        return crl_findings(parse_crls(crl.public_bytes(serialization.Encoding.PEM), "c",
                                       ca).crls[0], NOW, POLICY)

    assert judged(timedelta(days=60), timedelta(days=90)) == []
    warn = judged(timedelta(days=20), timedelta(days=30))
    assert [(f.code, f.severity) for f in warn] == [
        (pki.FindingCode.CRL_EXPIRING, pki.Severity.WARNING)]
    assert "in 20.0 days, 67% of its lifetime left" in warn[0].message
    crit = judged(timedelta(days=2), timedelta(days=7))
    assert [(f.code, f.severity) for f in crit] == [
        (pki.FindingCode.CRL_EXPIRING, pki.Severity.CRITICAL)]
    assert "2026-06-03T12:00:00Z" in crit[0].message
    expired = judged(timedelta(days=-1), timedelta(days=7))
    assert [(f.code, f.severity) for f in expired] == [
        (pki.FindingCode.CRL_EXPIRED, pki.Severity.CRITICAL)]
    assert ("a broker using it refuses every client from 2026-05-31T12:00:00Z"
            in expired[0].message)
    # The fraction rule applies as for certificates: 10 of 1000 days left.
    strict = pki.Policy(warn_days=1, crit_days=0.5, warn_fraction=0.05)
    crl = factory.crl(root, this_update=NOW - timedelta(days=990),
                      next_update=NOW + timedelta(days=10))
    facts = parse_crls(crl.public_bytes(serialization.Encoding.PEM), "c", ca).crls[0]
    assert [f.severity for f in crl_findings(facts, NOW, strict)] == [pki.Severity.WARNING]
    future = factory.crl(root, this_update=NOW + timedelta(hours=3),
                         next_update=NOW + timedelta(days=30))
    facts = parse_crls(future.public_bytes(serialization.Encoding.PEM), "c", ca).crls[0]
    assert pki.FindingCode.CRL_NOT_YET_VALID in {f.code for f in crl_findings(facts, NOW, POLICY)}


def test_forged_signature_is_critical() -> None:
    factory = PKIFactory(NOW)
    root = factory.root("CRL Root")
    impostor = factory.root("CRL Root", name="impostor")  # same name, another key
    crl = factory.crl(root, this_update=NOW, next_update=NOW + timedelta(days=60),
                      signer=impostor.key)
    facts = parse_crls(crl.public_bytes(serialization.Encoding.PEM), "c",
                       pki.parse_bundle(root.cert_pem(), "ca").certs).crls[0]
    assert facts.has_known_issuer and facts.signed_by_sha256 is None
    found = crl_findings(facts, NOW, POLICY)
    assert [(f.code, f.severity) for f in found] == [
        (pki.FindingCode.CRL_SIGNATURE_INVALID, pki.Severity.CRITICAL)]


def test_not_a_crl_unreadable_and_empty_are_findings(tmp_path: Path) -> None:
    factory = PKIFactory(NOW)
    root = factory.root("CRL Root")
    cert_file = tmp_path / "ca.pem"
    cert_file.write_bytes(root.cert_pem())
    not_crl = read_crls(cert_file)
    assert [f.code for f in not_crl.findings] == [pki.FindingCode.CRL_UNPARSEABLE]
    assert "holds certificates, not a CRL" in not_crl.findings[0].message
    garbage = tmp_path / "garbage.der"
    garbage.write_bytes(b"\x30\x03abc")
    assert "CRL block #0 does not parse" in read_crls(garbage).findings[0].message
    (tmp_path / "empty.pem").write_bytes(b"")
    assert "empty file" in read_crls(tmp_path / "empty.pem").findings[0].message
    missing = read_crls(tmp_path / "nope.pem")
    assert [f.code for f in missing.findings] == [pki.FindingCode.FILE_UNREADABLE]
    assert "No such file" in missing.findings[0].message
    assert "Is a directory" in read_crls(tmp_path).findings[0].message


def test_revoked_certificate_is_found_by_issuer_and_serial() -> None:
    factory = PKIFactory(NOW)
    root = factory.root("CRL Root")
    revoked, kept = factory.leaf(root, "gw-bad"), factory.leaf(root, "gw-good")
    crl = factory.crl(root, this_update=NOW, next_update=NOW + timedelta(days=7),
                      revoked=[revoked])
    crls = parse_crls(crl.public_bytes(serialization.Encoding.PEM), "fleet.crl",
                      pki.parse_bundle(root.cert_pem(), "ca").certs).crls
    facts = [pki.parse_bundle(c.cert_pem(), c.name).certs[0].facts for c in (revoked, kept)]
    found = revoked_findings(facts, crls, holder="device gw-bad")
    assert [(f.code, f.cert_sha256) for f in found] == [
        (pki.FindingCode.CERT_REVOKED, facts[0].sha256)]
    assert found[0].message.startswith("device gw-bad certificate gw-bad (serial ")


def test_a_crl_is_matched_to_its_ca_by_key_identifier_and_only_a_verified_one_revokes(
    tmp_path: Path,
) -> None:
    factory = PKIFactory(NOW)
    old, new = factory.root("Rekeyed CA", name="old"), factory.root("Rekeyed CA", name="new")
    client = factory.leaf(old, "gw-aki")
    crl = (x509.CertificateRevocationListBuilder().issuer_name(old.cert.subject)
           .last_update(NOW).next_update(NOW + timedelta(days=60))
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
               old.key.public_key()), critical=False)
           .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                    .serial_number(client.cert.serial_number)
                                    .revocation_date(NOW).build())
           .sign(old.key, hashes.SHA256()))
    der = crl.public_bytes(serialization.Encoding.DER)
    ca_of = {c.name: pki.parse_bundle(c.cert_pem(), c.name).certs[0] for c in (old, new)}
    facts = [pki.parse_bundle(client.cert_pem(), "c").certs[0].facts]
    # Same name, another key identifier: not its CA at all (not "a bad signature").
    (alone,) = parse_crls(der, "r.crl", [ca_of["new"]]).crls
    assert not alone.has_known_issuer and not alone.is_verified
    assert [f.code for f in crl_findings(alone, NOW, POLICY)] == [
        pki.FindingCode.CRL_ISSUER_UNKNOWN]
    assert revoked_findings(facts, [alone]) == []  # unverifiable: revokes nothing
    (both,) = parse_crls(der, "r.crl", [ca_of["new"], ca_of["old"]]).crls
    assert both.signed_by_sha256 == ca_of["old"].facts.sha256
    assert [f.code for f in revoked_findings(facts, [both])] == [pki.FindingCode.CERT_REVOKED]
