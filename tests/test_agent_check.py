"""`certmon-agent check`: the one-shot replacement for `openssl x509 -noout -dates`,
run as a user would run it (a real subprocess), with Nagios exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from kit.pki import PKIFactory, write_bundle

from agent.certstore import read_material
from agent.report import check_device, judged_by_use
from agent.status import observe_broker
from certmon import pki

NOW = datetime.now(UTC)
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def check(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "check", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("check")
    factory = PKIFactory(NOW)
    root = factory.root("Check Root")
    inter = factory.intermediate(root, "Check Devices")
    healthy = factory.leaf(inter, "gw-ok", days=365)
    expiring = factory.leaf(inter, "gw-soon", days=20)
    out: dict[str, Path] = {"bundle": write_bundle(tmp / "ca.pem", [root, inter])}
    out["ok_cert"], out["ok_key"] = healthy.write(tmp, chain=True)
    out["soon_cert"], out["soon_key"] = expiring.write(tmp, chain=True)
    return out


def test_healthy_device_is_ok_with_a_table_sorted_by_expiry(fleet: dict[str, Path]) -> None:
    done = check("--ca-bundle", fleet["bundle"], "--cert", fleet["ok_cert"], "--key", fleet["ok_key"])
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(str(fleet["bundle"])) and "(2 certificates)" in lines[0]
    assert "client chain (cryptography): valid" in done.stdout
    assert "path: gw-ok -> Check Devices -> Check Root" in done.stdout
    assert lines[-1] == "OK: 0 finding(s)"


def test_expiring_certificate_warns_and_thresholds_are_flags(fleet: dict[str, Path]) -> None:
    args = ("--ca-bundle", fleet["bundle"], "--cert", fleet["soon_cert"], "--key", fleet["soon_key"])
    assert check(*args).returncode == 1
    assert check(*args, "--warn-days", "10", "--crit-days", "5").returncode == 0
    assert check(*args, "--crit-days", "25").returncode == 2


def test_json_output_carries_facts_and_findings(fleet: dict[str, Path]) -> None:
    done = check("--ca-bundle", fleet["bundle"], "--cert", fleet["soon_cert"],
                 "--key", fleet["soon_key"], "--json")
    data = json.loads(done.stdout)
    assert data["status"] == "WARNING"
    assert data["client"]["common_name"] == "gw-soon"
    assert data["client"]["not_after"].endswith("Z")
    assert [f["code"] for f in data["findings"]] == ["CERT_EXPIRING"]
    assert data["findings"][0]["severity"] == "WARNING"
    assert data["chain_now"]["is_valid"] is True
    assert len(data["trust_store"]) == 2


def test_unreadable_input_is_unknown_not_a_traceback(tmp_path: Path, fleet: dict[str, Path]) -> None:
    done = check("--ca-bundle", tmp_path / "missing.pem")
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    assert "missing.pem: cannot read: No such file or directory" in done.stdout
    done = check("--ca-bundle", fleet["bundle"], "--cert", fleet["ok_cert"], "--key", tmp_path / "nokey")
    assert done.returncode == 3 and "cannot read private key" in done.stdout


def test_mismatched_key_is_critical(fleet: dict[str, Path]) -> None:
    done = check("--ca-bundle", fleet["bundle"], "--cert", fleet["ok_cert"], "--key", fleet["soon_key"])
    assert done.returncode == 2 and "KEY_MISMATCH" in done.stdout


# --- trust-store CAs by use (docs/check.md) -------------------------------------------


@pytest.fixture(scope="module")
def expired(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An expired root that signs a device's (still valid) intermediate and leaf, and a
    healthy device whose bundle also carries that expired root, unused."""
    tmp = tmp_path_factory.mktemp("expired")
    factory = PKIFactory(NOW)
    old = factory.root("Old Root", not_before=NOW - timedelta(days=800),
                       not_after=NOW - timedelta(days=1))
    old_inter = factory.intermediate(old, "Old Devices", not_before=NOW - timedelta(days=700),
                                     not_after=NOW + timedelta(days=300))
    root = factory.root("Fresh Root")
    inter = factory.intermediate(root, "Fresh Devices")
    out = {"old_root": write_bundle(tmp / "old-root.pem", [old]),
           "through_old": write_bundle(tmp / "through-old.pem", [old, old_inter]),
           "beside_old": write_bundle(tmp / "beside-old.pem", [root, inter, old]),
           "fresh_root": write_bundle(tmp / "fresh-root.pem", [root])}
    out["old_cert"], out["old_key"] = factory.leaf(
        old_inter, "gw-old", not_before=NOW - timedelta(days=10), days=100).write(tmp, chain=True)
    out["ok_cert"], out["ok_key"] = factory.leaf(inter, "gw-fresh").write(tmp, chain=True)
    return out


