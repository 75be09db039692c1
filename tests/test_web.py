"""The web face over real HTTP: a seeded SQLite store, waitress on a free loopback port.

Each API route is read with urllib and checked against what `fleetseed` wrote;
/metrics is parsed with prometheus_client's own parser; the shipped Prometheus rules
go through `promtool check rules`; the Grafana dashboard only uses metrics we export.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from kit.seed import BROKER_TARGET, CLOUD_TARGET, Pki, seed_fleet
from prometheus_client.parser import text_string_to_metric_families

from certmon.config import loads
from certmon.errors import ConfigError
from collector.config import CollectorConfig, WebConfig
from collector.store import Store, open_store
from collector.storehealth import StoreHealth, came_back, went_down
from collector.web import FleetApi, TrustRequirementView, WebError, WebServer, start_web
from collector.web.app import is_loopback
from collector.web.fleet import build_snapshot
from collector.web.metrics import FleetCollector

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "packaging" / "prometheus" / "certmon-rules.yml"
GRAFANA = ROOT / "packaging" / "grafana" / "certmon-dashboard.json"
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, dict[str, list[str]]]]:
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('web')}/fleet.db")
    seeded = seed_fleet(store, NOW, n=50, seed=1)
    store.count_rejection("bad_signature", at=NOW, topic="certmon/v2/devices/x/status", detail="d",
                          sample=b"x")
    yield store, seeded
    store.close()


def requirements() -> list[TrustRequirementView]:
    pki = Pki.build(NOW, 1)
    return [TrustRequirementView("Fleet Root CA 2", pki.new_root.sha256, "required"),
            TrustRequirementView("Legacy Root CA", pki.old_root.sha256, "retiring")]


class Process:
    """A collector process as /metrics sees it (`ProcessCounters`): counters, a broker
    link the test connects and disconnects, and a store health it sets."""

    def __init__(self) -> None:
        self.connected = True
        self.health = StoreHealth()
        self.held = 0

    def ingest_counts(self) -> dict[str, int]:
        return {"accepted": 50, "rejected": 1}

    def rejected_counts(self) -> dict[str, int]:
        return {"bad_signature": 1}

    def broker_connected(self) -> bool:
        return self.connected

    def store_health(self) -> StoreHealth:
        return self.health

    def backlog(self) -> int:
        return self.held

    def crl_counts(self) -> dict[str, dict[str, int]]:
        return {"refused": {"older": 1}, "fetch_failed": {"unreachable": 3}}


@pytest.fixture(scope="module")
def server(fleet: tuple[Store, dict[str, list[str]]]) -> Iterator[WebServer]:
    srv = start_web(fleet[0], "127.0.0.1:0", now=lambda: NOW, trust_requirements=requirements(),
                    process=Process())
    yield srv
    srv.stop()


def get(srv: WebServer, path: str, auth: str | None = None) -> tuple[int, Message, bytes]:
    """(status, headers (case-insensitive), body), for error statuses too."""
    req = urllib.request.Request(srv.url + path)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


def api(srv: WebServer, path: str) -> Any:
    status, headers, body = get(srv, path)
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)


RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def instants(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and (k.endswith("_at") or k in ("not_after", "not_before")):
                yield v
            yield from instants(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from instants(v)


def test_summary_counts_states(server: WebServer, fleet: tuple[Store, dict[str, list[str]]]) -> None:
    seeded = fleet[1]
    s = api(server, "/api/summary")
    for state in ("ok", "warning", "critical", "offline", "clock"):
        assert s["devices"][state] == len(seeded[state]), state
    assert s["devices"]["total"] == 50
    assert s["alerts_active"] == len(seeded["critical"]) + len(seeded["clock"]) + len(seeded["offline"])
    assert s["rejected"] == {"total": 1, "by_reason": {"bad_signature": 1}}
    assert s["scans"] == {"targets": 2, "failing": 1}
    assert [e["not_after"] for e in s["next_expiries"]] == sorted(e["not_after"] for e in s["next_expiries"])
    assert all(RFC3339.match(t) for t in instants(s))


def test_devices_filter_sort_paginate(server: WebServer, fleet: tuple[Store, dict[str, list[str]]]) -> None:
    seeded = fleet[1]
    crit = api(server, "/api/devices?state=critical")
    assert sorted(d["device_id"] for d in crit["items"]) == sorted(seeded["critical"])
    assert all(d["subject"].startswith("CN=" + d["device_id"]) for d in crit["items"])
    risk = api(server, "/api/devices?state=at_risk&limit=100")
    assert risk["total"] == 50 - len(seeded["ok"])
    assert risk["items"][0]["state"] == "critical"  # default sort: risk
    days = [d["days_left"] for d in api(server, "/api/devices?sort=days_left&limit=1000")["items"]]
    assert days == sorted(days)
    page = api(server, "/api/devices?sort=device&limit=5&offset=5")
    assert [d["device_id"] for d in page["items"]] == [f"gw-01-{i:06d}" for i in range(5, 10)]
    rev = api(server, "/api/devices?sort=-device&limit=1")
    assert rev["items"][0]["device_id"] == "gw-01-000049"
    q = api(server, "/api/devices?q=000007")
    assert [d["device_id"] for d in q["items"]] == ["gw-01-000007"]
    clock = api(server, "/api/devices?state=clock")["items"]
    assert all(d["clock_offset_lo_s"] is not None for d in clock)
    for bad in ("state=nope", "sort=nope", "limit=-1", "limit=99999"):
        status, _, body = get(server, f"/api/devices?{bad}")
        assert status == 400, bad
        assert "error" in json.loads(body)


def test_device_page(server: WebServer, fleet: tuple[Store, dict[str, list[str]]]) -> None:
    dev = fleet[1]["critical"][0]
    d = api(server, f"/api/devices/{dev}")
    assert d["state"] == "critical"
    assert d["status"]["device_id"] == dev and d["status"]["v"] == 1
    roles = {c["role"] for c in d["certificates"]}
    assert {"client", "chain", "broker", "trust"} <= roles
    assert d["alerts"][0]["rule"] == "cert_expiry"
    assert {h["kind"] for h in d["history"]} >= {"first_status", "status_change"}
    assert d["inventory"]["cas"]
    status, _, _ = get(server, "/api/devices/no-such-device")
    assert status == 404


def test_timeline_buckets(server: WebServer, fleet: tuple[Store, dict[str, list[str]]]) -> None:
    t = api(server, "/api/timeline?weeks=12")
    assert len(t["weeks"]) == 12 and t["weeks"][0]["week"] == "2026-W10"
    expired_clients = t["expired"]["certificates"]["client"]
    # Critical devices hold certs in [-6 d, +6 d]; a negative day count means expired.
    assert 1 <= expired_clients <= len(fleet[1]["critical"])
    soon = expired_clients + sum(w["certificates"]["client"] for w in t["weeks"][:2])
    assert soon >= len(fleet[1]["critical"])
    total_clients = expired_clients + t["later"]["certificates"]["client"] + sum(
        w["certificates"]["client"] for w in t["weeks"])
    assert total_clients == 50
    # The Legacy Root (20 days) is a CA bucket; both broker leaves are broker buckets.
    assert sum(w["certificates"]["ca"] for w in t["weeks"][:4]) >= 1
    assert sum(w["certificates"]["broker"] for w in t["weeks"]) >= 2


def test_cas_and_readiness(server: WebServer, fleet: tuple[Store, dict[str, list[str]]]) -> None:
    c = api(server, "/api/cas")
    assert c["devices_with_trust_store"] == 50
    by_name = {r["name"]: r for r in c["requirements"]}
    new = by_name["Fleet Root CA 2"]
    assert new["devices_missing"] == len(fleet[1]["missing_new_root"])
    assert set(new["sample_devices"]) <= set(fleet[1]["missing_new_root"])
    assert by_name["Legacy Root CA"]["devices_holding"] == 40  # every fifth device lacks it
    subjects = {a["subject"] for a in c["cas"]}
    assert "CN=Fleet Devices CA 1,O=Example" in subjects  # the intermediate, via chains


def test_brokers_seen_versus_scanned(server: WebServer, fleet: tuple[Store, dict[str, list[str]]]) -> None:
    b = api(server, "/api/brokers")
    assert {s["target"] for s in b["scanned"]} == {BROKER_TARGET, CLOUD_TARGET}
    failing = next(s for s in b["scanned"] if s["target"] == CLOUD_TARGET)
    assert failing["success"] is False and failing["error"]
    stale = [s for s in b["seen_by_devices"] if s["matches_scan"] is False]
    assert len(stale) == 1 and stale[0]["devices"] == len(fleet[1]["stale_broker"])
    assert b["mismatched_devices"] == len(fleet[1]["stale_broker"])


def test_clock_histogram(server: WebServer, fleet: tuple[Store, dict[str, list[str]]]) -> None:
    c = api(server, "/api/clock")
    assert sum(b["devices"] for b in c["bins"]) + c["no_sample"] == 50
    worst_ids = {w["device_id"] for w in c["worst"][:len(fleet[1]["clock"])]}
    assert worst_ids == set(fleet[1]["clock"])


def test_alerts(server: WebServer, fleet: tuple[Store, dict[str, list[str]]]) -> None:
    a = api(server, "/api/alerts?limit=200")
    assert {x["state"] for x in a["active"]} == {"firing"} and a["active_total"] == len(a["active"])
    assert any(x["state"] == "resolved" for x in a["history"])
    assert all(RFC3339.match(t) for t in instants(a))


def test_page_and_headers(server: WebServer) -> None:
    status, headers, body = get(server, "/")
    assert status == 200 and b'<script src="app.js"' in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b"http" not in re.sub(rb"xmlns=\"http://www.w3.org/2000/svg\"|\"http://www.w3.org/2000/svg\"",
                                 b"", body + get(server, "/app.js")[2])  # no external assets
    assert get(server, "/style.css")[1]["Content-Type"].startswith("text/css")
    assert get(server, "/nope")[0] == 404


def test_metrics(server: WebServer, fleet: tuple[Store, dict[str, list[str]]]) -> None:
    status, headers, body = get(server, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    seeded = fleet[1]
    devices = {s.labels["state"]: s.value for s in fams["certmon_devices"].samples}
    assert devices == {k: float(len(seeded[k])) for k in ("ok", "warning", "critical", "offline", "clock")}
    crit = seeded["critical"][0]
    client_na = [s for s in fams["certmon_cert_not_after_seconds"].samples
                 if s.labels == {"device": crit, "role": "client"}]
    assert len(client_na) == 1 and abs(client_na[0].value - NOW.timestamp()) < 7 * 86400
    online = {s.labels["device"]: s.value for s in fams["certmon_device_online"].samples}
    # Default (web.metrics_per_device = "at_risk"): only offline devices have the series.
    assert online == {d: 0.0 for d in seeded["offline"]}
    offsets = {(s.labels["device"], s.labels["bound"]) for s in
               fams["certmon_device_clock_offset_seconds"].samples}
    assert (seeded["clock"][0], "lo") in offsets and (seeded["clock"][0], "hi") in offsets
    findings = {(s.labels["code"], s.labels["severity"]) for s in fams["certmon_findings"].samples}
    assert ("CLOCK_UNSYNCED", "warning") in findings
    assert {s.labels["reason"]: s.value for s in fams["certmon_ingest_rejected"].samples} == {"bad_signature": 1.0}
    assert {s.labels["result"] for s in fams["certmon_ingest_messages"].samples} == {"accepted", "rejected"}
    assert {s.labels["reason"]: s.value for s in fams["certmon_crl_refused"].samples} == {"older": 1.0}
    assert {s.labels["reason"]: s.value
            for s in fams["certmon_crl_fetch_failures"].samples} == {"unreachable": 3.0}
    assert {s.labels["target"]: s.value for s in fams["certmon_scan_success"].samples} == {
        BROKER_TARGET: 1.0, CLOUD_TARGET: 0.0}
    assert [s.labels["target"] for s in fams["certmon_scan_earliest_expiry_seconds"].samples] == [BROKER_TARGET]
    alerts = {s.labels["severity"]: s.value for s in fams["certmon_alerts_active"].samples}
    assert alerts["critical"] == len(seeded["critical"])
    assert fams["certmon_build_info"].samples[0].labels["version"]
    # No fingerprints or serials as label values: a renewal must not mint a series.
    assert not re.search(rb'="[0-9a-f]{16,}"', body)


def per_device(fams: dict[str, Any], name: str) -> dict[tuple[str, ...], float]:
    """{(other label values..., device): value} of a per-device family."""
    return {(*(v for k, v in sorted(s.labels.items()) if k != "device"), s.labels["device"]):
            s.value for s in fams[name].samples}


def test_metrics_per_device_setting(fleet: tuple[Store, dict[str, list[str]]]) -> None:
    """web.metrics_per_device: "at_risk" (the default) exports per-device series only for
    what puts a device at risk, bounded fleet-level families for the rest; "all" every
    device's series. Both carry the same fleet-level families."""
    store, seeded = fleet
    cfg = loads(CollectorConfig, '[mqtt]\nbroker = "mqtts://b"\n[tls]\nca_bundle = "a"\n'
                'cert = "c"\nkey = "k"\nfleet_ca = ["f"]\n[web]\nmetrics_per_device = "all"\n', source="c.toml",
                check_files=False)
    assert (cfg.web.metrics_per_device, WebConfig().metrics_per_device) == ("all", "at_risk")
    with pytest.raises(ConfigError, match="metrics_per_device"):
        loads(CollectorConfig, '[mqtt]\nbroker = "mqtts://b"\n[tls]\nca_bundle = "a"\n'
              'cert = "c"\nkey = "k"\nfleet_ca = ["f"]\n[web]\nmetrics_per_device = "some"\n', source="c.toml",
              check_files=False)
    snap = build_snapshot(store, NOW, [])
    expo = {mode: FleetCollector(store, per_device=mode, horizon_days=30).exposition(snap)
            for mode in ("at_risk", cfg.web.metrics_per_device)}
    bounded, full = ({f.name: f for f in text_string_to_metric_families(expo[m].decode())}
                     for m in ("at_risk", "all"))
    assert len(expo["at_risk"]) < len(expo["all"]) / 2
    # at_risk: a connection certificate within the horizon, offline, clock in doubt.
    near = per_device(bounded, "certmon_cert_not_after_seconds")
    assert {role for role, _ in near} <= {"client", "chain", "signing"}
    assert all(v < NOW.timestamp() + 30 * 86400 for v in near.values())
    assert {("client", d) for d in seeded["warning"] + seeded["critical"]} <= set(near)
    assert not any(d in seeded["ok"] for _, d in near)
    assert set(per_device(bounded, "certmon_device_online")) == {(d,) for d in seeded["offline"]}
    clocked = {d for _, d in per_device(bounded, "certmon_device_clock_offset_seconds")}
    assert set(seeded["clock"]) <= clocked and not clocked & set(seeded["ok"])
    # all: every device, every role.
    assert len(full["certmon_device_online"].samples) == 50
    assert {r for r, _ in per_device(full, "certmon_cert_not_after_seconds")} >= {
        "client", "chain", "trust", "broker"}
    shown = {mode: fams["certmon_exported_devices"].samples[0] for mode, fams in
             (("at_risk", bounded), ("all", full))}
    assert shown["all"].value == 50 and shown["all"].labels == {"mode": "all"}
    assert shown["at_risk"].value == len({d for *_, d in near} | {d for d in seeded["offline"]}
                                         | clocked)
    # Fleet-level families, the same in both modes: per issuing CA and role, and the
    # days-left histogram (every device in the client role's +Inf bucket).
    for fams in (bounded, full):
        legacy = {s.name: s.value for s in fams["certmon_ca_earliest_not_after_seconds"].samples
                  + fams["certmon_ca_expiring_holders"].samples
                  if s.labels == {"issuer": "CN=Legacy Root CA,O=Example", "role": "trust"}}
        assert legacy["certmon_ca_expiring_holders"] == 40  # 4 in 5 trust it; 20 days left
        assert abs(legacy["certmon_ca_earliest_not_after_seconds"] - NOW.timestamp()
                   - 20 * 86400) < 1
        buckets = {s.labels["le"]: s.value for s in fams["certmon_cert_days_left"].samples
                   if s.name.endswith("_bucket") and s.labels["role"] == "client"}
        assert buckets["+Inf"] == 50 and buckets["0"] == sum(
            1 for (_, d), v in near.items() if v <= NOW.timestamp()) >= 1
        assert buckets["30"] == len({d for r, d in near if r == "client"})


