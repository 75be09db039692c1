"""Renewal through a real Mosquitto and a real collector: the operator's story.

A gateway's renewal hook (tests/renewhook.py, a small CA client issuing from the test
fleet's CA) runs under `certmon-agent renew` and the `run` loop. A good hook → the new
pair is proven on the broker's device listener, installed, the old one kept beside it.
Every bad hook → exit 2, the working pair byte-for-byte unchanged, a one-line reason,
and RENEWAL_FAILING on the collector, resolved by the next successful renewal.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet
from kit.broker import wait_until

from agent.cli import main
from agent.config import load_agent_config
from agent.renewal.install import previous_path
from agent.renewal.proof import prove_connect
from agent.service import AgentService
from certmon import clock as wallclock
from certmon import pki
from collector.service import CollectorService
from collector.web.fleet import build_snapshot
from collector.web.metrics import FleetCollector

HOOK = Path(__file__).parent / "renewhook.py"


@dataclass(frozen=True)
class Gateway:
    device_id: str
    config: Path
    cert: Path
    key: Path
    state: Path

    def pair(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


def write_ca(fleet: Fleet, tmp: Path, which: str) -> tuple[str, str]:
    issued = {"fleet": fleet.devices_ca, "broker": fleet.broker_ca,
              "rogue": fleet.pki.root("rogue devices CA", name="rogue-ca")}[which]
    cert, key = tmp / f"{which}-ca.pem", tmp / f"{which}-ca.key"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    return str(cert), str(key)


def gateway(fleet: Fleet, tmp: Path, device_id: str, command: list[str], *,
            due: bool = True, extra: str = "", **leaf: Any) -> Gateway:
    creds = fleet.device_credentials(device_id, tmp / "device", **leaf)
    state = tmp / "state"
    # due: renew 400 days before notAfter, i.e. now; otherwise the default 2/3.
    when = "at_lifetime_fraction = 0\ndays_before = 400\n" if due else ""
    config = tmp / "agent.toml"
    config.write_text(f"""
