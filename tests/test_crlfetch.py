"""`tls.fleet_crl_urls`: the collector fetches the fleet CAs' CRLs from their
distribution points over HTTP, with a timeout, a cache and the last good copy kept.

A real HTTP server on loopback (http.server, free port) serves the CRL, answers 404,
or holds the request open (the timeout); the cache's clock is injected. The end to
end test: a revoked device that still reports raises CERT_REVOKED from a CRL that
only the URL gives (real Mosquitto, real agent, `build_collector`).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, MosquittoFactory, collector_config
from cryptography.hazmat.primitives import serialization
from kit.broker import Mosquitto, wait_until
from kit.pki import write_bundle

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import pki
from certmon.config import loads
from certmon.errors import ConfigError
from collector.config import CollectorConfig
from collector.crlfetch import CrlSource, fetch
from collector.revocation import FleetCrls
from collector.service import Periodic
from collector.wiring import build_collector


@dataclass
class CrlServer:
    url: str
    files: dict[str, bytes] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def crl_server() -> Iterator[CrlServer]:
    state = CrlServer("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits.append(self.path)
            if self.path == "/hang":
                state.release.wait(10)  # holds the request open until teardown
                return
            body = state.files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


def _crl(fleet: Fleet, revoked: tuple[Any, ...] = (), number: int = 1) -> bytes:
    now = fleet.pki.now
    return fleet.pki.crl(fleet.devices_ca, this_update=now, next_update=now + timedelta(days=30),
                         revoked=revoked, number=number).public_bytes(serialization.Encoding.DER)


def test_fetch_answers_bodies_and_says_why_not(crl_server: CrlServer, fleet_broker: Fleet) -> None:
    crl_server.files["/fleet.crl"] = _crl(fleet_broker)
    got = fetch(f"{crl_server.url}/fleet.crl", 5)
    assert got.body == crl_server.files["/fleet.crl"] and got.error is None
    missing = fetch(f"{crl_server.url}/gone.crl", 5)
    assert (missing.body, missing.reason, missing.error) == (None, "http_status",
                                                             "HTTP 404 Not Found")
    hung = fetch(f"{crl_server.url}/hang", 0.3)
    assert (hung.reason, hung.error) == ("timeout", "no answer within 0.3 s")
    with socket_closed() as port:
        refused = fetch(f"http://127.0.0.1:{port}/x.crl", 2)
    assert refused.reason == "unreachable" and "refused" in (refused.error or "").lower()


class socket_closed:
    """A loopback port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_the_cache_fetches_every_s_and_keeps_the_last_good_copy(
    crl_server: CrlServer, fleet_broker: Fleet
) -> None:
    crl_server.files["/fleet.crl"] = first = _crl(fleet_broker)
    url = f"{crl_server.url}/fleet.crl"
    mono = [0.0]
    source = CrlSource([url], timeout_s=2, every_s=600, monotonic=lambda: mono[0])
    assert source.bodies() == [(url, first)]
    crl_server.files["/fleet.crl"] = second = _crl(fleet_broker, number=2)
    mono[0] = 599
    assert source.bodies() == [(url, first)] and len(crl_server.hits) == 1  # cached
    mono[0] = 600
    assert source.bodies() == [(url, second)] and len(crl_server.hits) == 2
    del crl_server.files["/fleet.crl"]  # the CDP server breaks
    mono[0] = 1200
    assert source.bodies() == [(url, second)]  # the last good copy
    assert source.failures == {"http_status": 1}
    mono[0] = 1259  # a failed URL is retried after a tenth of every_s
    source.bodies()
    assert len(crl_server.hits) == 3
    mono[0] = 1260
    source.bodies()
    assert len(crl_server.hits) == 4 and source.failures == {"http_status": 2}
    # Parsed with the fleet CAs: a URL's CRL counts as a file's does.
    cas = pki.parse_bundle(fleet_broker.devices_ca.cert_pem(), "ca").certs
    (crl,) = FleetCrls((), cas, source).current()
    assert crl.crl_number == 2 and crl.signed_by_sha256 == cas[0].facts.sha256


def test_only_http_urls_and_sane_timeouts_are_accepted() -> None:
    base = {"mqtt.broker": "mqtts://b.example", "tls.ca_bundle": "/dev/null",
            "tls.cert": "/dev/null", "tls.key": "/dev/null", "tls.fleet_ca": "/dev/null"}
    with pytest.raises(ConfigError, match="fleet_crl_urls"):
        loads(CollectorConfig, "", overrides={**base, "tls.fleet_crl_urls": "ldap://x/crl"})
    with pytest.raises(ConfigError, match="crl_fetch_timeout_s"):
        loads(CollectorConfig, "", overrides={**base, "tls.crl_fetch_timeout_s": "0"})


@pytest.fixture
def own_fleet(fleet_broker: Fleet, mosquitto_factory: MosquittoFactory,
              tmp_path: Path) -> Mosquitto:
    documented = fleet_broker.documented(tmp_path / "own-fleet")
    return mosquitto_factory(documented.listeners, extra_conf=documented.global_conf)


def test_a_crl_from_its_url_raises_cert_revoked(
    fleet_broker: Fleet, own_fleet: Mosquitto, crl_server: CrlServer, tmp_path: Path
) -> None:
    fleet = fleet_broker
    creds = fleet.device_credentials("gw-url-revoked", tmp_path / "d", days=365)
    cert = pki.read_bundle(creds.cert_path).certs[0]
    crl_server.files["/devices.crl"] = _crl(fleet, revoked=(cert.cert,))
    cas = write_bundle(tmp_path / "fleet-cas.pem", [fleet.root, fleet.devices_ca])
    collector = build_collector(collector_config(fleet, tmp_path, **{
        "mqtt.broker": f"mqtts://127.0.0.1:{own_fleet.listeners[1].port}",
        "tls.fleet_ca": str(cas), "tls.fleet_crl_urls": f"{crl_server.url}/devices.crl",
        "tls.crl_fetch_timeout_s": "2"}), web=False, periodic=Periodic(
            beacon_every_s=0.2, silence_every_s=0.2, summary_every_s=0.2,
            fleet_sweep_every_s=0.2))
    agent = AgentService(loads(AgentConfig, "", overrides={
        "mqtt.broker": f"mqtts://127.0.0.1:{own_fleet.listeners[0].port}",
        "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "agent.state_dir": str(tmp_path / "state")}))
    collector.start()
    try:
        assert collector.link.wait_connected(10)
        agent.connect(10)
        agent.report_once()
        assert agent.wait_delivered(15)
        store = collector.store
        assert wait_until(lambda: (r := store.device("gw-url-revoked")) is not None
                          and r.client_sha256, 15), collector.ingestor.rejected

        def revoked() -> list[Any]:
            collector.tick()
            return [a for a in store.active_alerts() if a.rule == "CERT_REVOKED"]

        assert wait_until(lambda: bool(revoked()), 10), store.active_alerts()
        (alert,) = revoked()
        assert alert.device_id == "gw-url-revoked"
        assert cert.facts.serial_hex in alert.summary
        assert crl_server.hits[0] == "/devices.crl"
    finally:
        agent.shutdown()
        collector.close()
