"""`make demo`: a living demo fleet on this machine, with problems to find.

Generates a demo PKI, starts Mosquitto on loopback (TLS with client certificates, the
certmon ACL), a collector on SQLite with its dashboard, and ten agents in distinct
states — healthy; client certificate expiring soon; intermediate CA expiring before
its leaf; trust store missing the CA the broker will move to; clock two days behind;
clock unsynced; world-readable key; one that goes offline — then prints the
dashboard URL and the `certmon-collector report` table, and runs until interrupted
(or for --duration seconds), cleaning up everything it started.

It lives in bench/ (a tool, not part of the installed package) because it runs the
agent and the collector in one process, which neither package may do (tests/test_layout).
Everything runs the real code: real keys and signatures, real MQTT over mTLS. The
two clock cases inject their clock readers (a shifted wall clock, chrony's answer):
that is the only simulated part, since a demo must not change this machine's clock.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import AgentConfig
from agent.service import AgentService
from certmon import clock as wallclock
from certmon.config import loads
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

ACL = """\
user collector
topic read certmon/v1/#
topic write certmon/v1/fleet/#
topic write certmon/v1/alerts/#
topic write certmon/v1/_collector/#

pattern write certmon/v1/%u/#
pattern read certmon/v1/_collector/#
"""


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()  # intermediates to ship with it

    def write(self, directory: Path, name: str, key_mode: int = 0o600) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                       for c in (self.cert, *self.chain)))
        key_path.write_bytes(self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        os.chmod(key_path, key_mode)
        return cert_path, key_path


def issue(cn: str, now: datetime, *, issuer: Issued | None = None, days: float = 365,
          not_before: datetime | None = None, is_ca: bool = False,
          server: bool = False) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or now - timedelta(hours=1)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.cert.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not is_ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    # What the certificate ships with: its issuer and that one's chain, without roots.
    chain = () if issuer is None else (issuer.cert, *issuer.chain)
    return Issued(cert, key, tuple(c for c in chain if not _self_signed(c)))


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


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


def demo_fleet(now: datetime) -> tuple[dict[str, Issued], list[DemoDevice]]:
    root = issue("certmon demo Fleet Root", now, days=3650, is_ca=True,
                 not_before=now - timedelta(days=400))
    devices_ca = issue("demo devices", now, issuer=root, days=1825, is_ca=True,
                       not_before=now - timedelta(days=300))
    short_ca = issue("demo devices (old CA)", now, issuer=root, days=30, is_ca=True,
                     not_before=now - timedelta(days=18))  # 12 days left
    services_ca = issue("demo services", now, issuer=root, days=1825, is_ca=True)
    broker_ca = issue("demo Broker Root 2020", now, days=3650, is_ca=True,
                      not_before=now - timedelta(days=2000))
    new_broker_ca = issue("demo Broker Root 2026", now, days=3650, is_ca=True)
    cas = {"root": root, "devices": devices_ca, "services": services_ca,
           "broker_ca": broker_ca, "new_broker_ca": new_broker_ca,
           "server": issue("localhost", now, issuer=broker_ca, days=200, server=True),
           "collector": issue("collector", now, issuer=services_ca, days=365)}
    full_trust = (root.cert, broker_ca.cert, new_broker_ca.cert)

    def dev(device_id: str, intended: str, story: str, *, issuer: Issued = devices_ca,
            days: float = 365, trust: tuple[x509.Certificate, ...] = full_trust,
            not_before: datetime | None = None, **kw: object) -> DemoDevice:
        return DemoDevice(device_id, intended, story,
                          issue(device_id, now, issuer=issuer, days=days, not_before=not_before),
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
    ]
    return cas, fleet


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None)
    if found is None:
        raise SystemExit("certmon demo: mosquitto is not installed "
                         "(Debian: sudo apt-get install mosquitto)")
    return found


def start_broker(work: Path, cas: dict[str, Issued]) -> tuple[subprocess.Popen[bytes], int]:
    server_cert, server_key = cas["server"].write(work, "broker")
    (work / "fleet-root.pem").write_bytes(pem(cas["root"].cert))
    (work / "acl").write_text(ACL)
    port = free_port()
    user = pwd.getpwuid(os.getuid()).pw_name
    conf = work / "mosquitto.conf"
    conf.write_text(f"""\