[mqtt]
broker = "mqtts://127.0.0.1:{fleet.mtls_port}"
[tls]
ca_bundle = "{creds.ca_bundle_path}"
cert = "{creds.cert_path}"
key = "{creds.key_path}"
[agent]
state_dir = "{state}"
[renewal]
enabled = true
command = {json.dumps(command)}
timeout_s = 3
{when}{extra}
""")
    return Gateway(device_id, config, creds.cert_path, creds.key_path, state)


def hook(mode: str, ca: tuple[str, str], *extra: str) -> list[str]:
    return [sys.executable, str(HOOK), mode, *ca, *extra]


def renew(gw: Gateway, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str, str]:
    code = main(["renew", "--config", str(gw.config), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_good_hook_renews_and_the_new_pair_connects(
    fleet_broker: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = gateway(fleet_broker, tmp_path, "gw-renew-ok",
                 hook("good", write_ca(fleet_broker, tmp_path, "fleet")))
    old_cert, old_key = gw.pair()
    code, out, err = renew(gw, capsys)
    assert (code, err) == (0, ""), err
    assert out.startswith("renewed: installed gw-renew-ok serial ")
    new_cert, new_key = gw.pair()
    assert new_cert != old_cert and new_key != old_key
    assert previous_path(gw.cert).read_bytes() == old_cert
    assert previous_path(gw.key).read_bytes() == old_key
    assert (gw.key.stat().st_mode & 0o777) == 0o600
    new = pki.read_bundle(gw.cert).certs[0].facts
    assert pki.identity_of(new) == "gw-renew-ok"
    # The installed pair is the one the broker accepts (the hook's debug dump of the
    # key never reached our output).
    assert prove_connect("127.0.0.1", fleet_broker.mtls_port, servername=None, alpn=(),
                         new_cert=gw.cert, new_key=gw.key, device_id=gw.device_id,
                         timeout_s=5) is None
    assert "PRIVATE KEY" not in out + err
    state = json.loads((gw.state / "renewal.json").read_text())
    assert (state["outcome"], state["failures"], state["cert_sha256"]) == (
        "renewed", 0, new.sha256)
    assert not [p for p in gw.state.iterdir() if p.name.startswith(".renewal-")]


def test_not_due_is_ok_and_force_renews(
    fleet_broker: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = gateway(fleet_broker, tmp_path, "gw-renew-force",
                 hook("good", write_ca(fleet_broker, tmp_path, "fleet")), due=False)
    before = gw.pair()
    code, out, _ = renew(gw, capsys, "--json")
    report = json.loads(out)
    assert (code, report["is_due"], report["attempted"], report["exit_code"]) == (
        0, False, False, 0)
    assert gw.pair() == before
    code, out, _ = renew(gw, capsys, "--force", "--json")
    assert code == 0 and json.loads(out)["renewed"] is True
    assert gw.pair() != before


BAD_HOOKS = {
    # name: (mode, CA, extra hook args, config extra, the reason's words)
    "ca_the_device_does_not_trust": ("good", "rogue", (), "",
                                     "does not chain to the trust store"),
    "ca_the_broker_does_not_trust": ("good", "broker", (), "",
                                     "refused the new pair"),
    "another_device_id": ("good", "fleet", ("gw-someone-else",), "",
                          "is for 'gw-someone-else', not this device ('gw-bad')"),
    "key_does_not_match": ("wrong_key", "fleet", (), "", "does not belong"),
    "times_out": ("sleep", "fleet", (), "", "timed out after 3 s"),
    "exits_1": ("exit1", "fleet", (), "", "exited 1: enrollment server said: 403 forbidden"),
    "writes_nothing": ("nothing", "fleet", (), "", "wrote no certificate"),
    "writes_garbage": ("garbage", "fleet", (), "", "the new certificate does not parse"),
}


@pytest.mark.parametrize("case", [*BAD_HOOKS, "missing_hook"])
def test_a_bad_hook_changes_nothing_and_says_why(
    fleet_broker: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    if case == "missing_hook":
        command, words = [str(tmp_path / "no-such-hook")], "cannot run hook"
    else:
        mode, ca, extra, _conf, words = BAD_HOOKS[case]
        command = hook(mode, write_ca(fleet_broker, tmp_path, ca), *extra)
    gw = gateway(fleet_broker, tmp_path, "gw-bad", command)
    before = gw.pair()
    code, out, err = renew(gw, capsys)
    assert code == 2, (out, err)
    assert err.startswith("certmon-agent: renewal failed: ") and err.count("\n") == 1, err
    assert words in err, err
    assert "PRIVATE KEY" not in err
    assert gw.pair() == before  # byte for byte
    assert not previous_path(gw.cert).exists() and not previous_path(gw.key).exists()
    state = json.loads((gw.state / "renewal.json").read_text())
    assert (state["outcome"], state["failures"]) == ("failed", 1) and words in state["reason"]
    # A second try right away is held back by the backoff: due, not attempted (1).
    code, _, err = renew(gw, capsys)
    assert code == 1 and "backing off after 1 failed attempt(s)" in err


def renewal_metrics(store: Any, device_id: str) -> dict[str, float]:
    """The device's certmon_renewal_* series in /metrics' exposition."""
    # A healthy device's renewal series are opt-in (web.metrics_per_device = "all").
    text = FleetCollector(store, per_device="all").exposition(build_snapshot(store, datetime.now(UTC), ()))
    out = {}
    for line in text.decode().splitlines():
        name, _, rest = line.partition("{")
        if name.startswith("certmon_renewal_") and f'device="{device_id}"' in rest:
            out[name] = float(rest.rsplit(" ", 1)[1])
    return out


def test_run_renews_by_itself_and_the_collector_judges_it(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path
) -> None:
    """The story: renewal fails (RENEWAL_FAILING with the reason), then `run`, at an
    injected time past the renewal point, renews, reconnects with the new pair and
    re-publishes its cert; the collector stores it and resolves the alert."""
    fleet_ca = write_ca(fleet_broker, tmp_path, "fleet")
    device_id = "gw-renew-run"
    # 30-day certificate: renewal due at 2/3 (day 20, minus the jitter); the device
    # clock is put at day 25.
    failing = gateway(fleet_broker, tmp_path / "a", device_id, hook("exit1", fleet_ca),
                      due=False, extra="retry_min_s = 60\n", days=30)
    day25 = wallclock.OffsetClock(wallclock.SystemClock(), timedelta(days=25))
    store = collector.store

    def firing() -> dict[str, Any]:
        return {a.rule: a for a in store.active_alerts() if a.device_id == device_id}

    config = load_agent_config(failing.config)
    agent = AgentService(config, clock=day25)
    try:
        agent.connect(10)
        run = agent.renew()
        assert run is not None and run.result is not None and not run.result.is_renewed
        result = agent.report_once()
        assert result.status.renewal is not None
        assert result.status.renewal.outcome == "failed" and result.status.renewal.is_due
        assert agent.wait_delivered(15)
        assert wait_until(lambda: "RENEWAL_FAILING" in firing(), 10), firing()
        assert "403 forbidden" in firing()["RENEWAL_FAILING"].summary
        # Judged by the collector's own clock: at real time the point is ~20 days ahead.
        assert "RENEWAL_OVERDUE" not in firing()
        assert renewal_metrics(store, device_id) == {
            "certmon_renewal_failures": 1.0,
            "certmon_renewal_due_seconds": result.status.renewal.due_at.timestamp()}
        old_sha = result.status.client.sha256 if result.status.client else None
        assert store.device(device_id).client_sha256 == old_sha  # type: ignore[union-attr]
    finally:
        agent.shutdown()

    # The operator fixes the hook; a day later (past the backoff) `run` renews alone.
    good = gateway(fleet_broker, tmp_path / "a", device_id, hook("good", fleet_ca),
                   due=False, extra="retry_min_s = 60\n", days=30)
    old_cert = failing.cert.read_bytes()
    good.cert.write_bytes(old_cert)  # the same device, the same pair as before
    good.key.write_bytes(failing.key.read_bytes())
    agent = AgentService(load_agent_config(good.config),
                         clock=wallclock.OffsetClock(wallclock.SystemClock(), timedelta(days=26)))
    thread = threading.Thread(target=agent.run, daemon=True)
    try:
        assert agent.connect(10)  # a session with the old pair: `run` must switch
        thread.start()
        assert wait_until(lambda: good.cert.read_bytes() != old_cert, 20)
        new_sha = pki.read_bundle(good.cert).certs[0].facts.sha256
        assert wait_until(lambda: (row := store.device(device_id)) is not None
                          and row.client_sha256 == new_sha, 20)
        assert wait_until(lambda: "RENEWAL_FAILING" not in firing(), 10), firing()
        assert store.certificate(new_sha) is not None
        assert previous_path(good.cert).read_bytes() == old_cert
        assert any(a.rule == "RENEWAL_FAILING" and a.state == "resolved"
                   for a in store.alert_history(device_id))
        assert agent.link is not None and agent.link.is_connected
        assert wait_until(lambda: renewal_metrics(store, device_id).get(
            "certmon_renewal_failures") == 0.0, 10)
        due = renewal_metrics(store, device_id)["certmon_renewal_due_seconds"]
        assert due > time.time() + 200 * 86400  # the new 400-day certificate's point
    finally:
        agent.request_stop()
        thread.join(15)
    assert not thread.is_alive()


def test_disabled_run_never_renews_and_reports_no_renewal_part(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    gw = gateway(fleet_broker, tmp_path, "gw-renew-off",
                 hook("good", write_ca(fleet_broker, tmp_path, "fleet")))  # due now
    text = gw.config.read_text().replace("enabled = true", "enabled = false")
    gw.config.write_text(text)
    before = gw.pair()
    agent = AgentService(load_agent_config(gw.config))
    assert agent.cycle(sign=False).status.renewal is None
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: agent.seq.last >= 1 and agent.spool.depth == 0, 15)
    finally:
        agent.request_stop()
        thread.join(15)
    assert gw.pair() == before and not (gw.state / "renewal.json").exists()
    # Enabled, the same files and clock carry the part.
    gw.config.write_text(text.replace("enabled = false", "enabled = true"))
    part = AgentService(load_agent_config(gw.config)).cycle(sign=False).status.renewal
    assert part is not None and part.is_due and part.outcome is None


def test_connect_timeout_bounds_the_broker_proof(
    fleet_broker: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A broker that accepts TCP and never answers: the proof gives up after
    # connect_timeout_s, and the pair stays.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        gw = gateway(fleet_broker, tmp_path, "gw-renew-silent",
                     hook("good", write_ca(fleet_broker, tmp_path, "fleet")),
                     extra="connect_timeout_s = 1\n")
        gw.config.write_text(gw.config.read_text().replace(
            f"127.0.0.1:{fleet_broker.mtls_port}", f"127.0.0.1:{port}"))
        before = gw.pair()
        started = time.monotonic()
        code, _, err = renew(gw, capsys)
        elapsed = time.monotonic() - started
    assert code == 2 and f"the broker 127.0.0.1:{port} refused the new pair" in err, err
    assert 1.0 <= elapsed < 2.9, elapsed  # the hook itself takes a fraction of a second
    assert gw.pair() == before


def test_a_child_swapping_the_files_after_exit_0_never_gets_its_pair_installed(
    fleet_broker: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook exits 0 and leaves a setsid'd child (out of reach of the group kill)
    that keeps swapping in another valid pair and holds stderr open: what is installed
    is exactly the pair that was proven (or nothing), and the agent does not wait."""
    fleet_ca = write_ca(fleet_broker, tmp_path, "fleet")
    done = tmp_path / "swapped"
    monkeypatch.setenv("SWAP_CA", fleet_ca[0])
    monkeypatch.setenv("SWAP_CA_KEY", fleet_ca[1])
    monkeypatch.setenv("SWAP_DONE", str(done))
    gw = gateway(fleet_broker, tmp_path, "gw-renew-swap", hook("swap", fleet_ca))
    before = gw.pair()
    started = time.monotonic()
    code, out, err = renew(gw, capsys)
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, elapsed  # not held by the child's open stderr (2+ s)
    state = json.loads((gw.state / "renewal.json").read_text())
    if code == 0:
        leaf = pki.read_bundle(gw.cert).certs[0]
        assert leaf.facts.sha256 == state["cert_sha256"]  # the proven certificate
        key_facts, _, _ = pki.read_private_key(gw.key)
        assert key_facts is not None
        assert pki.cert_spki_sha256(leaf.cert) == key_facts.public_sha256  # its own key
    else:  # the swap was read (a mixed pair): refused, nothing changed
        assert code == 2 and gw.pair() == before, (out, err)
    assert wait_until(done.exists, 5)  # the child did swap, after the hook's exit


