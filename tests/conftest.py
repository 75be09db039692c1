"""Shared fixtures: the test PKI and real Mosquitto brokers, built on the test kit.

Owns: pytest fixtures and hooks. Must not: hold helpers a benchmark could need (they
live in tests/kit/, which tests import as `kit.*`: pyproject's pytest `pythonpath`
puts tests/ on sys.path).

- `pki_now`, `pki` (session): one `PKIFactory` whose `now` is the session start.
- `mosquitto_bin` (session): the binary, or skip — or *fail* when `CI` is set, so a
  CI machine without mosquitto can never go green by skipping the broker tests.
- `fleet_broker` (session): the fleet PKI plus one broker running certmon's documented
  configuration (packaging/mosquitto/: a device and an operations listener), with an
  anonymous plain and a TLS listener beside it (see `Fleet`).
- `scenario_broker` (session): one broker, one TLS listener per named PKI scenario
  (see `ScenarioBroker`), for scanner tests.
- `mosquitto_factory` (function): start private brokers a test may stop, kill or
  restart without disturbing anyone else.

Tests that use a broker fixture get the `broker` marker automatically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import pytest
from kit.broker import Listener, Mosquitto, find_mosquitto
from kit.brokerconf import BrokerFiles, DocumentedBroker, documented_broker
from kit.pki import Issued, PKIFactory, write_bundle
from kit.scenarios import SCENARIOS, Scenario, scenario

_BROKER_FIXTURES = {"fleet_broker", "scenario_broker", "mosquitto_factory", "mosquitto_bin"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(scope="session")
def pki_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="session")
def pki(pki_now: datetime) -> PKIFactory:
    return PKIFactory(now=pki_now)


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    binary = find_mosquitto()
    if binary is None:
        missing("mosquitto not found on PATH or in /usr/sbin (apt install mosquitto)")
    return binary


def missing(reason: str) -> NoReturn:
    """Skip for want of a tool — or fail when CI is set: CI must never go green by
    skipping what it was meant to run."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
    pytest.skip(reason)


@dataclass(frozen=True)
class DeviceCreds:
    """Files a client needs: cert (+ intermediate), key, CA bundle for the server."""

    cert_path: Path
    key_path: Path
    ca_bundle_path: Path
    device_id: str


@dataclass
class Fleet:
    """The fleet PKI and its broker.

    PKI: "certmon-test Fleet Root CA" → "fleet-devices" intermediate → device certs
    (CN = device id); a separate "certmon-test Operations CA", which issues no device
    certificate, → the collector cert. The broker's server cert comes from a third,
    "certmon-test Broker CA", as in real deployments where the broker's CA is not the
    device CA; `ca_bundle_path` holds the fleet and broker roots.

    Listeners: 0 plain and 1 TLS (server auth only), both anonymous with no ACL:
    "anyone with broker access", which lets a test inject a forged or unsigned
    message into any topic, the threat the signatures exist for; 2 the documented
    device listener (trusts only the fleet root) and 3 the documented operations
    listener (trusts only the operations CA), with the shipped ACLs.
    """

    pki: PKIFactory
    broker: Mosquitto
    root: Issued
    devices_ca: Issued
    operations_ca: Issued
    broker_ca: Issued
    server: Issued
    ca_bundle_path: Path
    files: BrokerFiles
    host: str = "127.0.0.1"

    @property
    def plain_port(self) -> int:
        return self.broker.listeners[0].port

    @property
    def tls_port(self) -> int:
        return self.broker.listeners[1].port

    @property
    def mtls_port(self) -> int:
        """The device listener."""
        return self.broker.listeners[2].port

    @property
    def operations_port(self) -> int:
        """The operations listener: where the collector logs in."""
        return self.broker.listeners[3].port

    def documented(self, directory: Path, *, migration: bool = False) -> DocumentedBroker:
        """This fleet's PKI in the documented configuration, for a private broker."""
        return documented_broker(directory, self.files, migration=migration)

    def device_credentials(self, device_id: str, tmp_dir: Path, **leaf_kwargs: Any) -> DeviceCreds:
        """Issue a device cert (CN = device_id) under fleet-devices and write it."""
        leaf = self.pki.leaf(self.devices_ca, device_id, **leaf_kwargs)
        return self._write(leaf, device_id, tmp_dir)

    def collector_credentials(self, tmp_dir: Path, cn: str = "collector", **kw: Any) -> DeviceCreds:
        leaf = self.pki.leaf(self.operations_ca, cn, **kw)
        return self._write(leaf, cn, tmp_dir)

    def _write(self, leaf: Issued, identity: str, tmp_dir: Path) -> DeviceCreds:
        # The cert file carries the intermediate: mosquitto's cafile holds only the root.
        cert_path, key_path = leaf.write(tmp_dir, chain=True)
        return DeviceCreds(cert_path, key_path, self.ca_bundle_path, identity)


