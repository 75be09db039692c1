"""certmon.pki on real-world inputs nobody here wrote: Mosquitto's own test PKI
(including its 2020 generation whose signing CA really expired), pyca/cryptography's
odd X.509 vectors, and the system CA bundle cross-checked against the openssl CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from certmon import pki
from certmon.chain import verify_chain
from certmon.pki import FindingCode as C
from certmon.pki import Severity as S

EXT = Path(__file__).resolve().parents[2] / "shared" / "ext"
MOSQ = EXT / "mosquitto-test-ssl"
LEGACY = MOSQ / "legacy-2020"
VECTORS = EXT / "pyca-cryptography-vectors-x509"
# The inventories were written on 2026-11-26; judging at that instant keeps the
# expectations stable whatever day the suite runs.
INVENTORY_DAY = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
POLICY = pki.Policy()


def require(path: Path) -> Path:
    if not path.exists():
        message = f"third-party test material missing: {path}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def one(path: Path) -> pki.LoadedCert:
    bundle = pki.read_bundle(path)
    assert len(bundle.certs) == 1, bundle.findings
    return bundle.certs[0]


def test_every_mosquitto_certificate_file_parses_despite_text_dumps() -> None:
    files = sorted(require(MOSQ).glob("*.crt")) + sorted(LEGACY.glob("*.crt"))
    assert len(files) >= 20
    for path in files:
        bundle = pki.read_bundle(path)
        assert bundle.findings == (), path
        assert len(bundle.certs) == (2 if path.name == "all-ca.crt" else 1), path
    order = [c.facts.common_name for c in pki.read_bundle(MOSQ / "all-ca.crt").certs]
    assert order == ["Signing CA", "Root CA"]


def test_non_certificate_files_are_findings_not_tracebacks() -> None:
    for name in ("dhparam", "crl.pem", "client.key", "readme.txt"):
        bundle = pki.read_bundle(require(MOSQ) / name)
        assert bundle.certs == () and [f.code for f in bundle.findings] == [C.NO_CERTIFICATE]


def test_mosquitto_chains_resolve_as_the_inventory_says() -> None:
    root, signing = one(require(MOSQ) / "test-root-ca.crt"), one(MOSQ / "test-signing-ca.crt")
    for leaf in ("client.crt", "server.crt", "server-san.crt", "client-revoked.crt"):
        result = verify_chain(one(MOSQ / leaf).cert, [signing.cert], [root.cert],
                                  INVENTORY_DAY)
        assert result.is_valid, (leaf, result.error)
        assert [p.common_name for p in result.path][1:] == ["Signing CA", "Root CA"]
    expired = verify_chain(one(MOSQ / "client-expired.crt").cert, [signing.cert],
                               [root.cert], INVENTORY_DAY)
    assert not expired.is_valid and "expired" in (expired.error or "")
    assert expired.failing_cert_sha256 == one(MOSQ / "client-expired.crt").facts.sha256


def test_mosquitto_fake_root_does_not_validate_the_leaves() -> None:
    fake, signing = one(require(MOSQ) / "test-fake-root-ca.crt"), one(MOSQ / "test-signing-ca.crt")
    assert fake.facts.subject == one(MOSQ / "test-root-ca.crt").facts.subject
    for leaf in ("client.crt", "server.crt"):
        result = verify_chain(one(MOSQ / leaf).cert, [signing.cert], [fake.cert],
                                  INVENTORY_DAY)
        assert not result.is_valid
        assert result.failing_cert_sha256 == signing.facts.sha256


def test_legacy_2020_expired_signing_ca_is_critical_while_root_is_fine() -> None:
    bundle = pki.read_bundle(require(LEGACY) / "all-ca.crt")
    found = pki.trust_store_findings(bundle, INVENTORY_DAY, POLICY)
    signing, root = bundle.certs
    assert [(f.code, f.severity, f.cert_sha256) for f in found] == [
        (C.CA_EXPIRED, S.CRITICAL, signing.facts.sha256)]
    assert signing.facts.sha256.startswith("c431559a072ac5b3")
    assert root.facts.sha256.startswith("e3b6505cb8b1ac4a")
    leaf = one(LEGACY / "client.crt")
    result = verify_chain(leaf.cert, [signing.cert], [root.cert], INVENTORY_DAY)
    assert not result.is_valid and result.failing_cert_sha256 == signing.facts.sha256
    # Before 2025-02-23 the same chain was fine: the verdict is a function of `now`.
    assert verify_chain(leaf.cert, [signing.cert], [root.cert],
                            datetime(2024, 6, 1, tzinfo=UTC)).is_valid


def test_pyca_vectors_yield_facts_or_a_clear_finding() -> None:
    files = [p for p in sorted(require(VECTORS).rglob("*")) if p.is_file()
             and p.suffix in {".pem", ".der", ".crt"}]
    assert len(files) > 30
    with_certs = 0
    for path in files:
        bundle = pki.read_bundle(path)
        assert bundle.certs or bundle.findings, path
        for f in bundle.findings:
            assert str(path) in f.message
        for cert in bundle.certs:
            facts = cert.facts
            # every rule runs without raising on every odd certificate
            pki.expiry_findings(facts, INVENTORY_DAY, POLICY, "ca")
            pki.strength_findings(facts, POLICY)
            assert facts.not_before.tzinfo is not None
        with_certs += bool(bundle.certs)
    assert with_certs > 20
    old = pki.read_bundle(VECTORS / "cryptography.io.old_header.pem")
    assert [c.facts.common_name for c in old.certs] == ["www.cryptography.io"]
    garbage = pki.read_bundle(VECTORS / "cryptography.io.chain_with_garbage.pem")
    assert len(garbage.certs) == 2 and garbage.findings == ()
    bad_time = pki.read_bundle(VECTORS / "badasn1time.pem")
    assert [f.code for f in bad_time.findings] == [C.UNPARSEABLE_BLOCK]


SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.mark.skipif(not SYSTEM_BUNDLE.exists(), reason="no system CA bundle on this machine")
def test_system_bundle_matches_the_openssl_cli() -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI"):
            pytest.fail("openssl CLI missing: .ci/run should install it")
        pytest.skip("openssl CLI missing")
    bundle = pki.read_bundle(SYSTEM_BUNDLE)
    assert bundle.findings == () and len(bundle.certs) > 50
    # One openssl call over the whole bundle: crl2pkcs7 + pkcs7 -print_certs would lose
    # nothing, but `openssl storeutl -text` is heavy; x509 per block via stdin is exact.
    text = SYSTEM_BUNDLE.read_text()
    blocks = [b + "-----END CERTIFICATE-----\n" for b in text.split("-----END CERTIFICATE-----")
              if "-----BEGIN CERTIFICATE-----" in b]
    assert len(blocks) == len(bundle.certs)
    for block, cert in zip(blocks, bundle.certs, strict=True):
        out = subprocess.run(
            [openssl, "x509", "-noout", "-enddate", "-fingerprint", "-sha256", "-serial"],
            input=block, capture_output=True, text=True, check=True).stdout
        fields = dict(line.split("=", 1) for line in out.splitlines())
        not_after = datetime.strptime(fields["notAfter"], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)
        assert cert.facts.not_after == not_after
        fp_key = next(k for k in fields if "Fingerprint" in k)
        assert cert.facts.sha256 == fields[fp_key].replace(":", "").lower()
        assert cert.facts.serial_hex == fields["serial"]
