"""`make demo`: a living demo fleet on this machine, with problems to find.

Generates a demo PKI, starts Mosquitto on loopback in certmon's documented
configuration (packaging/mosquitto/: devices on one mTLS listener trusting the fleet
CA, the collector on another trusting only an operations CA), a collector on SQLite
with its dashboard, and ten agents in distinct states — healthy; client certificate
expiring soon; intermediate CA expiring before its leaf; trust store missing the CA
the broker will move to; clock two days behind; clock unsynced; world-readable key;
one that goes offline; one that renews its own certificate; one on a broker host
whose own Mosquitto (a second one, bench/demo_broker.py) has a renewed-but-not-reloaded
certfile and a CRL two days from its nextUpdate. The collector scans its broker
endpoints every minute: the demo's broker, and a second endpoint (bench/demo_broker.py)
whose intermediate CA expires in 10 days; the dashboard's broker section shows each
verdict and whether the chain devices report matches the scanned one — then prints the
dashboard URL and the `certmon-collector report` table, and runs until interrupted
(or for --duration seconds), cleaning up everything it started.

It lives in bench/ (a tool, not part of the installed package) because it runs the
agent and the collector in one process, which neither package may do (tests/test_layout).
Its certificates and its broker come from the test kit (tests/kit/pki.py,
tests/kit/broker.py, tests/kit/brokerconf.py; bench/README.md says why bench may
import it).
Everything runs the real code: real keys and signatures, real MQTT over mTLS. The
two clock cases inject their clock readers (a shifted wall clock, chrony's answer):
that is the only simulated part, since a demo must not change this machine's clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import demo_broker  # bench/ is on sys.path: this script's own directory
from cryptography import x509
from kit.broker import BrokerStartError, Mosquitto, find_mosquitto
from kit.brokerconf import BrokerFiles, documented_broker
from kit.pki import Issued, PKIFactory, write_bundle

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import clock as wallclock
from certmon.config import loads
from certmon.pki import Severity
from collector.config import CollectorConfig
from collector.service import CollectorService, Periodic

log = logging.getLogger("certmon.demo")

# What chrony says on a healthy gateway, on one whose clock is two days behind, and on
# one that never synchronised (`chronyc -c tracking`, see docs/clock.md).
CHRONY_OK = ("C0000201,192.0.2.1,3,1795737544.123456789,-0.000012345,0.000001234,"
             "0.000023456,-12.345,0.001,0.012,0.012345678,0.001234567,64.5,Normal\n")
CHRONY_BEHIND_2D = ("C0000201,192.0.2.1,3,1795737544.123456789,172800.000123456,"
                    "172800.000000123,0.000023456,-12.345,0.001,0.012,0.012345678,"
                    "0.001234567,64.5,Normal\n")
CHRONY_UNSYNCED = ("00000000,,0,0.000000000,0.000000000,0.000000000,0.000000000,0.000,"
                   "0.000,0.000,1.000000000,1.000000000,0.0,Not synchronised\n")


# --------------------------------------------------------------------------- fleet


@dataclass(frozen=True)
class DemoDevice:
    device_id: str
    intended: str  # the state the collector should show: ok/warning/critical/clock/offline
    story: str
    issued: Issued
    trust: tuple[x509.Certificate, ...]
    clock_offset: timedelta = timedelta(0)
    chrony: str = CHRONY_OK
    key_mode: int = 0o600
    goes_offline: bool = False
    renews: bool = False  # [renewal] with tests/renewhook.py issuing from the demo CA
    broker_host: bool = False  # [broker]: judges its own Mosquitto (bench/demo_broker.py)


def demo_fleet(now: datetime) -> tuple[dict[str, Issued], list[DemoDevice]]:
    pki = PKIFactory(now)
    root = pki.root("certmon demo Fleet Root", not_before=now - timedelta(days=400))
    devices_ca = pki.intermediate(root, "demo devices", not_before=now - timedelta(days=300))
    short_ca = pki.intermediate(root, "demo devices (old CA)", days=30,
                                not_before=now - timedelta(days=18))  # 12 days left
    # The collector's CA issues no device certificate (docs/mosquitto.md).
    operations_ca = pki.root("certmon demo Operations CA")
    broker_ca = pki.root("demo Broker Root 2020", not_before=now - timedelta(days=2000))
    new_broker_ca = pki.root("demo Broker Root 2026")
    cas = {"root": root, "devices": devices_ca, "operations": operations_ca,
           "broker_ca": broker_ca, "new_broker_ca": new_broker_ca,
           "server": pki.leaf(broker_ca, "localhost", days=200, usage="server",
                              sans=("localhost", "127.0.0.1")),
           "collector": pki.leaf(operations_ca, "collector")}
    full_trust = (root.cert, broker_ca.cert, new_broker_ca.cert)

    def dev(device_id: str, intended: str, story: str, *, issuer: Issued = devices_ca,
            days: float = 365, trust: tuple[x509.Certificate, ...] = full_trust,
            not_before: datetime | None = None, **kw: object) -> DemoDevice:
        return DemoDevice(device_id, intended, story,
                          pki.leaf(issuer, device_id, days=days, not_before=not_before),
                          trust, **kw)  # type: ignore[arg-type]

    fleet = [
        dev("gw-0001", "ok", "healthy"),
        dev("gw-0002", "ok", "healthy"),
        dev("gw-0003", "ok", "healthy, certificate renewed last week",
            not_before=now - timedelta(days=7)),
        dev("gw-0101", "critical", "client certificate expires in 5 days",
            days=5.2, not_before=now - timedelta(hours=5)),
        dev("gw-0102", "warning", "client certificate expires in 20 days",
            days=20.2, not_before=now - timedelta(hours=5)),
        dev("gw-0201", "warning", "its intermediate CA expires 12 days from now, long "
            "before the device certificate", issuer=short_ca, days=300,
            not_before=now - timedelta(days=1)),
        dev("gw-0301", "warning", "trust store lacks 'demo Broker Root 2026', the CA the "
            "broker moves to", trust=(root.cert, broker_ca.cert)),
        dev("gw-0401", "clock", "wall clock two days behind (fake-hwclock after a power "
            "cut); its certificate is fine", not_before=now - timedelta(hours=20),
            clock_offset=timedelta(days=-2), chrony=CHRONY_BEHIND_2D),
        dev("gw-0402", "clock", "clock never synchronised (no NTP reachable)",
            chrony=CHRONY_UNSYNCED),
        dev("gw-0501", "critical", "private key is world-readable", key_mode=0o644),
        dev("gw-0601", "offline", "went dark after its first report", goes_offline=True),
        # 30 days of life, two thirds of it (the renewal point) reached 15 s into the
        # run: a CERT_EXPIRING warning at first, then the agent renews by itself and the
        # dashboard shows it healthy (docs/renewal.md).
        dev("gw-0701", "ok", "renews its own certificate 15 s into the run", days=30,
            not_before=now - timedelta(days=20) + timedelta(seconds=15), renews=True),
        dev("broker-01", "critical", demo_broker.STORY, broker_host=True),
    ]
    return cas, fleet


# --------------------------------------------------------------------------- processes


def start_broker(work: Path, cas: dict[str, Issued]) -> Mosquitto:
    """Mosquitto on free loopback ports in the documented configuration: the device
    listener (listeners[0]: fleet root, CN as username) and the operations listener
    (listeners[1]: the operations CA), each with its shipped ACL, no anonymous clients."""
    if find_mosquitto() is None:
        raise SystemExit("certmon demo: mosquitto is not installed "
                         "(Debian: sudo apt-get install mosquitto)")
    server_cert, server_key = cas["server"].write(work)
    files = BrokerFiles(
        fleet_ca=write_bundle(work / "fleet-root.pem", [cas["root"]]),
        operations_ca=write_bundle(work / "operations-ca.pem", [cas["operations"]]),
        certfile=server_cert, keyfile=server_key)
    documented = documented_broker(work / "broker-conf", files)
    broker = Mosquitto(work / "broker", documented.listeners,
                       extra_conf=documented.global_conf)
    try:
        return broker.start()
    except BrokerStartError as exc:
        raise SystemExit(f"certmon demo: mosquitto did not start:\n{exc}") from None


def runner_for(chrony: str) -> Callable[[Sequence[str]], str | None]:
    def run(argv: Sequence[str]) -> str | None:
        return chrony if argv and argv[0] == "chronyc" else None
    return run


@dataclass
class Demo:
    work: Path
    broker: Mosquitto
    collector: CollectorService
    web_url: str | None
    agents: list[AgentService]
    threads: list[threading.Thread]  # the collector's first, then the agents'
    subprocesses: list[subprocess.Popen[bytes]]
    fleet: list[DemoDevice]
    judged_brokers: list[Mosquitto] = field(default_factory=list)  # the broker hosts' own
    # Scanned by the collector only ([[scan_targets]]): no device connects to them.
    scanned_endpoints: list[Mosquitto] = field(default_factory=list)

    def stop(self) -> None:
        try:
            # The collector first: agents saying goodbye must not page anyone.
            self.collector.stop()
            self.threads[0].join(timeout=15)  # collector.run() closes it, web server too
            for agent in self.agents:
                agent.request_stop()
            for thread in self.threads:
                thread.join(timeout=10)
        finally:
            # Whatever failed above, nothing the demo started is left running.
            for proc in self.subprocesses:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for judged in [*self.judged_brokers, *self.scanned_endpoints]:
                judged.stop(timeout_s=10)
            self.broker.stop(timeout_s=10)


def start_demo(work: Path, *, interval_s: int = 10, listen: str = "127.0.0.1:0") -> Demo:
    now = datetime.now(UTC)
    cas, fleet = demo_fleet(now)
    (work / "fleet.json").write_text(json.dumps(
        {d.device_id: {"intended": d.intended, "story": d.story} for d in fleet}, indent=2))
    broker = start_broker(work, cas)
    endpoint: Mosquitto | None = None
    try:
        endpoint = demo_broker.start_expiring_endpoint(work / "broker-eu", now,
                                                       cas["broker_ca"])
        demo = _start_fleet(work, broker, cas, fleet, interval_s=interval_s, listen=listen,
                            scanned=[endpoint])
        demo.scanned_endpoints.append(endpoint)
        return demo
    except BaseException:
        # Whatever failed, no broker the demo started outlives it.
        if endpoint is not None:
            endpoint.stop()
        broker.stop()
        raise


def _start_fleet(work: Path, broker: Mosquitto, cas: dict[str, Issued],
                 fleet: list[DemoDevice], *, interval_s: int, listen: str,
                 scanned: Sequence[Mosquitto] = ()) -> Demo:
    """The collector (operations listener) and the agents (device listener). The
    collector scans the device listener (what every device sees) and `scanned`."""
    port, operations_port = broker.listeners[0].port, broker.listeners[1].port
    # The device listener asks for a client certificate the scan does not present:
    # the probe still records the chain the broker served (certmon.tlsprobe).
    scan_ports = [port, *(b.listeners[0].port for b in scanned)]
    scan_targets = "".join(f"""