def test_a_combined_pem_never_puts_the_key_into_the_certificate_file(
    fleet_broker: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = gateway(fleet_broker, tmp_path, "gw-renew-combined",
                 hook("combined", write_ca(fleet_broker, tmp_path, "fleet")))
    gw.cert.chmod(0o644)
    code, _, err = renew(gw, capsys)
    assert code == 0, err
    installed = gw.cert.read_bytes()
    assert b"PRIVATE KEY" not in installed
    assert installed.count(b"-----BEGIN CERTIFICATE-----") == 2  # leaf + CA, re-encoded
    assert (gw.cert.stat().st_mode & 0o777) == 0o644
    assert b"PRIVATE KEY" in gw.key.read_bytes() and (gw.key.stat().st_mode & 0o777) == 0o600
    leaf = pki.read_bundle(gw.cert).certs[0]  # the installed pair is a pair
    key_facts, _, _ = pki.read_private_key(gw.key)
    assert key_facts is not None and pki.cert_spki_sha256(leaf.cert) == key_facts.public_sha256


def test_two_attempts_at_once_one_proceeds_the_other_says_in_progress(
    fleet_broker: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """`renew --force` beside `run`'s attempt: the second reports in progress (exit 1),
    the first installs a consistent pair; `run`'s path skips the same way."""
    started, go = tmp_path / "hook-started", tmp_path / "hook-go"
    monkeypatch.setenv("WAIT_STARTED", str(started))
    monkeypatch.setenv("WAIT_GO", str(go))
    gw = gateway(fleet_broker, tmp_path, "gw-renew-twice",
                 hook("wait", write_ca(fleet_broker, tmp_path, "fleet")))
    before = gw.pair()
    agent = AgentService(load_agent_config(gw.config))
    runs: list[Any] = []
    first = threading.Thread(target=lambda: runs.append(agent.renew()), daemon=True)
    first.start()
    try:
        assert wait_until(started.exists, 10)
        code, out, _ = renew(gw, capsys, "--force", "--json")
        report = json.loads(out)
        assert (code, report["attempted"], report["reason"]) == (
            1, False, "another renewal is in progress"), report
        assert gw.pair() == before  # the second changed nothing
        busy = AgentService(load_agent_config(gw.config)).renew()  # `run`'s path
        assert busy is not None and busy.is_busy and busy.result is None
    finally:
        go.touch()
        first.join(15)
    assert runs and runs[0].result is not None and runs[0].result.is_renewed, runs
    leaf = pki.read_bundle(gw.cert).certs[0]
    key_facts, _, _ = pki.read_private_key(gw.key)
    assert key_facts is not None and pki.cert_spki_sha256(leaf.cert) == key_facts.public_sha256
    assert previous_path(gw.cert).read_bytes() == before[0]
    assert previous_path(gw.key).read_bytes() == before[1]
    state = json.loads((gw.state / "renewal.json").read_text())
    assert (state["outcome"], state["cert_sha256"]) == ("renewed", leaf.facts.sha256)
