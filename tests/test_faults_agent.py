"""A gateway's own files go wrong while the agent runs; it says so, and recovers.

Each story runs the real agent in-process against the fleet broker and a running
collector on SQLite, breaks one thing on the device mid-run, steps a few intervals
(`report_once()` + `flush()`, or `_report_logged()`, which is exactly what the run
loop calls each interval), fixes it, and checks that the next status is stored and
healthy. The gateways have a working chrony (canned `chronyc tracking`), so a healthy
status has no findings at all.

We run as root, so permission bits stop nothing: a "read-only" or "full" state
directory is a real tmpfs mounted on it (`mount -t tmpfs -o size=64k`, remounted
`ro`); those tests skip where mount is not permitted.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import DeviceCreds, Fleet
from kit.broker import wait_until

from agent.config import AgentConfig
from agent.service import AgentService
from certmon.config import loads
from certmon.errors import TransportError
from collector.service import CollectorService

CHRONY_SYNCED = (Path(__file__).parent / "data" / "clock" /
                 "chronyc-tracking-normal.csv").read_text()


def chrony_synced(argv: Sequence[str]) -> str | None:
    return CHRONY_SYNCED if argv[0] == "chronyc" else None


def make_agent(creds: DeviceCreds, port: int, state: Path) -> AgentService:
    config = loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{port}", "tls.ca_bundle": str(creds.ca_bundle_path),
        "tls.cert": str(creds.cert_path), "tls.key": str(creds.key_path),
        "agent.state_dir": str(state), "agent.interval_s": "10"})
    agent = AgentService(config, runner=chrony_synced)
    assert agent.connect(10)
    return agent


def codes(collector: CollectorService, device_id: str) -> set[str] | None:
    row = collector.store.device(device_id)
    return None if row is None else {f.code for f in row.findings}


def newest_seq(collector: CollectorService, device_id: str) -> int:
    row = collector.store.device(device_id)
    return 0 if row is None else row.seq


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def tmpfs_state(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs as the agent's state directory."""
    state = tmp_path / "state"
    state.mkdir()
    try:
        mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(state))
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    yield state
    subprocess.run(["umount", "-l", str(state)], check=False, capture_output=True, timeout=10)