[[scan_targets]]
host = "127.0.0.1"
port = {p}
""" for p in scan_ports)
    collector_cert, collector_key = cas["collector"].write(work, chain=True)
    write_bundle(work / "broker-ca.pem", [cas["broker_ca"]])
    new_ca = write_bundle(work / "new-broker-root.pem", [cas["new_broker_ca"]])
    config_text = f"""\
scan_interval_s = 60  # the shortest allowed: the demo's scans are on its dashboard at once

[mqtt]
broker = "mqtts://127.0.0.1:{operations_port}"
client_id = "certmon-demo-collector"
session_expiry_s = 0

[tls]
ca_bundle = "{work / 'broker-ca.pem'}"
cert = "{collector_cert}"
key = "{collector_key}"
fleet_ca = ["{work / 'fleet-root.pem'}"]

[store]
url = "sqlite:///{work / 'certmon.db'}"

[web]
listen = "{listen}"

[ingest]
offline_after_intervals = 3.0

[[trust_requirements]]
name = "demo Broker Root 2026"
ca_file = "{new_ca}"
status = "required"
{scan_targets}"""
    (work / "collector.toml").write_text(config_text)
    config = loads(CollectorConfig, config_text, source=str(work / "collector.toml"))
    from collector.wiring import build_collector

    # Fleet rules (required CAs, shared certificates) every few seconds, not every
    # minute: a demo should show them before the visitor loses interest.
    collector = build_collector(config, periodic=Periodic(
        beacon_every_s=5.0, silence_every_s=2.0, summary_every_s=10.0, fleet_sweep_every_s=3.0))
    collector_thread = threading.Thread(target=collector.run, name="collector", daemon=True)
    collector_thread.start()
    collector.link.wait_connected(10)
    agents, threads, procs = [], [collector_thread], []
    judged_brokers: list[Mosquitto] = []
    for device in fleet:
        directory = work / device.device_id
        directory.mkdir()
        cert, key = device.issued.write(directory, chain=True, key_mode=device.key_mode)
        write_bundle(directory / "ca.pem", device.trust)
        agent_toml = directory / "agent.toml"
        renewal = _renewal_section(work, cas) if device.renews else ""
        if device.broker_host:
            judged, section = demo_broker.start_judged_broker(
                directory / "host", datetime.now(UTC), cas["devices"])
            judged_brokers.append(judged)
            renewal += section
        agent_toml.write_text(f"""\