per_listener_settings false
allow_anonymous false
acl_file {work / 'acl'}
persistence false
log_dest file {work / 'mosquitto.log'}
user {user}
listener {port} 127.0.0.1
cafile {work / 'fleet-root.pem'}
certfile {server_cert}
keyfile {server_key}
require_certificate true
use_identity_as_username true
""")
    proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    log_text = (work / "mosquitto.log").read_text() if (work / "mosquitto.log").exists() else ""
    raise SystemExit(f"certmon demo: mosquitto did not start:\n{log_text}")


def runner_for(chrony: str) -> Callable[[Sequence[str]], str | None]:
    def run(argv: Sequence[str]) -> str | None:
        return chrony if argv and argv[0] == "chronyc" else None
    return run


@dataclass
class Demo:
    work: Path
    broker: subprocess.Popen[bytes]
    port: int
    collector: CollectorService
    web_url: str | None
    agents: list[AgentService]
    threads: list[threading.Thread]  # the collector's first, then the agents'
    subprocesses: list[subprocess.Popen[bytes]]
    fleet: list[DemoDevice]

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
            self.broker.terminate()
            try:
                self.broker.wait(10)
            except subprocess.TimeoutExpired:
                self.broker.kill()


def start_demo(work: Path, *, interval_s: int = 10, listen: str = "127.0.0.1:0") -> Demo:
    now = datetime.now(UTC)
    cas, fleet = demo_fleet(now)
    (work / "fleet.json").write_text(json.dumps(
        {d.device_id: {"intended": d.intended, "story": d.story} for d in fleet}, indent=2))
    broker, port = start_broker(work, cas)
    collector_cert, collector_key = cas["collector"].write(work, "collector")
    (work / "broker-ca.pem").write_bytes(pem(cas["broker_ca"].cert))
    new_ca = work / "new-broker-root.pem"
    new_ca.write_bytes(pem(cas["new_broker_ca"].cert))
    config_text = f"""\
[mqtt]
broker = "mqtts://127.0.0.1:{port}"
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
"""
    (work / "collector.toml").write_text(config_text)
    config = loads(CollectorConfig, config_text, source=str(work / "collector.toml"))
    from collector.app import build_collector

    collector = build_collector(config)
    collector.periodic = Periodic(beacon_every_s=5.0, silence_every_s=2.0, summary_every_s=10.0)
    # Fleet rules (required CAs, shared certificates) every few seconds, not every
    # minute: a demo should show them before the visitor loses interest.
    collector.jobs = [(name, min(every_s, 3.0), job, claimed)
                      for name, every_s, job, claimed in collector.jobs]
    collector_thread = threading.Thread(target=collector.run, name="collector", daemon=True)
    collector_thread.start()
    collector.link.wait_connected(10)
    web = getattr(collector, "web", None)
    agents, threads, procs = [], [collector_thread], []
    for device in fleet:
        directory = work / device.device_id
        directory.mkdir()
        cert, key = device.issued.write(directory, "device", key_mode=device.key_mode)
        (directory / "ca.pem").write_bytes(pem(*device.trust))
        agent_toml = directory / "agent.toml"
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
""")
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
    return Demo(work, broker, port, collector, web.url if web else None, agents, threads,
                procs, fleet)


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
    print(f"certmon demo: starting a broker, a collector and 11 agents in {work} …", flush=True)
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


def print_overview(demo: Demo, ready: bool) -> None:
    from collector.cli import build_report, render_report

    time.sleep(1.0)  # the silence check and the alert engine catch up
    if demo.collector.alerts is not None:
        demo.collector.alerts.sweep()  # fleet rules now, not at the next period
    print()
    for device in demo.fleet:
        print(f"  {device.device_id:9} should show {device.intended:9} {device.story}")
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
