"""`run` on a broker host (`[broker]` in agent.toml): the agent judges the broker's own
files and listeners, its signed status carries them (`broker_host`), and the collector
stores, alerts, shows (dashboard Brokers section, /metrics, `report`) what it said.

Real parts: the fleet Mosquitto the agent reports to, a second Mosquitto that is the
judged broker (its certfile replaced after start, its CRL expiring in 2 days), the
real agent service and a collector built by `collector.wiring.build_collector` on
SQLite. PKI dates derive from the real now (the service reads the real clock there);
the `check_every_s` test injects a clock.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import Fleet, MosquittoFactory, collector_config
from kit.broker import Listener, Mosquitto, wait_until
from kit.pki import PKIFactory, write_bundle, write_crls
from prometheus_client.parser import text_string_to_metric_families

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import pki
from certmon import wire as p
from certmon.clock import FixedClock
from certmon.config import loads
from certmon.errors import ConfigError
from collector import brokers
from collector.cli import build_report, render_report
from collector.service import CollectorService, Periodic
from collector.web.api import FleetApi
from collector.web.metrics import FleetCollector
from collector.wiring import build_collector

NOW = datetime.now(UTC).replace(microsecond=0)


def _agent_config(creds: object, port: int, state: Path, **broker: str) -> AgentConfig:
    return loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{port}",
        "tls.ca_bundle": str(creds.ca_bundle_path),  # type: ignore[attr-defined]
        "tls.cert": str(creds.cert_path), "tls.key": str(creds.key_path),  # type: ignore[attr-defined]
        "agent.state_dir": str(state), "agent.interval_s": "60",
        **{f"broker.{k}": v for k, v in broker.items()}})


@pytest.fixture
def own_fleet(fleet_broker: Fleet, mosquitto_factory: MosquittoFactory,
              tmp_path: Path) -> Mosquitto:
    """A private fleet broker in the documented configuration: the broker host's
    statuses are retained, and must not reach other tests' collectors."""
    documented = fleet_broker.documented(tmp_path / "own-fleet")
    return mosquitto_factory(documented.listeners, extra_conf=documented.global_conf)


@pytest.fixture
def collector(fleet_broker: Fleet, own_fleet: Mosquitto,
              tmp_path: Path) -> Iterator[CollectorService]:
    operations = f"mqtts://127.0.0.1:{own_fleet.listeners[1].port}"
    service = build_collector(
        collector_config(fleet_broker, tmp_path, **{"mqtt.broker": operations}), web=False,
        periodic=Periodic(beacon_every_s=0.2, silence_every_s=0.2, summary_every_s=0.2,
                          fleet_sweep_every_s=0.2))
    service.start()
    assert service.link.wait_connected(10)
    yield service
    service.close()