def findings_of(done: subprocess.CompletedProcess[str]) -> list[tuple[str, str, str]]:
    return [(f["code"], f["severity"], f["subject"] or "") for f in json.loads(done.stdout)["findings"]]


def test_an_expired_ca_signing_the_devices_own_chain_is_critical(expired: dict[str, Path]) -> None:
    done = check("--ca-bundle", expired["through_old"], "--cert", expired["old_cert"],
                 "--key", expired["old_key"], "--json")
    assert done.returncode == 2, done.stdout + done.stderr
    assert ("CA_EXPIRED", "CRITICAL", "CN=Old Root") in findings_of(done)
    assert json.loads(done.stdout)["chain_now"]["is_valid"] is False  # and the path is empty


def test_an_expired_ca_nothing_chains_through_is_information(expired: dict[str, Path]) -> None:
    args = ("--ca-bundle", expired["beside_old"], "--cert", expired["ok_cert"],
            "--key", expired["ok_key"])
    done = check(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-2] == (
        "OK: 0 finding(s); 1 stale CA(s), for information only (--count-stale-cas counts them)")
    assert done.stdout.splitlines()[-1].startswith(
        "  INFO     STALE_CA                         stale CA in the bundle: trusted CA Old Root "
        "expired ")
    assert "  ca      EC-256      CN=Old Root" in done.stdout  # the table still lists it
    assert findings_of(check(*args, "--json")) == [("STALE_CA", "OK", "CN=Old Root")]
    counted = check(*args, "--count-stale-cas", "--json")
    assert counted.returncode == 2 and findings_of(counted) == [("CA_EXPIRED", "CRITICAL", "CN=Old Root")]
    assert check("--ca-bundle", expired["old_root"]).returncode == 0  # a bundle alone: a lint


def test_a_required_ca_counts_and_its_absence_warns(expired: dict[str, Path], tmp_path: Path) -> None:
    base = ("--ca-bundle", expired["beside_old"], "--cert", expired["ok_cert"],
            "--key", expired["ok_key"], "--json")
    required = check(*base, "--require-ca", expired["old_root"])
    assert required.returncode == 2 and findings_of(required) == [("CA_EXPIRED", "CRITICAL", "CN=Old Root")]
    lacking = check("--ca-bundle", expired["fresh_root"], "--require-ca", expired["old_root"], "--json")
    assert lacking.returncode == 1
    assert findings_of(lacking) == [("TRUST_STORE_MISSING_CA", "WARNING", "CN=Old Root")]
    assert check(*base, "--require-ca", tmp_path / "missing.pem").returncode == 3


@pytest.mark.skipif(not SYSTEM_BUNDLE.exists(), reason="no system CA bundle on this machine")
def test_the_stock_system_bundle_is_ok_with_its_stale_cas_listed() -> None:
    """The README's first command on a healthy Debian 12 machine: exit 0, and every CA
    the bundle rule would flag (Debian 12: Baltimore, E-Tugra, Entrust, Hongkong Post,
    SECOM RootCA1, all expired) listed as STALE_CA information."""
    flagged = {f.cert_sha256 for f in pki.trust_store_findings(pki.read_bundle(SYSTEM_BUNDLE),
                                                                 datetime.now(UTC), pki.Policy())
               if f.code in {pki.FindingCode.CA_EXPIRED, pki.FindingCode.CA_EXPIRING}}
    done = check("--ca-bundle", SYSTEM_BUNDLE, "--json")
    assert done.returncode == 0, done.stdout[-2000:]
    findings = json.loads(done.stdout)["findings"]
    assert {f["cert_sha256"] for f in findings if f["code"] == "STALE_CA"} == flagged
    assert all(f["severity"] == "OK" for f in findings)
    assert check("--ca-bundle", SYSTEM_BUNDLE, "--count-stale-cas").returncode == (2 if flagged else 0)


