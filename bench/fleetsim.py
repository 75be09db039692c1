"""A simulated fleet for benchmarks and load tests: real keys, real signatures, real MQTT.

Each simulated device has its own P-256 key and a certificate from a fleet CA, and
publishes what a real agent publishes: the retained cert message and signed status v1
messages. Statuses are built from a template (a healthy device's facts) rather than by
running the agent's checks per device, so ten thousand devices cost seconds, not
minutes; what the collector does with them — verify, store, evaluate — is the real work.

Used by bench/collector_ingest.py and bench/load_test.py, and runnable on its own as
the fleet simulator:

    python bench/fleetsim.py --broker mqtt://127.0.0.1:1884 --devices 500 \
        --interval-s 30 --expiring 0.1 --clock-behind 0.05 --duration-s 300 \
        --ca-out sim-ca.pem

It writes the simulated fleet's CA to --ca-out (give it to the collector as a
--fleet-ca), publishes every device's cert message, then each device's signed status
once per interval (spread evenly), a chosen fraction of them with an expiring
certificate or a clock two days behind. It connects anonymously or with --cert/--key
(a broker ACL that lets one client write every device's topics is a test set-up, not
a production one). Loopback only.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certmon import protocol as p
from certmon.pki import Severity


@dataclass(frozen=True)
class SimCA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SimDevice:
    device_id: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # intermediates the device ships


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, now: datetime, issuer: SimCA | None = None, days: int = 3650) -> SimCA:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer.cert.subject if issuer else _name(cn))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(days=1))
               .not_valid_after(now + timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return SimCA(cert, key)


def make_devices(ca: SimCA, n: int, now: datetime, *, prefix: str = "sim",
                 days: int = 365) -> list[SimDevice]:
    out = []
    for i in range(n):
        device_id = f"{prefix}-{i:05d}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(device_id))
                .issuer_name(ca.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(days=1))
                .not_valid_after(now + timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca.key, hashes.SHA256()))
        out.append(SimDevice(device_id, key, cert, (ca.cert,)))
    return out


def cert_message(dev: SimDevice) -> bytes:
    der = [c.public_bytes(serialization.Encoding.DER) for c in (dev.cert, *dev.chain)]
    return p.encode_message(p.CertMessage(
        device_id=dev.device_id, sha256=dev.cert.fingerprint(hashes.SHA256()).hex(),
        x5c=tuple(base64.b64encode(d).decode() for d in der)))


def status(dev: SimDevice, seq: int, now: datetime, *, boot_id: str = "sim-boot",
           interval_s: int = 60, findings: Sequence[p.FindingWire] = ()) -> p.Status:
    sha = dev.cert.fingerprint(hashes.SHA256()).hex()
    ca_sha = dev.chain[0].fingerprint(hashes.SHA256()).hex() if dev.chain else sha
    return p.Status(
        device_id=dev.device_id, boot_id=boot_id, seq=seq, ts=now, mono_s=1000.0 + seq,
        interval_s=interval_s,
        client=p.CertSummary(sha256=sha, not_after=dev.cert.not_valid_after_utc,
                             key_matches=True, key_mode="0600"),
        client_chain=p.ChainSummary(valid_now=True, valid_at_warn=True, method="cryptography",
                                    error=None, path=(p.cert_ref(sha), p.cert_ref(ca_sha)),
                                    earliest_not_after=dev.cert.not_valid_after_utc,
                                    earliest_ref=p.cert_ref(sha)),
        trust_store=p.TrustStoreSummary(count=2, digest=p.trust_store_digest([ca_sha]),
                                        expiring=()),
        broker=None,
        clock=p.ClockSummary(synced=True, source="chrony", offset_s=0.01, maxerror_s=0.05,
                             plausible=True, beacon=None),
        findings=tuple(findings),
        agent=p.AgentSelf(version="sim", uptime_s=float(seq * interval_s), rss_bytes=30_000_000,
                          last_publish_ok_at=None, spool_depth=0, spool_dropped=0),
    )


def signed_status(dev: SimDevice, seq: int, now: datetime, **kw: object) -> bytes:
    return p.sign_status(p.encode_status(status(dev, seq, now, **kw)),  # type: ignore[arg-type]
                         dev.key, dev.cert)


def expiring_finding(days_left: float, now: datetime) -> p.FindingWire:
    severity = Severity.CRITICAL if days_left <= 7 else Severity.WARNING
    return p.FindingWire(code="CERT_EXPIRING", severity=severity, cert=None,
                         msg=f"client certificate expires in {days_left:.1f} days",
                         not_after=now + timedelta(days=days_left))


@dataclass(frozen=True)
class BenchSite:
    """A broker and the credentials a benchmark's collector needs (not started)."""

    devices_ca: SimCA  # issues the simulated devices
    ca_bundle: Path  # the broker's CA, for the collector's connection
    fleet_ca: Path  # the fleet root, for the collector's verification
    collector_cert: Path
    collector_key: Path
    broker: Any  # tests/broker.py Mosquitto: listeners [plain, mTLS]