def test_a_broker_host_reports_its_own_files_and_the_collector_shows_them(
    fleet_broker: Fleet, own_fleet: Mosquitto, collector: CollectorService,
    mosquitto_factory: MosquittoFactory, tmp_path: Path,
) -> None:
    # The judged broker: started with the old certificate, renewed on disk afterwards
    # (certbot without the restart), and a crlfile whose nextUpdate is 2 days away.
    factory = PKIFactory(NOW)
    root = factory.root("Host Broker Root")
    old = factory.leaf(root, "broker.test", usage="server", days=20, name="old")
    new = factory.leaf(root, "broker.test", usage="server", days=90, name="new")
    cert, key = tmp_path / "broker.crt", tmp_path / "broker.key"
    cert.write_bytes(old.cert_pem())
    key.write_bytes(old.key_pem())
    os.chmod(key, 0o600)
    cafile = write_bundle(tmp_path / "ca.pem", [root])
    next_update = NOW + timedelta(days=2)
    crlfile = write_crls(tmp_path / "devices.crl", [
        factory.crl(root, this_update=NOW - timedelta(days=5), next_update=next_update)])
    judged = mosquitto_factory([Listener(tls=True, certfile=cert, keyfile=key, cafile=cafile,
                                         require_certificate=True, extra=f"crlfile {crlfile}")])
    cert.write_bytes(new.cert_pem())
    key.write_bytes(new.key_pem())

    creds = fleet_broker.device_credentials("bh-01", tmp_path / "bh", days=365)
    agent = AgentService(_agent_config(creds, own_fleet.listeners[0].port, tmp_path / "state",
                                       config=str(judged.conf_path)))
    try:
        agent.connect(10)
        result = agent.report_once()
        assert agent.wait_delivered(15)
    finally:
        agent.shutdown()
    part = result.status.broker_host
    assert part is not None and part.kind == "mosquitto"
    assert part.config == str(judged.conf_path) and part.severity == pki.Severity.CRITICAL
    codes = {f.code for f in result.status.findings}
    assert {"BROKER_CERT_NOT_RELOADED", "CRL_EXPIRING"} <= codes, codes
    # ~5.2 KB measured here (long pytest paths, two listeners); the limit is 16 KiB.
    assert len(result.token) < p.MAX_STATUS_JWS_BYTES // 2

    store = collector.store
    assert wait_until(lambda: (r := store.device("bh-01")) is not None and r.status_json
                      and '"broker_host"' in r.status_json, 15), collector.ingestor.rejected
    row = store.device("bh-01")
    assert row is not None and {"BROKER_CERT_NOT_RELOADED", "CRL_EXPIRING"} <= {
        f.code for f in row.findings}
    # Alerts: the broker host's findings alert like a device's own.
    assert wait_until(lambda: collector.tick() or {
        a.rule for a in store.active_alerts() if a.device_id == "bh-01"} >= {
        "BROKER_CERT_NOT_RELOADED", "CRL_EXPIRING"}, 10), store.active_alerts()

    # The dashboard's Brokers section: listener, files, CRL nextUpdate, drift.
    old_facts = pki.parse_bundle(old.cert_pem(), "old").certs[0].facts
    new_facts = pki.parse_bundle(new.cert_pem(), "new").certs[0].facts
    api = FleetApi(store, now=lambda: NOW, snapshot_ttl_s=0)
    (host,) = api.brokers()["hosts"]
    assert host["device_id"] == "bh-01" and host["severity"] == "CRITICAL"
    (listener,) = [e for e in host["endpoints"] if e["is_tls"]]
    assert listener["is_reloaded"] is False and host["not_reloaded"] == [listener["name"]]
    assert listener["served"]["ref"] == old_facts.sha256[:16]
    by_directive = {f["directive"]: f for f in listener["files"]}
    assert by_directive["certfile"]["certs"][0]["ref"] == new_facts.sha256[:16]
    (crl,) = by_directive["crlfile"]["crls"]
    assert crl["next_update"] == pki.iso_utc(next_update) and crl["days_left"] == 2.0
    assert by_directive["crlfile"]["at"].startswith(f"{judged.conf_path}:")
    assert by_directive["crlfile"]["severity"] == "CRITICAL"

    # /metrics.
    # Compared as numbers: the exposition writes 1796352720.0 as 1.79635272e+09, so a
    # string with a fixed count of digits fails whenever the instant ends in a zero.
    text = FleetCollector(store).exposition(api.snapshot()).decode()
    samples = {(fam.name, tuple(sorted(smp.labels.items()))): smp.value
               for fam in text_string_to_metric_families(text) for smp in fam.samples}
    assert samples[("certmon_broker_crl_next_update_seconds",
                    (("device", "bh-01"), ("file", str(crlfile))))] == next_update.timestamp()
    assert samples[("certmon_broker_cert_not_reloaded",
                    (("device", "bh-01"), ("listener", listener["name"])))] == 1.0
    assert samples[("certmon_broker_served_not_after_seconds",
                    (("device", "bh-01"), ("listener", listener["name"])))] \
        == old_facts.not_after.timestamp()

    # `certmon-collector report`.
    report = build_report(store, NOW, 30)
    rows = {r["what"]: r for r in report["broker_hosts"]}  # type: ignore[attr-defined]
    assert rows["crl"]["next_update"] == pki.iso_utc(next_update)
    assert rows["not_reloaded"]["served_not_after"] == pki.iso_utc(old_facts.not_after)
    out = io.StringIO()
    render_report(json.loads(json.dumps(report)), out)
    assert f"crl nextUpdate {pki.iso_utc(next_update)}  {crlfile}" in out.getvalue()
    assert "renewed, not reloaded" in out.getvalue()

    # The page itself, in a real headless Chromium (skipped without one, as in
    # tests/test_dashboard_browser.py): the hosts table, no script error.
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return
    from test_dashboard_browser import Dom, console_lines, run_chromium

    from collector.web import start_web

    web = start_web(store, "127.0.0.1:0")
    try:
        (tmp_path / "browser").mkdir()
        html, stderr = run_chromium(browser, tmp_path / "browser", web.url + "/", "--dump-dom")
    finally:
        web.stop()
    assert console_lines(stderr) == [], "\n".join(console_lines(stderr))
    hosts = Dom(html).text_by_id["hosts-table"]
    assert "renewed on disk, not reloaded" in hosts
    assert f"nextUpdate {pki.iso_utc(next_update).replace('T', ' ').replace('Z', ' UTC')}" \
        in hosts, hosts
    assert f"crlfile {crlfile}" in hosts