def test_check_and_the_status_judge_trust_store_cas_alike(expired: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """`show` prints the status `run` would publish: the same material gives the same
    trust-store verdict as `check` (one function, agent.report.judged_by_use)."""
    def status_codes(bundle: Path, cert: Path, key: Path) -> set[str]:
        done = subprocess.run([sys.executable, "-m", "agent.cli", "show", "--broker",
                               "mqtts://broker.invalid:8883", "--ca-bundle", str(bundle),
                               "--cert", str(cert), "--key", str(key),
                               "--state-dir", str(tmp_path / "state")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return {f["code"] for f in json.loads(done.stdout)["findings"]}

    assert "CA_EXPIRED" in status_codes(expired["through_old"], expired["old_cert"], expired["old_key"])
    beside = status_codes(expired["beside_old"], expired["ok_cert"], expired["ok_key"])
    assert not beside & {"CA_EXPIRED", "STALE_CA"}


def test_the_broker_chain_a_device_saw_makes_its_root_used(tmp_path: Path) -> None:
    """run's half of the rule: the broker usually sends no root, yet the root its chain
    goes through is used; an expiring one stays a finding, an unrelated one is stale."""
    factory = PKIFactory(NOW)
    broker_root = factory.root("Broker Root", not_before=NOW - timedelta(days=3000),
                               not_after=NOW + timedelta(days=20))
    other = factory.root("Other Root", not_before=NOW - timedelta(days=3000),
                         not_after=NOW + timedelta(days=20))
    server = factory.leaf(broker_root, "broker.test", usage="server", days=10)
    bundle = pki.read_bundle(write_bundle(tmp_path / "ca.pem", [broker_root, other]))
    material = read_material(tmp_path / "ca.pem")
    checked = check_device(material, NOW, pki.Policy())
    seen = observe_broker("broker.test", 8883, "TLSv1.3",
                          [server.cert.public_bytes(serialization.Encoding.DER)],
                          bundle, NOW, pki.Policy())
    assert seen.uses_cas == {broker_root.cert.fingerprint(hashes.SHA256()).hex()}
    judged = {(f.code, f.subject) for f in judged_by_use(checked, seen.uses_cas).findings}
    assert judged == {(pki.FindingCode.CA_EXPIRING, "CN=Broker Root"),
                      (pki.FindingCode.STALE_CA, "CN=Other Root")}


# --- inputs a newcomer gets wrong: one line, exit 3 -----------------------------------


def test_a_key_where_a_certificate_belongs_and_the_reverse(fleet: dict[str, Path], tmp_path: Path) -> None:
    done = check("--ca-bundle", fleet["bundle"], "--cert", fleet["ok_key"], "--key", fleet["ok_key"])
    assert done.returncode == 3 and done.stdout.splitlines()[-2].startswith("UNKNOWN: ")
    assert (f"{fleet['ok_key']}: holds a private key, not a certificate (a key where a "
            "certificate is expected?") in done.stdout
    done = check("--ca-bundle", fleet["bundle"], "--cert", fleet["ok_cert"], "--key", fleet["ok_cert"])
    assert done.returncode == 3
    assert (f"{fleet['ok_cert']}: not a usable private key (it holds a certificate: a "
            "certificate where the key is expected?)") in done.stdout
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    done = check("--ca-bundle", empty)
    assert done.returncode == 3 and f"{empty}: empty file, no certificate in it" in done.stdout
    done = check("--ca-bundle", tmp_path)
    assert done.returncode == 3 and "Is a directory (give the file, not its directory)" in done.stdout
    assert json.loads(check("--ca-bundle", empty, "--json").stdout)["status"] == "UNKNOWN"


def test_usage_errors_are_unknown(fleet: dict[str, Path]) -> None:
    done = check("--ca-bundle", fleet["bundle"], "--no-such-flag")
    assert done.returncode == 3 and "unrecognized arguments: --no-such-flag" in done.stderr


def test_threshold_flags_keep_the_rest_of_the_configured_policy(tmp_path: Path) -> None:
    """--warn-days replaces warn_days only: the config's min_rsa_bits still judges the key."""
    factory = PKIFactory(NOW)
    root = factory.root("Policy Root")
    inter = factory.intermediate(root, "Policy Devices")
    leaf = factory.leaf(inter, "gw-rsa", days=20, key_type="rsa2048")
    bundle = write_bundle(tmp_path / "ca.pem", [root, inter])
    cert, key = leaf.write(tmp_path, chain=True)
    config = tmp_path / "agent.toml"
    config.write_text(f"""
policy = {{ min_rsa_bits = 4096 }}
mqtt = {{ broker = "mqtts://broker.invalid:8883" }}
tls = {{ ca_bundle = "{bundle}", cert = "{cert}", key = "{key}" }}
""")
    done = check("--config", config, "--warn-days", "10", "--json")
    assert done.returncode == 2, done.stdout + done.stderr
    findings = json.loads(done.stdout)["findings"]
    # 20 days left is fine with --warn-days 10; the 2048-bit key is weak under 4096.
    assert [(f["code"], f["subject"]) for f in findings] == [("WEAK_KEY", "CN=gw-rsa")]
