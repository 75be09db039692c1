"""The fleet simulator: a simulated fleet with chosen problems, published to a broker.

    python bench/fleetsim.py --broker mqtt://127.0.0.1:1884 --devices 500 \
        --interval-s 30 --expiring 0.1 --clock-behind 0.05 --duration-s 300 \
        --ca-out sim-ca.pem

It writes the simulated fleet's CA to --ca-out (give it to the collector as a
--fleet-ca), publishes every device's cert message, then each device's signed status
once per interval (spread evenly), a chosen fraction of them with an expiring
certificate or a clock two days behind. It connects anonymously or with --cert/--key
(a broker ACL that lets one client write every device's topics is a test set-up, not
a production one). Loopback only.

Owns: the simulator's command line and its publishing loop, and `bench_site`, the
broker and credentials the ingest and load benchmarks (bench/collector_ingest.py,
bench/load_test.py) share.
Must not: issue certificates or build statuses itself — the devices, their
certificates, statuses and cert messages come from the test kit (tests/kit/fleet.py,
tests/kit/pki.py; see bench/README.md for why bench may import it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kit.broker import Listener, Mosquitto
from kit.brokerconf import BrokerFiles, documented_broker
from kit.fleet import (
    SimCA,
    SimDevice,
    cert_message,
    clock_behind_finding,
    expiring_finding,
    make_ca,
    make_devices,
    signed_status,
)
from kit.pki import PKIFactory

from certmon import wire as p


@dataclass(frozen=True)
class BenchSite:
    """A broker and the credentials a benchmark's collector needs (not started)."""

    devices_ca: SimCA  # issues the simulated devices
    ca_bundle: Path  # the broker's CA, for the collector's connection
    fleet_ca: Path  # the fleet root, for the collector's verification
    collector_cert: Path
    collector_key: Path
    broker: Mosquitto  # listeners [plain, devices, operations] (see bench_site)
    work: Path  # where the site's files are
    now: datetime  # what its certificates are issued relative to

    @property
    def plain_port(self) -> int:
        """Anonymous, no ACL: where the benchmark's publisher plays the whole fleet."""
        return self.broker.listeners[0].port

    @property
    def collector_port(self) -> int:
        """The documented operations listener, where the collector logs in."""
        return self.broker.listeners[2].port

    def devices(self, n: int, prefix: str) -> list[SimDevice]:
        return make_devices(self.devices_ca, n, self.now, prefix=prefix)


@contextlib.contextmanager
def bench_fleet(label: str, n: int) -> Iterator[tuple[BenchSite, list[SimDevice]]]:
    """A `bench_site` in a fresh temporary directory (removed afterwards) and `n`
    devices `<label>-00000`… issued by its devices CA, now."""
    with tempfile.TemporaryDirectory() as tmp:
        site = bench_site(Path(tmp), utc_now(), label)
        yield site, site.devices(n, prefix=label)


def bench_site(work: Path, now: datetime, label: str) -> BenchSite:
    """The PKI and Mosquitto the ingest and load benchmarks share: a fleet root with a
    devices CA, an operations CA (the collector), a broker CA, and one broker with a
    plain anonymous listener (the publisher) beside the documented device and
    operations listeners (the collector), its queue limits raised further."""
    factory = PKIFactory(now)
    fleet_root = factory.root(f"{label} Fleet Root", name=f"{label}-fleet-root")
    services = factory.root(f"{label} Operations CA", name=f"{label}-operations-ca")
    broker_ca = factory.root(f"{label} Broker CA", name=f"{label}-broker-ca")
    server = factory.leaf(broker_ca, "localhost", usage="server",
                          sans=("localhost", "127.0.0.1"))
    server_cert, server_key = server.write(work)
    collector_cert, collector_key = factory.leaf(services, "collector").write(work, chain=True)
    ca_bundle, fleet_ca = work / "ca.pem", work / "fleet-root.pem"
    ca_bundle.write_bytes(broker_ca.cert_pem())
    fleet_ca.write_bytes(fleet_root.cert_pem())
    operations_ca = work / "operations-ca.pem"
    operations_ca.write_bytes(services.cert_pem())
    documented = documented_broker(work / "broker-conf", BrokerFiles(
        fleet_ca=fleet_ca, operations_ca=operations_ca, certfile=server_cert,
        keyfile=server_key))
    broker = Mosquitto(work / "broker", [Listener(allow_anonymous=True), *documented.listeners],
                       extra_conf=documented.global_conf
                       + "max_queued_messages 1000000\nmax_queued_bytes 0\n")
    devices_ca = make_ca(f"{label} devices", now, issuer=SimCA(fleet_root.cert, fleet_root.key))
    return BenchSite(devices_ca, ca_bundle, fleet_ca, collector_cert, collector_key, broker,
                     work, now)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import random
    import time
    import urllib.parse

    import paho.mqtt.client as mqtt
    from cryptography.hazmat.primitives import serialization

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
    Path(args.ca_out).write_bytes(root.cert.public_bytes(serialization.Encoding.PEM))
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
    sys.exit(main())
