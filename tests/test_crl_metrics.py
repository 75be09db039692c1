"""A fleet CRL going stale shows on /metrics: a collector whose `tls.fleet_crl_urls`
cannot be fetched and whose `tls.fleet_crl` file is garbage keeps the last good CRL
in force (collector.revocation) and says so in `certmon_crl_fetch_failures_total` and
`certmon_crl_refused_total`, which a Prometheus rule can alert on."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from conftest import Fleet, collector_config
from kit.broker import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from collector.service import Periodic
from collector.wiring import build_collector


def counters(url: str, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        fams = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    return {s.labels["reason"]: s.value for s in fams[name].samples
            if s.name.endswith("_total")}


def test_unfetchable_and_unreadable_fleet_crls_are_counted_on_metrics(
        fleet_broker: Fleet, tmp_path: Path) -> None:
    garbage = tmp_path / "fleet.crl"
    garbage.write_text("<html>maintenance</html>")
    closed = free_port()  # nothing listens there: the fetch fails at once
    service: Any = build_collector(collector_config(fleet_broker, tmp_path, **{
        "tls.fleet_crl": str(garbage),
        "tls.fleet_crl_urls": f"http://127.0.0.1:{closed}/devices.crl",
        "tls.crl_fetch_timeout_s": "1", "web.listen": "127.0.0.1:0"}),
        periodic=Periodic(fleet_sweep_every_s=0.1))
    try:
        assert service.web_url
        assert wait_until(lambda: (service.tick(), bool(
            counters(service.web_url, "certmon_crl_fetch_failures")))[1], 10)
        # Every reason is there from 0: the first refusal is a rise increase() sees.
        failures = counters(service.web_url, "certmon_crl_fetch_failures")
        assert failures["unreachable"] >= 1 and failures["timeout"] == 0
        assert set(failures) == {"timeout", "http_status", "redirect", "too_large",
                                 "unreachable"}
        assert counters(service.web_url, "certmon_crl_refused") == {
            "unreadable": 1.0, "unverified": 0.0, "older": 0.0}
    finally:
        service.close()


def test_no_crl_families_without_fleet_crls(fleet_broker: Fleet, tmp_path: Path) -> None:
    service: Any = build_collector(collector_config(fleet_broker, tmp_path, **{
        "web.listen": "127.0.0.1:0"}))
    try:
        with urllib.request.urlopen(f"{service.web_url}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert "certmon_crl_" not in body and "certmon_collector_up" in body
    finally:
        service.close()
