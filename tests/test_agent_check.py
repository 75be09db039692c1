"""`certmon-agent check`: the one-shot replacement for `openssl x509 -noout -dates`,
run as a user would run it (a real subprocess), with Nagios exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kit.pki import PKIFactory, write_bundle

NOW = datetime.now(UTC)


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


def test_expired_ca_in_bundle_is_critical(tmp_path: Path) -> None:
    factory = PKIFactory(NOW)
    old = factory.root("Old CA", not_before=NOW - timedelta(days=800), not_after=NOW - timedelta(days=1))
    done = check("--ca-bundle", write_bundle(tmp_path / "old.pem", [old]))
    assert done.returncode == 2 and "CA_EXPIRED" in done.stdout


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