def test_check_every_s_reuses_the_last_judgement_until_it_is_due(tmp_path: Path) -> None:
    factory = PKIFactory(NOW)
    root = factory.root("Every Root")
    device = factory.leaf(root, "bh-02", usage="client", days=200)
    cert, key = device.write(tmp_path / "device")
    ca = write_bundle(tmp_path / "ca.pem", [root])
    crlfile = tmp_path / "devices.crl"

    def write_crl(days: int) -> datetime:
        write_crls(crlfile, [factory.crl(root, this_update=NOW - timedelta(days=1),
                                         next_update=NOW + timedelta(days=days))])
        return NOW + timedelta(days=days)

    first = write_crl(40)
    conf = tmp_path / "mosquitto.conf"
    # No certfile: not a TLS listener, so no handshake is tried.
    conf.write_text(f"listener 1 127.0.0.1\ncafile {ca}\ncrlfile {crlfile}\n")
    creds = dataclasses.make_dataclass("C", ["ca_bundle_path", "cert_path", "key_path"])(
        ca, cert, key)
    config = _agent_config(creds, 1, tmp_path / "state", config=str(conf), check_every_s="600")
    clock = FixedClock(NOW, 1000.0)
    agent = AgentService(config, clock=clock)

    def next_update() -> datetime | None:
        part = agent.cycle(sign=False).status.broker_host
        assert part is not None
        files = {f.directive: f for f in part.endpoints[0].files}
        return files["crlfile"].crls[0].next_update

    assert next_update() == first
    second = write_crl(1)
    clock.advance(599)
    assert next_update() == first  # within check_every_s: the last judgement
    clock.advance(1)
    assert next_update() == second
    assert "CRL_EXPIRING" in {f.code for f in agent.cycle(sign=False).status.findings}
    # Without [broker] config there is no part at all: the status is as before.
    plain = AgentService(dataclasses.replace(config, broker=dataclasses.replace(
        config.broker, config=None)), clock=clock)
    assert plain.cycle(sign=False).status.broker_host is None
    with pytest.raises(ConfigError, match="check_every_s"):
        _agent_config(creds, 1, tmp_path / "state", check_every_s="5")


def test_the_part_round_trips_matches_the_schema_and_old_statuses_keep_their_bytes() -> None:
    import importlib.resources

    import jsonschema
    from test_protocol import GOLDEN, golden_status

    t = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    part = p.BrokerHostState(
        kind="mosquitto", config="/etc/mosquitto/mosquitto.conf", checked_at=t,
        severity=pki.Severity.CRITICAL, files_read=2, endpoints=(p.BrokerEndpointState(
            kind="listener", name="listener 8883", at="/etc/mosquitto/conf.d/tls.conf:1",
            port=8883, is_tls=True, require_certificate=True, files=(p.BrokerFile(
                directive="crlfile", path="/etc/mosquitto/devices.crl",
                at="/etc/mosquitto/conf.d/tls.conf:5", severity=pki.Severity.CRITICAL,
                cert_count=0, certs=(), crls=(p.CrlBrief(
                    issuer="CN=Devices", this_update=t, next_update=t + timedelta(days=2),
                    crl_number=7, revoked_count=1, signed_by="Devices"),)),),
            served=p.CertBrief(ref="0" * 16, subject="broker", not_after=t),
            served_error=None, is_reloaded=False),))
    status = dataclasses.replace(golden_status(), broker_host=part)
    data = p.encode_status(status)
    assert p.decode_status(data) == status
    text = importlib.resources.files("certmon").joinpath("schemas/status-v1.json").read_text()
    jsonschema.Draft202012Validator(json.loads(text)).validate(json.loads(data))
    assert p.encode_status(golden_status()) == (GOLDEN / "status-v1.json").read_bytes()
    assert p.decode_status((GOLDEN / "status-v1.json").read_bytes()).broker_host is None
    # The collector reads it back from the stored JSON; a part it cannot decode is
    # skipped, not an error.
    view = brokers.broker_host_of("bh", data.decode())
    assert view is not None and view.state == part
    broken = data.decode().replace('"files_read":2', '"files_read":"two"')
    assert brokers.broker_host_of("bh", broken) is None


def test_a_part_too_large_keeps_its_most_severe_endpoints(tmp_path: Path) -> None:
    from agent.brokerhost import mosquitto
    from agent.brokerhost.inventory import inspect_broker
    from agent.brokerhost.statuspart import status_part

    conf = tmp_path / "mosquitto.conf"
    lines = [f"listener {1000 + i} 127.0.0.1\ncafile {tmp_path}/ca-{i}.pem\n" for i in range(12)]
    conf.write_text("".join(lines) + f"listener 2000 127.0.0.1\ncrlfile {tmp_path}/gone.crl\n")
    report = inspect_broker(mosquitto.read_config(conf), NOW, pki.Policy(), prober=None)
    full = status_part(report, max_bytes=1_000_000)
    assert len(full.endpoints) == 13
    small = status_part(report, max_bytes=2000)
    assert 1 <= len(small.endpoints) < 13
    assert len(json.dumps(small.to_json())) <= 2000
    # Every file is missing (CRITICAL) but the crlfile's: which one survives is decided
    # by severity, then by config order.
    assert small.endpoints[0].name == full.endpoints[0].name
