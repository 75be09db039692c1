"""`make demo` from a clean clone, as a newcomer runs it: every demo device ends up in
the state its story promises, and the dashboard answers while it runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_demo_from_a_clean_clone(tmp_path: Path) -> None:
    if shutil.which("git") is None or shutil.which("make") is None:
        if os.environ.get("CI"):
            pytest.fail("git and make are needed (.ci/run installs them)")
        pytest.skip("git or make missing")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    work = tmp_path / "demo"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.Popen(
        ["make", "demo", "DURATION=25", f"DEMO_ARGS=--workdir {work} --listen 127.0.0.1:0"],
        cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    dashboard = None
    offline: list[dict[str, object]] = []
    brokers: dict[str, list[dict[str, object]]] = {}
    assert proc.stdout is not None
    started = None
    for line in proc.stdout:
        lines.append(line)
        if "starting a broker" in line:
            started = time.monotonic()
        if line.startswith("dashboard:"):
            dashboard = line.split()[1]
            assert started is not None and time.monotonic() - started < 60, "".join(lines)
            with urllib.request.urlopen(dashboard, timeout=10) as resp:
                assert resp.status == 200
            with urllib.request.urlopen(dashboard + "api/summary", timeout=10) as resp:
                assert json.load(resp)
            with urllib.request.urlopen(dashboard + "api/devices?state=offline", timeout=10) as resp:
                offline = json.load(resp)["items"]
            with urllib.request.urlopen(dashboard + "api/brokers", timeout=10) as resp:
                brokers = json.load(resp)
    returncode = proc.wait(timeout=600)
    proc.stdout.close()
    assert returncode == 0, "".join(lines)
    output = "".join(lines)
    assert dashboard is not None, output
    intended = json.loads((work / "fleet.json").read_text())
    report = subprocess.run(
        [str(clone / ".venv/bin/certmon-collector"), "report", "--db",
         f"sqlite:///{work / 'certmon.db'}", "--json"], capture_output=True, text=True)
    states = {d["device_id"]: d["state"] for d in json.loads(report.stdout)["devices"]}
    assert states == {dev: v["intended"] for dev, v in intended.items()}, output
    # The broker story: the collector scanned the demo's broker (what the devices see,
    # the same chain) and a second endpoint whose intermediate expires in 10 days.
    verdicts = {s["target"]: (s["severity"], [f["code"] for f in s["findings"]])
                for s in brokers["scanned"]}
    assert sorted(v[0] for v in verdicts.values()) == ["ok", "warning"], verdicts
    assert any("INTERMEDIATE_EXPIRING" in codes for _, codes in verdicts.values()), verdicts
    assert [s["matches_scan"] for s in brokers["seen_by_devices"]] == [True], brokers
    # The gateway that went dark leads with being offline, not its last finding.
    assert [(d["device_id"], d["worst_code"]) for d in offline] == [
        ("gw-0601", "DEVICE_OFFLINE")], offline
    assert "scanned 127.0.0.1:" in output and "INTERMEDIATE_EXPIR" in output, output
