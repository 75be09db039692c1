"""`tls.fleet_crl_urls`: the collector fetches the fleet CAs' CRLs from their
distribution points over HTTP, with a timeout, a cache and the last good copy kept.

A real HTTP server on loopback (http.server, free port) serves the CRL, answers 404,
or holds the request open (the timeout); the cache's clock is injected. The end to
end test: a revoked device that still reports raises CERT_REVOKED from a CRL that
only the URL gives (real Mosquitto, real agent, `build_collector`).
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
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
from collector.alerts.rules import HeldCert, fleet_crl_alerts, revoked_cert_alerts
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
            if self.path.startswith("/trickle"):  # a byte every 50 ms, never finishing
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                while not state.release.wait(0.05):
                    try:
                        self.wfile.write(b"0")
                        self.wfile.flush()
                    except OSError:
                        return
                return
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", f"{state.url}/fleet.crl")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = state.files.get(self.path.split("?")[0])
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
    assert (hung.reason, hung.error) == ("timeout", "no complete answer within 0.3 s")
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
    # Only the root: the CRL's issuer, the devices intermediate, is known from the
    # device's own chain (which the collector verified), as the wiring hands it over.
    cas = write_bundle(tmp_path / "fleet-cas.pem", [fleet.root])
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


def test_a_trickling_server_is_bounded_by_the_total_deadline(crl_server: CrlServer) -> None:
    started = time.monotonic()
    got = fetch(f"{crl_server.url}/trickle", 0.5)
    took = time.monotonic() - started
    assert (got.body, got.reason) == (None, "timeout") and 0.45 <= took < 2.0, took
    assert len(crl_server.hits) == 1


def test_a_redirect_is_refused_not_followed(crl_server: CrlServer, fleet_broker: Fleet) -> None:
    crl_server.files["/fleet.crl"] = _crl(fleet_broker)
    got = fetch(f"{crl_server.url}/moved", 5)
    assert (got.body, got.reason) == (None, "redirect") and "HTTP 302" in (got.error or "")
    assert crl_server.hits == ["/moved"]  # the target was never asked


def test_credentials_in_a_url_are_refused_and_a_query_never_logged(
    crl_server: CrlServer, fleet_broker: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    base = {"mqtt.broker": "mqtts://b.example", "tls.ca_bundle": "/dev/null",
            "tls.cert": "/dev/null", "tls.key": "/dev/null", "tls.fleet_ca": "/dev/null"}
    with pytest.raises(ConfigError, match="fleet_crl_urls") as refused:
        loads(CollectorConfig, "", overrides={
            **base, "tls.fleet_crl_urls": "http://crl:pw-s3cret@pki.example/devices.crl"})
    assert "user:password@" in str(refused.value) and "s3cret" not in str(refused.value)
    # The signed query of a CDP URL is neither in the CRL's source (the alert's
    # text) nor in a log line.
    crl_server.files["/fleet.crl"] = _crl(fleet_broker)
    url = f"{crl_server.url}/fleet.crl?sig=q-s3cret"
    gone = f"{crl_server.url}/gone.crl?sig=q-s3cret"
    cas = pki.parse_bundle(fleet_broker.devices_ca.cert_pem(), "ca").certs
    with caplog.at_level(logging.INFO, logger="certmon.collector"):
        crls = FleetCrls((), cas, CrlSource([url, gone], timeout_s=2, every_s=600,
                                            monotonic=lambda: 0.0)).current()
    assert [c.source for c in crls] == [f"{crl_server.url}/fleet.crl"]
    assert "gone.crl" in caplog.text and "s3cret" not in caplog.text


def _held(fleet: Fleet, name: str) -> tuple[Any, list[HeldCert]]:
    leaf = fleet.pki.leaf(fleet.devices_ca, name, name=f"{name}-crlfetch")
    facts = pki.parse_bundle(leaf.cert_pem(), "x").certs[0].facts
    return leaf, [HeldCert(name, facts.sha256, facts.subject, facts.issuer, facts.serial_hex)]


def test_a_forged_crl_over_http_is_not_believed_and_an_intermediate_is_known_by_signature(
    crl_server: CrlServer, fleet_broker: Fleet
) -> None:
    fleet = fleet_broker
    leaf, held = _held(fleet, "gw-forged")
    # Only the root is configured; the CRL's issuer is the devices intermediate.
    roots = pki.parse_bundle(fleet.root.cert_pem(), "root").certs
    impostor = fleet.pki.root("fleet-devices", name="forger-http")  # same name, own key
    now = fleet.pki.now
    crl_server.files["/genuine.crl"] = _crl(fleet, revoked=(leaf,))
    crl_server.files["/forged.crl"] = fleet.pki.crl(
        fleet.devices_ca, this_update=now, next_update=now + timedelta(days=30),
        revoked=[leaf], signer=impostor.key).public_bytes(serialization.Encoding.DER)

    def believed(path: str, chain: list[Any]) -> tuple[list[str], list[str]]:
        source = CrlSource([f"{crl_server.url}{path}"], timeout_s=2, every_s=600,
                           monotonic=lambda: 0.0)
        crls = FleetCrls((), roots, source, chain_certs=lambda: chain).current()
        return ([a.rule for a in revoked_cert_alerts(held, crls)],
                [a.rule for a in fleet_crl_alerts(crls, now, pki.Policy(warn_days=1, crit_days=1))])

    # Without the intermediate, no known CA can check it: a finding, nothing revoked.
    assert believed("/genuine.crl", []) == ([], ["CRL_ISSUER_UNKNOWN"])
    # The intermediate of a held device chain, signed by the root: believed.
    assert believed("/genuine.crl", [fleet.devices_ca.cert]) == (["CERT_REVOKED"], [])
    # A forgery (another key under the intermediate's name) revokes nothing, even when
    # a device's chain carries the forger's self-signed "CA": admitted by signature,
    # never by name.
    assert believed("/forged.crl", [fleet.devices_ca.cert, impostor.cert]) == (
        [], ["CRL_SIGNATURE_INVALID"])
    # The forger's "CA" alone is not admitted: the genuine CRL cannot be checked.
    assert believed("/genuine.crl", [impostor.cert]) == ([], ["CRL_ISSUER_UNKNOWN"])


def test_garbage_or_an_older_crl_keeps_the_last_good_one_and_the_alert(
    crl_server: CrlServer, fleet_broker: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = fleet_broker
    leaf, held = _held(fleet, "gw-kept-revoked")
    cas = pki.parse_bundle(fleet.devices_ca.cert_pem(), "ca").certs
    crl_server.files["/fleet.crl"] = _crl(fleet, revoked=(leaf,), number=5)
    mono = [0.0]
    crls = FleetCrls((), cas, CrlSource([f"{crl_server.url}/fleet.crl"], timeout_s=2,
                                        every_s=600, monotonic=lambda: mono[0]))

    def rules_after(body: bytes | None) -> list[str]:
        if body is None:
            crl_server.files.pop("/fleet.crl", None)
        else:
            crl_server.files["/fleet.crl"] = body
        mono[0] += 600
        return [a.rule for a in revoked_cert_alerts(held, crls.current())]

    assert rules_after(crl_server.files["/fleet.crl"]) == ["CERT_REVOKED"]
    with caplog.at_level(logging.WARNING, logger="certmon.collector"):
        assert rules_after(b"<html>maintenance</html>") == ["CERT_REVOKED"]  # garbage
        assert rules_after(b"<html>maintenance</html>") == ["CERT_REVOKED"]
        assert rules_after(None) == ["CERT_REVOKED"]  # the URL answers 404
        assert rules_after(_crl(fleet, number=4)) == ["CERT_REVOKED"]  # replayed older
    assert crls.refused == {"unreadable": 1, "older": 1}  # each counted once
    assert caplog.text.count("does not parse") + caplog.text.count("no CRL found") == 1
    assert "is older than the one believed (number 5)" in caplog.text
    # A newer verified CRL without the certificate resolves it.
    assert rules_after(_crl(fleet, number=6)) == []
