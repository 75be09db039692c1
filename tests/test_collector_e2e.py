"""The operator's story, end to end through a real Mosquitto over mTLS.

Four gateways run the real agent code: a healthy one, one whose certificate expires
in 5 days, one whose intermediate CA expires before its leaf, and one whose wall
clock is two days behind while its certificate is fine. One collector on SQLite
verifies and stores what they send. The operator must see each for what it is —
in particular the clock case as a clock problem — and see it resolve when fixed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from conftest import DeviceCreds, Fleet
from kit.broker import wait_until

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import clock as wallclock
from certmon.config import loads
from collector.service import CollectorService

CLOCK_DATA = Path(__file__).parent / "data" / "clock"
CHRONY_2D_BEHIND = (CLOCK_DATA / "chronyc-tracking-behind-2d.csv").read_text()
CHRONY_SYNCED = (CLOCK_DATA / "chronyc-tracking-normal.csv").read_text()


def agent(creds: DeviceCreds, port: int, state: Path, **kw: Any) -> AgentService:
    config = loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{port}", "tls.ca_bundle": str(creds.ca_bundle_path),
        "tls.cert": str(creds.cert_path), "tls.key": str(creds.key_path),
        "agent.state_dir": str(state), "agent.interval_s": "60"})
    return AgentService(config, **kw)


def chrony_synced(argv: Sequence[str]) -> str | None:
    # This machine's kernel clock reports "unsynced" (no NTP in a container): the
    # gateways in this story have a working chrony.
    return CHRONY_SYNCED if argv[0] == "chronyc" else None


def chrony_says_2d_behind(argv: Sequence[str]) -> str | None:
    return CHRONY_2D_BEHIND if argv[0] == "chronyc" else None


def deliver(*agents: AgentService) -> None:
    for a in agents:
        a.connect(10)
        a.report_once()
    for a in agents:
        assert a.wait_delivered(15), a.link.state.last_error if a.link else "no link"


def test_four_gateways_are_stored_and_classified(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path
) -> None:
    pki = fleet_broker.pki
    now = pki.now
    healthy = fleet_broker.device_credentials("gw-healthy", tmp_path / "h", days=365)
    expiring = fleet_broker.device_credentials("gw-expiring", tmp_path / "e", days=5)
    short_ca = pki.intermediate(fleet_broker.root, "short-lived-devices",
                                not_after=now + timedelta(days=20))
    leaf = pki.leaf(short_ca, "gw-short-ca", days=300)
    cert_path, key_path = leaf.write(tmp_path / "s", chain=True)
    short = DeviceCreds(cert_path, key_path, fleet_broker.ca_bundle_path, "gw-short-ca")
    behind = fleet_broker.device_credentials("gw-clock", tmp_path / "c", days=365,
                                             not_before=now - timedelta(hours=12))
    agents = [
        agent(healthy, fleet_broker.mtls_port, tmp_path / "sh", runner=chrony_synced),
        agent(expiring, fleet_broker.mtls_port, tmp_path / "se", runner=chrony_synced),
        agent(short, fleet_broker.mtls_port, tmp_path / "ss", runner=chrony_synced),
        agent(behind, fleet_broker.mtls_port, tmp_path / "sc", runner=chrony_says_2d_behind,
              clock=wallclock.OffsetClock(wallclock.SystemClock(), timedelta(days=-2))),
    ]
    try:
        deliver(*agents)
        store = collector.store
        ids = ["gw-healthy", "gw-expiring", "gw-short-ca", "gw-clock"]
        # (A row can exist before its first status: the online message creates it.)
        assert wait_until(lambda: all((r := store.device(d)) is not None and r.status_json
                                      for d in ids), 15), \
            collector.ingestor.rejected
        rows = {d: store.device(d) for d in ids}
        assert rows["gw-healthy"].severity == 0 and rows["gw-healthy"].worst_code is None  # type: ignore[union-attr]
        assert rows["gw-expiring"].worst_code == "CERT_EXPIRING"  # type: ignore[union-attr]
        assert rows["gw-expiring"].severity == 2  # 5 days < crit_days  # type: ignore[union-attr]
        short_codes = {f.code for f in rows["gw-short-ca"].findings}  # type: ignore[union-attr]
        assert "INTERMEDIATE_EXPIRES_BEFORE_LEAF" in short_codes, rows["gw-short-ca"].status_json  # type: ignore[union-attr]
        clock_codes = {f.code for f in rows["gw-clock"].findings}  # type: ignore[union-attr]
        assert "CLOCK_BEHIND" in clock_codes
        assert not clock_codes & {"CERT_NOT_YET_VALID", "CHAIN_INVALID"}
        # The collector's own measurement agrees: the device clock is ~2 days behind.
        lo = rows["gw-clock"].clock_offset_lo_s  # type: ignore[union-attr]
        assert lo is not None and -2 * 86400 - 60 < lo < -2 * 86400 + 60
        # Certificates are stored with their roles; expiry queries see the short CA.
        soon = store.certificates_expiring_before(now + timedelta(days=30))
        subjects = {(h.device_id, h.cert.subject) for h in soon}
        assert ("gw-expiring", "CN=gw-expiring") in subjects
        assert ("gw-short-ca", "CN=short-lived-devices") in subjects
        assert collector.ingestor.rejected == {}
        assert store.seen_count("gw-healthy") == 1

        # Alerts: the right ones, with the right classification.
        def firing() -> dict[tuple[str, str | None], Any]:
            return {(a.rule, a.device_id): a for a in store.active_alerts()}

        assert wait_until(lambda: ("CLOCK_BEHIND", "gw-clock") in firing(), 10), firing()
        alerts = firing()
        assert alerts[("CERT_EXPIRING", "gw-expiring")].labels["category"] == "certificate"
        assert alerts[("CERT_EXPIRING", "gw-expiring")].severity == 2
        assert alerts[("CLOCK_BEHIND", "gw-clock")].labels["category"] == "clock"
        assert not {rule for rule, dev in alerts if dev == "gw-clock"} - {
            "CLOCK_BEHIND", "CLOCK_IMPLAUSIBLE"}  # a clock problem, not a certificate one
        assert ("INTERMEDIATE_EXPIRES_BEFORE_LEAF", "gw-short-ca") in alerts
        assert not any(dev == "gw-healthy" for _, dev in alerts)

        # Renewing the expiring certificate on disk resolves its alert.
        renewed = fleet_broker.device_credentials("gw-expiring", tmp_path / "e2", days=365,
                                                  name="gw-expiring-renewed")
        expiring.cert_path.write_bytes(renewed.cert_path.read_bytes())
        expiring.key_path.write_bytes(renewed.key_path.read_bytes())
        agents[1].report_once()
        assert agents[1].wait_delivered(15)
        assert wait_until(lambda: ("CERT_EXPIRING", "gw-expiring") not in firing(), 10)
        history = store.alert_history("gw-expiring")
        assert any(a.rule == "CERT_EXPIRING" and a.state == "resolved" for a in history)
    finally:
        for a in agents:
            a.shutdown()


def test_a_killed_agent_is_marked_offline(
    fleet_broker: Fleet, collector: CollectorService, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("gw-doomed", tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--broker",
         f"mqtts://127.0.0.1:{fleet_broker.mtls_port}", "--ca-bundle", str(creds.ca_bundle_path),
         "--cert", str(creds.cert_path), "--key", str(creds.key_path),
         "--state-dir", str(tmp_path / "state"), "--interval-s", "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = collector.store
    try:
        assert wait_until(lambda: (row := store.device("gw-doomed")) is not None
                          and row.is_online and row.status_json, 20)
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not store.device("gw-doomed").is_online, 10)  # type: ignore[union-attr]
        assert wait_until(lambda: any(a.rule == "DEVICE_OFFLINE" and a.device_id == "gw-doomed"
                                      for a in store.active_alerts()), 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