@pytest.fixture(scope="session")
def fleet_broker(
    mosquitto_bin: str, pki: PKIFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet-broker")
    root = pki.root("certmon-test Fleet Root CA", name="fleet-root")
    devices_ca = pki.intermediate(root, "fleet-devices")
    operations_ca = pki.root("certmon-test Operations CA", name="operations-ca")
    broker_ca = pki.root("certmon-test Broker CA", name="broker-ca")
    server = pki.leaf(
        broker_ca, "localhost", name="broker-server", usage="server",
        sans=("localhost", "127.0.0.1"),
    )  # fmt: skip
    server_cert, server_key = server.write(workdir)
    files = BrokerFiles(
        fleet_ca=write_bundle(workdir / "fleet-root.pem", [root]),
        operations_ca=write_bundle(workdir / "operations-ca.pem", [operations_ca]),
        certfile=server_cert, keyfile=server_key,
    )
    ca_bundle = write_bundle(workdir / "ca-bundle.pem", [root, broker_ca])
    documented = documented_broker(workdir / "documented", files)
    broker = Mosquitto(
        workdir,
        [
            Listener(allow_anonymous=True),
            Listener(tls=True, certfile=server_cert, keyfile=server_key, allow_anonymous=True),
            *documented.listeners,
        ],
        extra_conf=documented.global_conf,
        binary=mosquitto_bin,
    )
    with broker:
        yield Fleet(pki, broker, root, devices_ca, operations_ca, broker_ca, server, ca_bundle,
                    files)


@dataclass(frozen=True)
class ScenarioBroker:
    """`ports[name]` serves `scenarios[name].leaf` plus its intermediate;
    `trust_paths[name]` is the bundle a client should trust for it."""

    broker: Mosquitto
    scenarios: dict[str, Scenario]
    ports: dict[str, int]
    trust_paths: dict[str, Path]
    host: str = "127.0.0.1"


# mosquitto refuses to start with a cert whose key does not match: not servable.
SERVABLE_SCENARIOS = tuple(name for name in SCENARIOS if name != "wrong_key")


@pytest.fixture(scope="session")
def scenario_broker(
    mosquitto_bin: str, pki: PKIFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ScenarioBroker]:
    workdir = tmp_path_factory.mktemp("scenario-broker")
    scenarios = {name: scenario(pki, name) for name in SERVABLE_SCENARIOS}
    listeners, trust = [], {}
    for name, scen in scenarios.items():
        cert_path, key_path, trust[name] = scen.write(workdir / name)
        # SECLEVEL=0 so the sha1_signed and rsa1024 leaves load at all.
        listeners.append(
            Listener(tls=True, certfile=cert_path, keyfile=key_path, ciphers="DEFAULT:@SECLEVEL=0")
        )
    with Mosquitto(workdir, listeners, binary=mosquitto_bin) as broker:
        ports = {name: lst.port for name, lst in zip(scenarios, broker.listeners, strict=True)}
        yield ScenarioBroker(broker, scenarios, ports, trust)


MosquittoFactory = Callable[..., Mosquitto]


@pytest.fixture
def mosquitto_factory(
    mosquitto_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoFactory]:
    """`mosquitto_factory(listeners=[Listener()], acl=None, extra_conf="")` → a started
    broker of the test's own; every one is stopped at teardown."""
    started: list[Mosquitto] = []

    def make(
        listeners: Sequence[Listener] = (Listener(),),
        *,
        acl: str | None = None,
        extra_conf: str = "",
        **kwargs: Any,
    ) -> Mosquitto:
        workdir = tmp_path_factory.mktemp("mosquitto")
        broker = Mosquitto(
            workdir, listeners, acl=acl, extra_conf=extra_conf, binary=mosquitto_bin, **kwargs
        )
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        broker.stop()


# --- a collector on SQLite, on the fleet broker's operations listener -----------------


def collector_config(fleet: Fleet, tmp_path: Path, **overrides: str) -> Any:
    """A CollectorConfig for `fleet` with its store in `tmp_path` (flags as dotted keys)."""
    from certmon.config import loads
    from collector.config import CollectorConfig

    creds = fleet.collector_credentials(tmp_path / "collector")
    fleet_ca = tmp_path / "fleet-ca.pem"
    fleet_ca.write_bytes(fleet.root.cert_pem())
    values = {
        "mqtt.broker": f"mqtts://127.0.0.1:{fleet.operations_port}",
        "tls.ca_bundle": str(creds.ca_bundle_path), "tls.cert": str(creds.cert_path),
        "tls.key": str(creds.key_path), "tls.fleet_ca": str(fleet_ca),
        "store.url": f"sqlite:///{tmp_path / 'certmon.db'}",
        "mqtt.client_id": f"collector-{tmp_path.name}", "mqtt.session_expiry_s": "0",
        "web.listen": "127.0.0.1:0",
        **overrides,
    }
    return loads(CollectorConfig, "", overrides=values)


def start_collector(fleet: Fleet, broker: Mosquitto, tmp: Path, **overrides: str) -> Any:
    """A started collector (no web, slow periodic jobs) on `broker`'s second listener:
    the operations listener of a documented broker started from `fleet.documented()`."""
    from collector.service import Periodic
    from collector.wiring import build_collector

    config = collector_config(fleet, tmp, **{
        "mqtt.broker": f"mqtts://127.0.0.1:{broker.listeners[1].port}", **overrides})
    service = build_collector(config, web=False, periodic=Periodic(
        beacon_every_s=3600, silence_every_s=3600, summary_every_s=3600))
    service.start()
    assert service.link.wait_connected(10), service.link.state.last_error
    return service


@pytest.fixture
def collector(fleet_broker: Fleet, tmp_path: Path) -> Iterator[Any]:
    """A running collector (service threads, no web server) with fast periodic jobs."""
    from collector.service import Periodic
    from collector.wiring import build_collector

    service = build_collector(collector_config(fleet_broker, tmp_path), periodic=Periodic(
        beacon_every_s=0.2, silence_every_s=0.2, summary_every_s=0.2))
    service.start()
    assert service.link.wait_connected(10)
    yield service
    service.close()
