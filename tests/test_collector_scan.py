"""The collector scans its configured broker endpoints on a schedule: each verdict is
stored next to what devices report seeing, and a broker certificate about to expire
raises an alert before any device has to notice."""

from __future__ import annotations

from pathlib import Path

from conftest import Fleet, ScenarioBroker
from kit.broker import wait_until

from certmon.config import loads
from collector.config import CollectorConfig
from collector.wiring import build_collector


def test_scheduled_scan_stores_verdicts_and_alerts_on_an_expiring_broker(
    fleet_broker: Fleet, scenario_broker: ScenarioBroker, tmp_path: Path
) -> None:
    creds = fleet_broker.collector_credentials(tmp_path / "collector")
    fleet_ca = tmp_path / "fleet-ca.pem"
    fleet_ca.write_bytes(fleet_broker.root.cert_pem())
    # One bundle for the collector's broker connection and for judging scanned brokers.
    bundle = tmp_path / "brokers.pem"
    bundle.write_bytes(creds.ca_bundle_path.read_bytes()
                       + scenario_broker.trust_paths["expiring_leaf_3d"].read_bytes())
    text = f"""
[[scan_targets]]
host = "127.0.0.1"
port = {fleet_broker.tls_port}
servername = "localhost"
mqtt = true

[[scan_targets]]
host = "127.0.0.1"
port = {scenario_broker.ports["expiring_leaf_3d"]}
servername = "localhost"
mqtt = true  # a broker: also a clean MQTT CONNECT, and its leaf judged as a broker's
"""
    config = loads(CollectorConfig, text, source="<test>", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{fleet_broker.operations_port}",
        "tls.ca_bundle": str(bundle), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "tls.fleet_ca": str(fleet_ca),
        "store.url": f"sqlite:///{tmp_path / 'certmon.db'}", "web.listen": "127.0.0.1:0",
        "mqtt.client_id": f"scan-{tmp_path.name}"})
    service = build_collector(config)
    try:
        scan = next(job.run for job in service.jobs if job.name == "scan")
        scan()  # starts the scan in its own thread, as the service's tick does
        assert wait_until(lambda: len(service.store.scans()) == 2, 30)
        assert wait_until(lambda: any(a.labels.get("scope") == "scan"
                                      for a in service.store.active_alerts()), 10)
        scans = {s.target: s for s in service.store.scans()}
        ok = scans[f"localhost@127.0.0.1:{fleet_broker.tls_port}"]
        soon = scans[f"localhost@127.0.0.1:{scenario_broker.ports['expiring_leaf_3d']}"]
        assert ok.severity == 0, ok.result_json
        assert soon.severity == 2, soon.result_json
        alerts = [a for a in service.store.active_alerts() if a.labels.get("scope") == "scan"]
        assert [(a.rule, a.labels["target"]) for a in alerts] == [
            ("BROKER_CERT_EXPIRING", soon.target)]
        assert alerts[0].labels["category"] == "broker"
    finally:
        service.close()