def scrape(srv: WebServer) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(get(srv, "/metrics")[2].decode())}


def test_collector_up_follows_the_broker_link(fleet: tuple[Store, dict[str, list[str]]]) -> None:
    process = Process()
    # snapshot_ttl_s=0: every scrape is a fresh snapshot, so the link state is read anew.
    srv = start_web(fleet[0], "127.0.0.1:0", now=lambda: NOW, process=process,
                    snapshot_ttl_s=0)
    try:
        assert [s.value for s in scrape(srv)["certmon_collector_up"].samples] == [1.0]
        process.connected = False
        assert [s.value for s in scrape(srv)["certmon_collector_up"].samples] == [0.0]
    finally:
        srv.stop()
    # A store served without a collector process has no link to report: no gauge
    # rather than a made-up 1, and the store's persistent rejection totals.
    bare = start_web(fleet[0], "127.0.0.1:0", now=lambda: NOW, snapshot_ttl_s=0)
    try:
        fams = scrape(bare)
        assert "certmon_collector_up" not in fams and "certmon_ingest_messages" not in fams
        assert {s.labels["reason"]: s.value for s in fams["certmon_ingest_rejected"].samples} == {
            "bad_signature": 1.0}
    finally:
        bare.stop()


def test_basic_auth(fleet: tuple[Store, dict[str, list[str]]]) -> None:
    srv = start_web(fleet[0], "127.0.0.1:0", basic_auth=("ops", "s3cret"), now=lambda: NOW)
    try:
        assert get(srv, "/api/summary")[0] == 401
        assert get(srv, "/api/summary", "ops:wrong")[0] == 401
        assert get(srv, "/metrics", "ops:s3cret")[0] == 200
        status, headers, _ = get(srv, "/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert get(srv, "/healthz")[0] == 200  # probes carry no credentials
    finally:
        srv.stop()


def test_non_loopback_without_auth_warns(fleet: tuple[Store, dict[str, list[str]]],
                                         caplog: pytest.LogCaptureFixture) -> None:
    # 192.0.2.1 (TEST-NET-1) is not on this machine: the warning comes before the bind,
    # whose failure is a WebError; the test never listens beyond loopback.
    with pytest.raises(WebError, match=r"cannot listen on 192\.0\.2\.1:0"):
        start_web(fleet[0], "192.0.2.1:0", now=lambda: NOW)
    assert "without basic auth" in caplog.text
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    with pytest.raises(WebError, match="expected host:port"):
        start_web(fleet[0], "nonsense", now=lambda: NOW)


def test_promtool_checks_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        reason = "promtool not found (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
        pytest.skip(reason)
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def exported_metric_names(server: WebServer) -> set[str]:
    body = get(server, "/metrics")[2].decode()
    names = set()
    for fam in text_string_to_metric_families(body):
        names |= {s.name for s in fam.samples}
    return names


def test_rules_and_grafana_use_exported_metrics(server: WebServer) -> None:
    names = exported_metric_names(server)
    dash = json.loads(GRAFANA.read_text())
    assert dash["title"] and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    rules = RULES.read_text()
    exprs += re.findall(r"expr: \|?\s*(.+)", rules)
    for expr in exprs:
        used = set(re.findall(r"\bcertmon_[a-z_]+", expr))
        assert used, expr
        assert used <= names, f"{expr}: unknown {used - names}"


def test_snapshot_is_served_stale_while_a_rebuild_runs(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/small.db")
    seed_fleet(store, NOW, n=5, seed=2, alerts=False)
    clock = [0.0]
    fleet_api = FleetApi(store, now=lambda: NOW, snapshot_ttl_s=10.0, monotonic=lambda: clock[0])
    first = fleet_api.snapshot()
    assert fleet_api.snapshot() is first  # within the TTL
    seed_fleet(store, NOW, n=8, seed=2, alerts=False)  # three more devices
    clock[0] = 11.0
    assert fleet_api.snapshot() is first  # stale, served at once; rebuild started
    deadline = time.monotonic() + 10
    while fleet_api.snapshot() is first and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fleet_api.snapshot().devices) == 8
    store.close()


def test_a_store_outage_shows_in_metrics_api_and_page(
        fleet: tuple[Store, dict[str, list[str]]]) -> None:
    """The process's store health is read on every scrape, not once per snapshot (during
    an outage no snapshot can be rebuilt): /metrics and /api/health say so at once, and
    after it the last outage is shown. (The views' behaviour against a stopped database
    is tests/test_faults_postgres.py's.)"""
    process = Process()
    srv = start_web(fleet[0], "127.0.0.1:0", now=lambda: NOW, process=process)
    try:
        fams = scrape(srv)
        assert [s.value for s in fams["certmon_collector_store_up"].samples] == [1.0]
        assert api(srv, "/api/health")["store"]["up"] is True
        process.health = went_down(process.health, NOW, "OperationalError", 20)
        process.held = 57
        fams = scrape(srv)
        assert [s.value for s in fams["certmon_collector_store_up"].samples] == [0.0]
        assert [s.value for s in fams["certmon_collector_ingest_backlog_messages"].samples] == [
            57.0]
        assert [s.value for s in fams["certmon_collector_store_outages"].samples] == [1.0]
        assert [s.value for s in fams["certmon_collector_store_down_since_seconds"].samples] \
            == [NOW.timestamp()]
        assert "certmon_devices" in fams  # the fleet part: the memoised snapshot's
        health = api(srv, "/api/health")
        assert health["store"] == {"up": False, "since": "2026-03-02T12:00:00Z", "down_s": 0.0,
                                   "error": "OperationalError", "held": 57, "outages": 1,
                                   "last_outage": None}
        process.health = came_back(process.health, NOW.replace(minute=1), "collector-a")
        process.held = 0
        last = api(srv, "/api/health")["store"]["last_outage"]
        assert last == {"started_at": "2026-03-02T12:00:00Z", "ended_at": "2026-03-02T12:01:00Z",
                        "duration_s": 60.0, "messages_held": 20, "error": "OperationalError"}
        fams = scrape(srv)
        assert [s.value for s in fams["certmon_collector_store_last_outage_seconds"].samples] \
            == [60.0]
        assert "certmon_collector_store_down_since_seconds" not in fams
        page = get(srv, "/")[2].decode()
        assert 'id="store-banner"' in page
        assert "store-banner" in get(srv, "/app.js")[2].decode()
    finally:
        srv.stop()
    bare = start_web(fleet[0], "127.0.0.1:0", now=lambda: NOW, snapshot_ttl_s=0)
    try:
        assert api(bare, "/api/health") == {"generated_at": "2026-03-02T12:00:00Z", "store": None,
                                            "backlog": None, "broker_connected": None}
        assert "certmon_collector_store_up" not in scrape(bare)
    finally:
        bare.stop()


def test_a_running_collector_exports_what_web_metrics_per_device_says(
        fleet_broker: Any, tmp_path: Path) -> None:
    """The setting reaches the collector's own /metrics (wiring → start_web)."""
    from conftest import collector_config

    from collector.wiring import build_collector

    served: dict[str, set[str]] = {}
    for mode in ("at_risk", "all"):
        work = tmp_path / mode
        work.mkdir()
        store = open_store(f"sqlite:///{work}/certmon.db")
        seed_fleet(store, datetime.now(UTC), n=20, seed=2)
        store.close()
        config = collector_config(fleet_broker, work, **{"web.metrics_per_device": mode})
        service = build_collector(config, web=True)
        try:
            assert service.web_url is not None
            with urllib.request.urlopen(service.web_url.rstrip("/") + "/metrics",
                                        timeout=30) as resp:
                text = resp.read().decode()
        finally:
            service.close()
        served[mode] = {s.labels["device"] for f in text_string_to_metric_families(text)
                        if f.name == "certmon_device_online" for s in f.samples}
    assert served["at_risk"] < served["all"] and len(served["all"]) == 20
