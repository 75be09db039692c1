"""A status reaches the collector once per place in the device's history, and a copy
of one is not mistaken for a replay.

The README flow (`certmon-agent run`, SIGTERM, then `certmon-agent once` on the same
state directory) once made `certmon-collector report` say `rejected messages:
replay=2`: the service applied PUBACKs only when its loop woke (every 15 s), so a
SIGTERM in between left acknowledged statuses in the spool and `once` sent them
again. Real Mosquitto (the fleet broker), a real collector on SQLite, the real agent
(as `certmon-agent` processes where signals matter, in-process where the spool is
arranged by hand).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from conftest import DeviceCreds, Fleet
from kit.broker import wait_until

from agent.config import AgentConfig
from agent.service import AgentService
from certmon.config import loads
from collector.service import CollectorService

CHRONY_SYNCED = (Path(__file__).parent / "data" / "clock" /
                 "chronyc-tracking-normal.csv").read_text()


def chrony_synced(argv: Sequence[str]) -> str | None:
    return CHRONY_SYNCED if argv[0] == "chronyc" else None


def agent_argv(command: str, fleet: Fleet, creds: DeviceCreds, state: Path) -> list[str]:
    return [sys.executable, "-m", "agent.cli", command, "--broker",
            f"mqtts://127.0.0.1:{fleet.mtls_port}", "--ca-bundle", str(creds.ca_bundle_path),
            "--cert", str(creds.cert_path), "--key", str(creds.key_path),
            "--state-dir", str(state)]


def in_process_agent(fleet: Fleet, creds: DeviceCreds, state: Path) -> AgentService:
    config = loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{fleet.mtls_port}",
        "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "agent.state_dir": str(state),
        "agent.interval_s": "10"})
    agent = AgentService(config, runner=chrony_synced)
    assert agent.connect(10)
    return agent


def rejections(collector: CollectorService, device_id: str) -> list[str]:
    """This device's rejection reasons as the store recorded them."""
    return [r.reason for r in collector.store.rejection_samples(limit=1000)
            if f"/{device_id}/" in r.topic]


def newest_seq(collector: CollectorService, device_id: str) -> int | None:
    row = collector.store.device(device_id)
    return None if row is None else row.seq


def test_once_after_a_stopped_run_sends_nothing_the_broker_acknowledged(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path
) -> None:
    device = "gw-run-once"
    creds = fleet_broker.device_credentials(device, tmp_path / "creds")
    state = tmp_path / "state"
    run = subprocess.Popen([*agent_argv("run", fleet_broker, creds, state), "--interval-s", "300"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Every status `run` made (one at start, one when its session came up) stored.
        def all_stored() -> bool:
            made = int((state / "seq").read_text()) if (state / "seq").exists() else 0
            return made >= 1 and collector.store.seen_count(device) == made
        assert wait_until(all_stored, 20), collector.store.seen_count(device)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=20)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, out
    made_by_run = int((state / "seq").read_text())
    # Acknowledged means gone from the disk, even though the loop was asleep.
    assert sorted((state / "spool").iterdir()) == [], out

    once = subprocess.run([*agent_argv("once", fleet_broker, creds, state), "--timeout-s", "20"],
                          capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    assert f"delivered status seq={made_by_run + 1} for {device}" in once.stdout
    assert wait_until(lambda: newest_seq(collector, device) == made_by_run + 1, 10)
    assert collector.store.seen_count(device) == made_by_run + 1
    assert rejections(collector, device) == []  # `report` says no "replay=…"


def test_a_status_resent_after_a_lost_puback_is_a_duplicate_not_a_replay(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path
) -> None:
    # A power cut between the broker's PUBACK and the spool file's removal: the agent
    # cannot know the broker had it and sends the same bytes again after the reboot.
    device = "gw-power-cut"
    creds = fleet_broker.device_credentials(device, tmp_path / "creds")
    state = tmp_path / "state"
    agent = in_process_agent(fleet_broker, creds, state)
    try:
        first = agent.report_once()
        (spooled,) = agent.spool.pending()
        assert agent.wait_delivered(20)
    finally:
        agent.shutdown()
    assert wait_until(lambda: newest_seq(collector, device) == first.status.seq, 10)
    agent.spool.append(spooled.seq, spooled.topic, spooled.payload)  # as the cut left it
    duplicates = collector.ingestor.duplicates

    once = subprocess.run([*agent_argv("once", fleet_broker, creds, state), "--timeout-s", "20"],
                          capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    assert wait_until(lambda: newest_seq(collector, device) == first.status.seq + 1, 10)
    assert wait_until(lambda: collector.ingestor.duplicates >= duplicates + 1, 10)
    assert collector.store.seen_count(device) == 2
    assert rejections(collector, device) == []


def test_different_content_under_a_stored_boot_id_and_seq_is_a_replay(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path
) -> None:
    # The sequence counter lost (the state directory restored from an old image): the
    # device signs a new status under a number the collector has stored. Not a copy:
    # refused and counted as a replay, and the stored status stays current.
    device = "gw-seq-reuse"
    creds = fleet_broker.device_credentials(device, tmp_path / "creds")
    state = tmp_path / "state"
    agent = in_process_agent(fleet_broker, creds, state)
    try:
        first = agent.report_once()
        assert agent.wait_delivered(20)
    finally:
        agent.shutdown()
    assert wait_until(lambda: newest_seq(collector, device) == first.status.seq, 10)
    stored = collector.store.device(device)
    assert stored is not None
    (state / "seq").write_text("0\n")
    again = in_process_agent(fleet_broker, creds, state)
    try:
        second = again.report_once()
        assert again.wait_delivered(20)
    finally:
        again.shutdown()
    assert (second.status.boot_id, second.status.seq) == (first.status.boot_id,
                                                           first.status.seq)
    assert second.token != first.token
    assert wait_until(lambda: rejections(collector, device) == ["replay"], 10), \
        rejections(collector, device)
    row = collector.store.device(device)
    assert row is not None and row.status_json == stored.status_json