def bench_site(work: Path, now: datetime, label: str) -> BenchSite:
    """The PKI and Mosquitto the ingest and load benchmarks share: a fleet root with a
    services CA (the collector) and a devices CA, a broker CA, and one broker with a
    plain listener (the publisher) and an mTLS listener (the collector), its queue
    limits raised as docs/mosquitto.md recommends. Needs tests/ on sys.path."""
    from broker import Listener, Mosquitto
    from conftest import FLEET_ACL
    from pkifactory import PKIFactory

    factory = PKIFactory(now)
    fleet_root = factory.root(f"{label} Fleet Root", name=f"{label}-fleet-root")
    services = factory.intermediate(fleet_root, f"{label} services")
    broker_ca = factory.root(f"{label} Broker CA", name=f"{label}-broker-ca")
    server = factory.leaf(broker_ca, "localhost", usage="server",
                          sans=("localhost", "127.0.0.1"))
    server_cert, server_key = server.write(work)
    collector_cert, collector_key = factory.leaf(services, "collector").write(work, chain=True)
    ca_bundle, fleet_ca = work / "ca.pem", work / "fleet-root.pem"
    ca_bundle.write_bytes(broker_ca.cert_pem())
    fleet_ca.write_bytes(fleet_root.cert_pem())
    broker = Mosquitto(work / "broker", [
        Listener(),
        Listener(tls=True, certfile=server_cert, keyfile=server_key, cafile=fleet_ca,
                 require_certificate=True, use_identity_as_username=True),
    ], acl=FLEET_ACL, extra_conf="max_queued_messages 1000000\nmax_queued_bytes 0\n"
                                "max_inflight_messages 1000\n")
    devices_ca = make_ca(f"{label} devices", now, issuer=SimCA(fleet_root.cert, fleet_root.key))  # type: ignore[arg-type]
    return BenchSite(devices_ca, ca_bundle, fleet_ca, collector_cert, collector_key, broker)


def clock_behind_finding() -> p.FindingWire:
    return p.FindingWire(code="CLOCK_BEHIND", severity=Severity.CRITICAL, cert=None,
                         msg="device clock is 172800.000 s behind (2.00 days) per chrony")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import random
    import time
    import urllib.parse

    import paho.mqtt.client as mqtt

    parser = argparse.ArgumentParser(prog="fleetsim", description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                        help="mqtt://host:port or mqtts://host:port (loopback)")
    parser.add_argument("--ca-bundle", help="CA for an mqtts:// broker")
    parser.add_argument("--cert", help="client certificate (mTLS listeners)")
    parser.add_argument("--key")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--interval-s", type=float, default=60.0)
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--expiring", type=float, default=0.0,
                        help="fraction of devices whose certificate expires in 5 days")
    parser.add_argument("--clock-behind", type=float, default=0.0,
                        help="fraction of devices reporting a clock 2 days behind")
    parser.add_argument("--prefix", default="sim")
    parser.add_argument("--ca-out", default="fleetsim-ca.pem")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    url = urllib.parse.urlsplit(args.broker)
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the simulator only talks to a broker on this machine (loopback)")
    rng = random.Random(args.seed)
    now = utc_now()
    root = make_ca("fleetsim Fleet Root", now)
    devices_ca = make_ca("fleetsim devices", now, issuer=root)
    with open(args.ca_out, "wb") as f:
        f.write(root.cert.public_bytes(serialization.Encoding.PEM))
    n_expiring = int(args.devices * args.expiring)
    devices = (make_devices(devices_ca, n_expiring, now, prefix=f"{args.prefix}-exp", days=5)
               + make_devices(devices_ca, args.devices - n_expiring, now, prefix=args.prefix))
    behind = set(rng.sample(range(len(devices)), int(args.devices * args.clock_behind)))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleetsim-{os.getpid()}",
                         protocol=mqtt.MQTTv5)
    if url.scheme == "mqtts":
        client.tls_set(ca_certs=args.ca_bundle, certfile=args.cert, keyfile=args.key)
    client.max_inflight_messages_set(100)
    client.connect(url.hostname, url.port or (8883 if url.scheme == "mqtts" else 1883))
    client.loop_start()
    for dev in devices:
        client.publish(p.cert_topic(p.DEFAULT_PREFIX, dev.device_id), cert_message(dev),
                       qos=1, retain=True)
    print(f"fleetsim: {len(devices)} devices ({n_expiring} expiring, {len(behind)} clock "
          f"behind), CA in {args.ca_out}, {args.interval_s:g} s interval", flush=True)
    start, seq, sent = time.monotonic(), 0, 0
    while time.monotonic() - start < args.duration_s:
        seq += 1
        round_start = time.monotonic()
        for i, dev in enumerate(devices):
            # Spread evenly over the interval, as a real fleet's jitter does.
            time.sleep(max(0.0, round_start + i * args.interval_s / len(devices)
                           - time.monotonic()))
            at = utc_now()
            findings: list[p.FindingWire] = []
            if dev.device_id.startswith(f"{args.prefix}-exp"):
                findings.append(expiring_finding((dev.cert.not_valid_after_utc - at)
                                                 .total_seconds() / 86400, at))
            if i in behind:
                findings.append(clock_behind_finding())
            token = signed_status(dev, seq, at, interval_s=int(args.interval_s),
                                  findings=findings)
            client.publish(p.status_topic(p.DEFAULT_PREFIX, dev.device_id), token, qos=1,
                           retain=True)
            sent += 1
        time.sleep(max(0.0, round_start + args.interval_s - time.monotonic()))
    client.disconnect()
    client.loop_stop()
    print(f"fleetsim: {sent} statuses published in {time.monotonic() - start:.0f} s")
    return 0


def utc_now() -> datetime:
    return datetime.now(UTC)


if __name__ == "__main__":
    import sys

    sys.exit(main())