def test_a_full_state_directory_is_logged_and_statuses_still_go_out(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path, tmpfs_state: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    creds = fleet_broker.device_credentials("gw-full", tmp_path / "creds")
    agent = make_agent(creds, fleet_broker.mtls_port, tmpfs_state)
    try:
        agent.report_once()
        assert agent.wait_delivered(10)
        filler = tmpfs_state / "filler"
        with filler.open("wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)
        with caplog.at_level(logging.INFO, logger="certmon.agent"):
            agent._report_logged()  # one interval with a full disk
            agent.flush()
        assert "No space left on device" in caplog.text, caplog.text
        filler.unlink()  # the operator frees space
        agent._report_logged()
        assert agent.wait_delivered(10)
        last = agent.seq.last
        assert wait_until(lambda: newest_seq(collector, "gw-full") == last, 10)
        assert codes(collector, "gw-full") == set()  # the next status is healthy
    finally:
        agent.shutdown()


def test_a_full_state_directory_still_publishes_a_live_status(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path, tmpfs_state: Path,
) -> None:
    """agent/service.py promises: 'Read-only or full state directory: keep reporting
    live, lose only the store-and-forward guarantee, and say so.'"""
    creds = fleet_broker.device_credentials("gw-full-live", tmp_path / "creds")
    agent = make_agent(creds, fleet_broker.mtls_port, tmpfs_state)
    try:
        agent.report_once()
        assert agent.wait_delivered(10)
        with (tmpfs_state / "filler").open("wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        assert wait_until(lambda: newest_seq(collector, "gw-full-live") == 1, 10)
        agent._report_logged()  # one interval with a full disk
        agent.flush()
        assert wait_until(lambda: newest_seq(collector, "gw-full-live") > 1, 5)
    finally:
        agent.shutdown()


def test_a_read_only_state_directory_is_logged_and_recovers_when_writable(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path, tmpfs_state: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    creds = fleet_broker.device_credentials("gw-ro", tmp_path / "creds")
    agent = make_agent(creds, fleet_broker.mtls_port, tmpfs_state)
    try:
        agent.report_once()
        assert agent.wait_delivered(10)
        mount("-o", "remount,ro", str(tmpfs_state))
        with caplog.at_level(logging.INFO, logger="certmon.agent"):
            agent._report_logged()  # the agent does not crash; it says why
        assert "Read-only file system" in caplog.text, caplog.text
        mount("-o", "remount,rw", str(tmpfs_state))
        agent._report_logged()
        assert agent.wait_delivered(10)
        last = agent.seq.last
        assert wait_until(lambda: newest_seq(collector, "gw-ro") == last, 10)
        assert codes(collector, "gw-ro") == set()
    finally:
        agent.shutdown()


@pytest.mark.parametrize("fault", ["deleted", "garbage"])
def test_a_broken_ca_bundle_becomes_a_finding_and_recovers(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path, fault: str
) -> None:
    device = f"gw-ca-{fault}"
    creds = fleet_broker.device_credentials(device, tmp_path / "creds")
    bundle = tmp_path / "ca.pem"  # the device's own copy, so the test may break it
    shutil.copy(creds.ca_bundle_path, bundle)
    creds = DeviceCreds(creds.cert_path, creds.key_path, bundle, device)
    agent = make_agent(creds, fleet_broker.mtls_port, tmp_path / "state")
    good = bundle.read_bytes()
    try:
        agent.report_once()
        assert agent.wait_delivered(10)
        if fault == "deleted":
            bundle.unlink()
        else:
            bundle.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        agent.report_once()  # the established session goes on; the status says what broke
        assert agent.wait_delivered(10)
        seq = agent.seq.last
        assert wait_until(lambda: newest_seq(collector, device) == seq, 10)
        broken = codes(collector, device)
        assert broken and broken & {"FILE_UNREADABLE", "UNPARSEABLE_BLOCK", "NO_CERTIFICATE"}, \
            broken
        bundle.write_bytes(good)
        agent.report_once()
        assert agent.wait_delivered(10)
        seq = agent.seq.last
        assert wait_until(lambda: newest_seq(collector, device) == seq, 10)
        assert codes(collector, device) == set()
    finally:
        agent.shutdown()


def test_an_unreadable_key_is_a_clear_log_line_and_reporting_resumes_when_fixed(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without its key the agent cannot sign, and an unsigned status is worthless to
    the collector: nothing goes out (the collector's silence rule notices), and the
    device's log names the file and the problem, never the key."""
    creds = fleet_broker.device_credentials("gw-key", tmp_path / "creds")
    agent = make_agent(creds, fleet_broker.mtls_port, tmp_path / "state")
    good = creds.key_path.read_bytes()
    try:
        agent.report_once()
        assert agent.wait_delivered(10)
        creds.key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        with pytest.raises(TransportError, match="cannot sign"):
            agent.report_once()
        with caplog.at_level(logging.INFO, logger="certmon.agent"):
            agent._report_logged()  # the run loop: logged, not raised
        assert "report failed: cannot sign: the client certificate or key is unreadable" in (
            caplog.text)
        assert "garbage" not in caplog.text
        creds.key_path.write_bytes(good)
        agent.report_once()
        assert agent.wait_delivered(10)
        seq = agent.seq.last
        assert wait_until(lambda: newest_seq(collector, "gw-key") == seq, 10)
        assert codes(collector, "gw-key") == set()
    finally:
        agent.shutdown()


def test_an_expired_client_cert_is_refused_by_the_broker_spooled_and_recovered_by_renewal(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path
) -> None:
    now = fleet_broker.pki.now
    creds = fleet_broker.device_credentials(
        "gw-expired", tmp_path / "creds", not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1))
    config = loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{fleet_broker.mtls_port}",
        "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "agent.state_dir": str(tmp_path / "state"),
        "agent.interval_s": "10"})
    agent = AgentService(config, runner=chrony_synced)
    try:
        assert not agent.connect(3)  # the broker refuses the TLS handshake
        first = agent.report_once()
        assert "CERT_EXPIRED" in {f.code for f in first.status.findings}
        agent.flush()
        assert agent.spool.depth == 1 and not agent.link.is_connected  # type: ignore[union-attr]
        assert agent.link.state.last_error  # type: ignore[union-attr]
        # Renewal: a new certificate and key land on disk; the agent uses them for
        # the next connection without a restart.
        renewed = fleet_broker.device_credentials("gw-expired", tmp_path / "new", days=365,
                                                  name="gw-expired-renewed")
        creds.cert_path.write_bytes(renewed.cert_path.read_bytes())
        creds.key_path.write_bytes(renewed.key_path.read_bytes())
        after = agent.report_once()
        assert agent.wait_delivered(20), agent.link.state.last_error  # type: ignore[union-attr]
        assert wait_until(lambda: newest_seq(collector, "gw-expired") == after.status.seq, 10)
        assert codes(collector, "gw-expired") == set()
        # The status spooled while expired was signed by the old key, whose cert the
        # collector never received as a cert message; it carries that chain in its x5c
        # (signed while offline: mqtt.status_x5c = "on_change"), which the collector
        # judges like a cert message — expired, so untrusted_cert: counted, not lost.
        # Waited for, not read once: when both statuses arrive in one batch the ingest
        # stores the run of statuses first and counts the rejection after it, by
        # design (collector.ingest `_plan`), so the count lags the store by a few ms.
        def refused() -> int:  # this device's only: the broker holds other stories'
            return sum("/gw-expired/" in r.topic
                       for reason in ("untrusted_cert", "unknown_cert")
                       for r in collector.store.rejection_samples(reason))
        assert wait_until(lambda: collector.store.seen_count("gw-expired") + refused()
                          >= 2, 10), (collector.store.seen_count("gw-expired"), refused(),
                                      collector.store.rejection_counts())
    finally:
        agent.shutdown()