[mqtt]
broker = "mqtts://127.0.0.1:{port}"

[tls]
ca_bundle = "{directory / 'ca.pem'}"
cert = "{cert}"
key = "{key}"

[agent]
interval_s = {interval_s}
state_dir = "{directory / 'state'}"
{renewal}""")
        if device.goes_offline:
            # A real process, killed -9 after its first report: the broker fires its
            # will, exactly as when a gateway loses power.
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(agent_toml)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            continue
        config_a = loads(AgentConfig, agent_toml.read_text(), source=str(agent_toml))
        clock: wallclock.Clock = wallclock.SystemClock()
        if device.clock_offset:
            clock = wallclock.OffsetClock(wallclock.SystemClock(), device.clock_offset)
        agent = AgentService(config_a, clock=clock, runner=runner_for(device.chrony))
        thread = threading.Thread(target=agent.run, name=device.device_id, daemon=True)
        thread.start()
        agents.append(agent)
        threads.append(thread)
    return Demo(work, broker, collector, collector.web_url, agents, threads,
                procs, fleet, judged_brokers)


def _renewal_section(work: Path, cas: dict[str, Issued]) -> str:
    """The demo's hook: the test kit's small CA client, issuing from the demo CA."""
    ca_cert, ca_key = cas["devices"].write(work / "renewal-ca")
    hook = Path(__file__).resolve().parent.parent / "tests" / "renewhook.py"
    command = json.dumps([sys.executable, str(hook), "good", str(ca_cert), str(ca_key)])
    return f"""
