"""The agent's footprint on a gateway: memory, CPU per report, status size, wake-ups.

Starts a Mosquitto on loopback with the certmon ACL and a generated fleet PKI, then runs
`certmon-agent run` as a separate process with the system CA bundle (plus the test
fleet's roots) as its trust store and `--interval-s 10`, and watches it from outside
with psutil while a subscriber counts its statuses:

- RSS (and USS: the pages only this process holds) after N reports (default 20);
- CPU time per report cycle (user + system, from the 2nd to the Nth report, so start-up
  is excluded; includes everything the process does between reports);
- idle wake-ups per second (voluntary context switches between reports): no busy loop;
- the signed status size in bytes as it crossed the broker.

Run: `.venv/bin/python bench/agent_footprint.py [--cycles 20]` (about 10 s per cycle).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit (bench/README.md)

import psutil  # noqa: E402
from kit.broker import Mosquitto, wait_until  # noqa: E402
from kit.brokerconf import BrokerFiles, documented_broker  # noqa: E402
from kit.mqttprobe import MqttProbe  # noqa: E402
from kit.pki import PKIFactory, write_bundle  # noqa: E402

from certmon import wire as p  # noqa: E402

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--interval-s", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = PKIFactory(datetime.now(UTC))
        root = pki.root("footprint Fleet Root", name="fp-root")
        devices = pki.intermediate(root, "footprint devices", name="fp-devices")
        services = pki.root("footprint Operations CA", name="fp-operations")
        broker_ca = pki.root("footprint Broker CA", name="fp-broker-ca")
        server = pki.leaf(broker_ca, "localhost", name="fp-server", usage="server",
                          sans=("localhost", "127.0.0.1"))
        server_cert, server_key = server.write(work)
        device_cert, device_key = pki.leaf(devices, "gw-footprint", name="fp-dev").write(
            work, chain=True)
        watcher_cert, watcher_key = pki.leaf(services, "collector", name="fp-col").write(
            work, chain=True)
        fleet_root = write_bundle(work / "fleet-root.pem", [root])
        roots = write_bundle(work / "roots.pem", [root, broker_ca])
        bundle = work / "ca-bundle.pem"
        system = SYSTEM_BUNDLE.read_bytes() if SYSTEM_BUNDLE.exists() else b""
        bundle.write_bytes(system + roots.read_bytes())
        n_system = system.count(b"BEGIN CERTIFICATE")
        documented = documented_broker(work / "broker-conf", BrokerFiles(
            fleet_ca=fleet_root, operations_ca=write_bundle(work / "ops.pem", [services]),
            certfile=server_cert, keyfile=server_key))
        broker = Mosquitto(work / "broker", documented.listeners,
                           extra_conf=documented.global_conf)
        with broker:
            port, operations_port = broker.ports
            watcher = MqttProbe("fp-watcher", ca_certs=str(roots), certfile=str(watcher_cert),
                                keyfile=str(watcher_key)).connect(operations_port)
            watcher.subscribe(p.status_topic(p.DEFAULT_PREFIX, "gw-footprint"))
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--broker",
                 f"mqtts://127.0.0.1:{port}", "--ca-bundle", str(bundle), "--cert",
                 str(device_cert), "--key", str(device_key), "--state-dir", str(work / "state"),
                 "--interval-s", str(args.interval_s)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            proc = psutil.Process(agent.pid)
            samples: list[tuple[int, float, int, float]] = []  # count, cpu, vol ctx, time

            def count() -> int:
                return len(watcher.messages)

            try:
                # The first report, then one per interval (plus one right after connect,
                # when the broker chain is first judged).
                for target in range(1, args.cycles + 1):
                    if not wait_until(lambda t=target: count() >= t, args.interval_s * 3):  # type: ignore[misc]
                        print(f"only {count()} statuses arrived", file=sys.stderr)
                        return 1
                    cpu = proc.cpu_times()
                    samples.append((count(), cpu.user + cpu.system,
                                    proc.num_ctx_switches().voluntary, time.monotonic()))
                mem = proc.memory_full_info()
                sizes = [len(payload) for _, payload, _ in watcher.messages]
            finally:
                agent.terminate()
                agent.wait(10)
                watcher.client.disconnect()
                watcher.client.loop_stop()
    (n0, cpu0, ctx0, t0), (n1, cpu1, ctx1, t1) = samples[1], samples[-1]
    cycles = n1 - n0
    print(f"trust store: {n_system} system CAs + 2 fleet roots; interval {args.interval_s} s")
    print(f"RSS after {n1} reports        : {mem.rss / 2**20:6.1f} MiB "
          f"(USS {mem.uss / 2**20:.1f} MiB)   target RSS <= 35 MiB")
    print(f"CPU per report cycle          : {(cpu1 - cpu0) / cycles * 1000:6.1f} ms "
          "(everything between reports included)   target <= 30 ms")
    print(f"idle wake-ups                 : {(ctx1 - ctx0) / (t1 - t0):6.2f} per second")
    print(f"status size (JWS, on the wire): {min(sizes)}–{max(sizes)} bytes   target <= 2048")
    return 0


if __name__ == "__main__":
    sys.exit(main())
