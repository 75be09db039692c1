"""`certmon-agent run` as two processes (docs/agent-footprint.md): a resident process
that holds the MQTT session and the spool and never imports cryptography, and a
checker forked for each report that reads, judges, signs and spools, then exits.

Real parts: the fleet Mosquitto over mTLS, `certmon-agent run` as a user starts it
(its memory map read from /proc), and `ResidentAgent` driven report by report where
the checker's state across forks is the point. What must hold: no cryptography,
pyOpenSSL or parsed certificate stays resident; the checker sees the resident's
session (the broker chain, its connection count), its memory (the RSS the status
reports) and its own state from the previous check (heartbeats, x5c on change); a
config that cannot be loaded at the first check exits 78.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import DeviceCreds, Fleet
from kit.broker import wait_until
from kit.mqttprobe import MqttProbe
from test_agent_mqtt import PREFIX, statuses, stop, watcher

from agent.resident import RETRY_S, ResidentAgent
from certmon import wire as p
from certmon.errors import EX_CONFIG


def toml(creds: DeviceCreds, port: int, state: Path, extra: str = "") -> str:
    return f"""[mqtt]
broker = "mqtts://127.0.0.1:{port}"
[tls]
ca_bundle = "{creds.ca_bundle_path}"
cert = "{creds.cert_path}"
key = "{creds.key_path}"
[agent]
state_dir = "{state}"
interval_s = 60
{extra}"""


def report_delivered(resident: ResidentAgent) -> None:
    """One report, as the run loop makes it, then flushed until the broker has it."""
    resident._report()
    assert resident.link is not None and resident.link.wait_connected(10)

    def delivered() -> bool:
        resident.flush()
        return resident.delivery is not None and resident.delivery.spool.depth == 0

    assert wait_until(delivered, 15)


def payloads(probe: MqttProbe, topic: str) -> list[bytes]:
    return [payload for t, payload, _ in list(probe.messages) if t == topic]


def test_run_keeps_cryptography_out_of_the_resident_process(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    device = "gw-resident"
    creds = fleet_broker.device_credentials(device, tmp_path)
    probe = watcher(fleet_broker, tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(toml(creds, fleet_broker.mtls_port, tmp_path / "state"))
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config),
                              "--fork-checks", "true"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The first report goes out before the session is up; the second, at once
        # after it, carries the broker chain the resident's session saw.
        assert wait_until(lambda: len(statuses(probe, device)) >= 2, 30)
        first, second = statuses(probe, device)[:2]
        resident = psutil.Process(agent.pid)
        assert "agent.resident" in resident.cmdline()  # `run` became the resident
        maps = Path(f"/proc/{agent.pid}/maps").read_text()
        assert "cryptography" not in maps and "/OpenSSL/" not in maps
        assert first.broker is None and second.broker is not None
        assert second.broker.chain and second.broker.valid_now is True
        assert (second.boot_id, second.seq) == (first.boot_id, first.seq + 1)
        # The status reports the resident's memory, not the checker's (a fork of it,
        # plus cryptography and the parsed trust store).
        assert second.agent.rss_bytes is not None
        assert abs(second.agent.rss_bytes - resident.memory_info().rss) < 2 * 2**20
        assert second.agent.uptime_s > first.agent.uptime_s
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=20)
        assert agent.returncode == 0, out
        assert wait_until(lambda: payloads(probe, p.online_topic(PREFIX, device))[-1:]
                          == [b'{"online":false}'], 10), out
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
        stop(probe)


def test_fork_checks_false_runs_one_process(fleet_broker: Fleet, tmp_path: Path) -> None:
    """`agent.fork_checks = false` (the default), by its effect: `run` stays the one
    process that reports (cryptography mapped in it, no resident exec, no checker
    children)."""
    device = "gw-one-process"
    creds = fleet_broker.device_credentials(device, tmp_path)
    probe = watcher(fleet_broker, tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(toml(creds, fleet_broker.mtls_port, tmp_path / "state",
                           extra="fork_checks = false\n"))
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: len(statuses(probe, device)) >= 2, 30)
        process = psutil.Process(agent.pid)
        assert "agent.resident" not in process.cmdline()
        assert "cryptography" in Path(f"/proc/{agent.pid}/maps").read_text()
        assert not [c for c in process.children(recursive=True) if c.is_running()
                    and "timedatectl" not in " ".join(c.cmdline())]
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=20)
        assert agent.returncode == 0, out
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
        stop(probe)


def test_the_checker_state_carries_from_one_forked_check_to_the_next(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    """Heartbeats and x5c on change need what the previous check signed: each check
    is a new child, and that memory travels through the resident as opaque bytes."""
    device = "gw-resident-beat"
    creds = fleet_broker.device_credentials(device, tmp_path, days=365)
    config = tmp_path / "agent.toml"
    config.write_text(toml(creds, fleet_broker.mtls_port, tmp_path / "state",
                           "heartbeat = true\n"))
    probe = watcher(fleet_broker, tmp_path)
    resident = ResidentAgent({"config": str(config)})
    try:
        report_delivered(resident)  # before the session: a full status, then the link
        report_delivered(resident)  # the first on the session: full, with its chain in x5c
        resident._report()  # nothing but time changed: a heartbeat
        beats = p.heartbeat_topic(PREFIX, device)
        assert wait_until(lambda: payloads(probe, beats), 15)
        tokens = payloads(probe, p.status_topic(PREFIX, device))
        assert len(tokens) == 2
        jws = [p.parse_jws(t, p.MAX_STATUS_JWS_BYTES) for t in tokens]
        assert [bool(j.x5c) for j in jws] == [True, True]  # offline, then a new session
        beat = p.parse_jws(payloads(probe, beats)[0], p.MAX_HEARTBEAT_JWS_BYTES,
                           typ=p.HEARTBEAT_TYP)
        heartbeat = p.decode_message(p.Heartbeat, beat.payload)
        second = p.decode_status(jws[1].payload)
        assert heartbeat.seq == second.seq + 1
        assert heartbeat.status_digest == p.status_digest(jws[1].payload)
        resident._report()  # still unchanged: the last full status is still remembered
        assert wait_until(lambda: len(payloads(probe, beats)) == 2, 15)
        assert len(payloads(probe, p.status_topic(PREFIX, device))) == 2
    finally:
        resident.shutdown()
        stop(probe)


def test_x5c_rides_once_per_session_across_forked_checks(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    device = "gw-resident-x5c"
    creds = fleet_broker.device_credentials(device, tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(toml(creds, fleet_broker.mtls_port, tmp_path / "state"))
    probe = watcher(fleet_broker, tmp_path)
    resident = ResidentAgent({"config": str(config)})
    try:
        for _ in range(3):
            report_delivered(resident)
        topic = p.status_topic(PREFIX, device)
        assert wait_until(lambda: len(payloads(probe, topic)) == 3, 15)
        jws = [p.parse_jws(t, p.MAX_STATUS_JWS_BYTES) for t in payloads(probe, topic)]
        # Signed offline, the first on the session, then none: `mqtt.status_x5c` on_change.
        assert [bool(j.x5c) for j in jws] == [True, True, False]
    finally:
        resident.shutdown()
        stop(probe)


def test_sequence_numbers_move_on_when_the_counter_file_cannot_be_written(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    """A full or read-only state directory: each forked checker would read the same
    stale counter and sign the same number (the collector refusing all but the first
    as replays). The resident carries the last number from check to check."""
    device = "gw-resident-seq"
    creds = fleet_broker.device_credentials(device, tmp_path)
    config = tmp_path / "agent.toml"
    state = tmp_path / "state"
    config.write_text(toml(creds, fleet_broker.mtls_port, state))
    probe = watcher(fleet_broker, tmp_path)
    resident = ResidentAgent({"config": str(config)})
    try:
        report_delivered(resident)
        (state / ".seq.tmp").mkdir()  # the counter can no longer be written
        report_delivered(resident)
        report_delivered(resident)
        topic = p.status_topic(PREFIX, device)
        assert wait_until(lambda: len(payloads(probe, topic)) == 3, 15)
        seqs = [p.decode_status(p.parse_jws(t, p.MAX_STATUS_JWS_BYTES).payload).seq
                for t in payloads(probe, topic)]
        assert seqs == sorted(set(seqs)) and len(set(seqs)) == 3, seqs
    finally:
        resident.shutdown()
        stop(probe)


def test_a_checker_past_its_deadline_is_killed_and_the_agent_goes_on(
    fleet_broker: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check stuck for good (a lock inherited across the fork, a hung mount) must not
    freeze the resident: past its deadline it is killed, the report counts as failed,
    and the next one goes out."""
    import agent.resident as resident_mod

    device = "gw-resident-stuck"
    creds = fleet_broker.device_credentials(device, tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(toml(creds, fleet_broker.mtls_port, tmp_path / "state"))
    probe = watcher(fleet_broker, tmp_path)
    resident = ResidentAgent({"config": str(config)})
    try:
        report_delivered(resident)
        assert resident.plan is not None
        resident.plan = dataclasses.replace(resident.plan, check_deadline_s=0.5)
        import agent.checker as checker_mod

        real_check = checker_mod.check
        monkeypatch.setattr(checker_mod, "check", lambda *a, **k: time.sleep(3600))
        started = time.monotonic()
        assert resident._fork_check(reload=False) is None  # killed, not waited for
        assert time.monotonic() - started < 15
        monkeypatch.setattr(checker_mod, "check", real_check)
        report_delivered(resident)  # and the agent goes on
        assert wait_until(lambda: len(statuses(probe, device)) >= 2, 15)
        assert resident_mod.STOP_GRACE_S > 0
    finally:
        resident.shutdown()
        stop(probe)


def test_a_config_that_does_not_load_at_the_first_check_exits_78(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[mqtt]\nbroker = 'mqtts://127.0.0.1:1'\nbogus = 1\n")
    assert ResidentAgent({"config": str(config)}).run() == EX_CONFIG
    err = capfd.readouterr().err
    assert f"{config}:3: mqtt.bogus: unknown key" in err


def test_a_renewed_client_cert_gets_a_new_link_from_the_resident(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    """The checker reads the new pair; the resident, which never parses a certificate,
    rebuilds its link from the plan's fingerprint, and the broker chain is judged
    again on the new session."""
    device = "gw-resident-renew"
    creds = fleet_broker.device_credentials(device, tmp_path, days=5)
    config = tmp_path / "agent.toml"
    config.write_text(toml(creds, fleet_broker.mtls_port, tmp_path / "state"))
    probe = watcher(fleet_broker, tmp_path)
    resident = ResidentAgent({"config": str(config)})
    try:
        report_delivered(resident)
        report_delivered(resident)  # on the session: with the broker chain
        old_link = resident.link
        renewed = fleet_broker.device_credentials(device, tmp_path / "new", days=365,
                                                  name="gw-resident-renew-2")
        creds.cert_path.write_bytes(renewed.cert_path.read_bytes())
        creds.key_path.write_bytes(renewed.key_path.read_bytes())
        report_delivered(resident)  # the new pair: a status, then a new link built with it
        assert resident.link is not old_link and resident.link is not None
        assert resident._is_changed()  # the new session's chain is not judged yet
        report_delivered(resident)
        assert not resident._is_changed()  # judged now
        assert wait_until(lambda: len(statuses(probe, device)) == 4, 15)
        seen = statuses(probe, device)
        assert seen[0].client is not None and seen[3].client is not None
        assert seen[2].client is not None and seen[2].client.sha256 != seen[0].client.sha256
        assert "CERT_EXPIRING" in {f.code for f in seen[0].findings}
        assert "CERT_EXPIRING" not in {f.code for f in seen[3].findings}
        assert seen[3].broker is not None and seen[3].broker.valid_now is True
    finally:
        resident.shutdown()
        stop(probe)


def test_the_broker_host_judgement_is_kept_across_checks_for_check_every_s(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    """`broker.check_every_s`: the reports between two judgements carry the last one,
    though each report is checked by a new child."""
    device = "gw-resident-host"
    creds = fleet_broker.device_credentials(device, tmp_path)
    config = tmp_path / "agent.toml"
    missing = tmp_path / "no-such-mosquitto.conf"  # a finding, not an error
    config.write_text(toml(creds, fleet_broker.mtls_port, tmp_path / "state")
                      + f'[broker]\nconfig = "{missing}"\ncheck_every_s = 600\n')
    probe = watcher(fleet_broker, tmp_path)
    resident = ResidentAgent({"config": str(config)})
    # The checkers' log lines, through the handler they inherit (as `run` logs).
    log, handler = logging.getLogger("certmon.agent"), logging.FileHandler(tmp_path / "log")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        for _ in range(3):
            report_delivered(resident)
        assert wait_until(lambda: len(statuses(probe, device)) == 3, 15)
        assert all(s.broker_host is not None for s in statuses(probe, device))
        lines = (tmp_path / "log").read_text().splitlines()
        judged = [line for line in lines if f"broker host {missing} judged" in line]
        assert len(judged) == 1, lines
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(level)
        resident.shutdown()
        stop(probe)


def test_a_checker_that_cannot_be_forked_fails_that_report_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of memory or processes at the interval: logged, and the next one tries again
    (the resident, holding the session and the spool, does not die of it)."""
    import errno
    import os

    def no_fork() -> int:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(os, "fork", no_fork)
    resident = ResidentAgent({"config": str(tmp_path / "agent.toml")})
    with caplog.at_level(logging.ERROR, "certmon.agent"):
        resident._report()
    assert "cannot fork the checker: [Errno 12] Cannot allocate memory" in caplog.text
    assert resident.state is None and resident.plan is None
    assert resident._next_interval_s() == RETRY_S


def test_a_reload_keeps_the_state_directory_the_agent_started_with(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    """As in one process: sequence numbers and the spool stay where they were (a new
    directory would restart `seq`, and the collector would refuse it as a replay)."""
    device = "gw-resident-reload"
    creds = fleet_broker.device_credentials(device, tmp_path)
    config = tmp_path / "agent.toml"
    first_dir, second_dir = tmp_path / "state", tmp_path / "moved"
    config.write_text(toml(creds, fleet_broker.mtls_port, first_dir))
    probe = watcher(fleet_broker, tmp_path)
    resident = ResidentAgent({"config": str(config)})
    try:
        report_delivered(resident)
        config.write_text(toml(creds, fleet_broker.mtls_port, second_dir,
                               "jitter_fraction = 0.0\n"))
        resident._on_reload()  # what SIGHUP asks of the loop
        report_delivered(resident)
        assert resident.plan is not None and resident.plan.jitter_fraction == 0.0  # reloaded
        assert not second_dir.exists()
        assert (first_dir / "seq").read_text().strip() == "2"
        assert wait_until(lambda: [s.seq for s in statuses(probe, device)] == [1, 2], 15)
    finally:
        resident.shutdown()
        stop(probe)