[renewal]
enabled = true
command = {command}
jitter_fraction = 0  # the demo renews at a predictable moment
"""


def wait_for_fleet(demo: Demo, timeout_s: float = 45.0) -> bool:
    """Until every demo device has reported (and the offline one has been killed)."""
    deadline = time.monotonic() + timeout_s
    store = demo.collector.store
    killed = False
    while time.monotonic() < deadline:
        seen = {d.device_id for d in demo.fleet if store.device(d.device_id) is not None
                and store.device(d.device_id).status_json}  # type: ignore[union-attr]
        offline = next((d for d in demo.fleet if d.goes_offline), None)
        if offline is not None and offline.device_id in seen and not killed:
            for proc in demo.subprocesses:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            killed = True
        if len(seen) == len(demo.fleet) and killed:
            return True
        time.sleep(0.2)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="certmon-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=0,
                        help="stop after this many seconds (0: until Ctrl-C)")
    parser.add_argument("--listen", default="127.0.0.1:9310",
                        help="dashboard address (127.0.0.1:0 picks a free port)")
    parser.add_argument("--workdir", help="keep the demo's files here (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="certmon-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    listen = args.listen
    if listen.endswith(":9310") and not _port_free(9310):
        listen = "127.0.0.1:0"
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"certmon demo: starting a broker, a collector and 13 agents in {work} …", flush=True)
    demo = start_demo(work, listen=listen)
    try:
        ready = wait_for_fleet(demo)
        print_overview(demo, ready)
        if args.duration:
            stop.wait(args.duration)
        else:
            print("\nRunning; press Ctrl-C to stop.", flush=True)
            while not stop.is_set():
                stop.wait(1)
    finally:
        print("certmon demo: stopping everything it started …", flush=True)
        demo.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _scan_summary(result_json: str) -> str:
    """The scan's worst finding, as `certmon-scan` words it."""
    try:
        findings = json.loads(result_json).get("findings") or []
    except (ValueError, AttributeError):
        return ""
    worst = max(findings, key=lambda f: Severity[f.get("severity", "OK")], default=None)
    return f"{worst['code']}: {worst['message']}" if worst else "no findings"


def print_overview(demo: Demo, ready: bool) -> None:
    from collector.cli import build_report, render_report

    time.sleep(1.0)  # the silence check and the alert engine catch up
    # Fleet rules now, not at the next period.
    next(j for j in demo.collector.jobs if j.name == "alerts.fleet").run()
    print()
    for device in demo.fleet:
        print(f"  {device.device_id:9} should show {device.intended:9} {device.story}")
    print()
    deadline = time.monotonic() + 15  # the first scans run in the background
    while (len(demo.collector.store.scans()) <= len(demo.scanned_endpoints)
           and time.monotonic() < deadline):
        time.sleep(0.2)
    for scan in demo.collector.store.scans():
        print(f"  scanned {scan.target:15} {Severity(scan.severity).name:9} "
              f"{_scan_summary(scan.result_json)}")
    print()
    report = build_report(demo.collector.store, datetime.now(UTC), 30.0)
    render_report(report, sys.stdout)
    db = demo.work / "certmon.db"
    print(f"\nreport again: certmon-collector report --db sqlite:///{db}")
    if demo.web_url:
        print(f"dashboard:    {demo.web_url}/")
        print(f"metrics:      {demo.web_url}/metrics")
    if not ready:
        print("(not every demo device had reported yet when this was printed)")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
