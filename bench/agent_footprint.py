"""The agent's footprint on a gateway: memory, CPU per report, status size, wake-ups.

Starts a Mosquitto on loopback with the certmon ACL and a generated fleet PKI, then runs
`certmon-agent run` as separate processes, side by side on the same broker, each with its
own device certificate, the system CA bundle (plus the test fleet's roots) as its trust
store and `--interval-s 10`: this tree's code and the baseline's (`--baseline REV`,
default HEAD: `git archive` of certmon/ and agent/ into a temporary directory, run with
PYTHONPATH; `--tree LABEL=DIR` adds any other source tree), plus a bare process that
imports paho and cryptography.x509 and opens one mTLS MQTT session (the floor of the
chosen parts). Each is watched from outside with psutil while a subscriber counts
statuses:

- a `certmon-agent check --json` and a `certmon-agent show` on the same bundle, each a
  fresh interpreter (what a short-lived checker started with exec instead of fork
  would cost per cycle: peak RSS and CPU);
- steady RSS and USS (the pages only this process holds) after N reports (default 20),
  and peak RSS: the kernel's VmHWM of the process and of every child it forks (the
  two-process agent checks each report in a forked child: a thread polls the
  children's VmHWM every 2 ms, so the peak of a ~0.1 s child is caught);
- CPU time per report cycle (user + system of the process and of its waited-for
  children — the forked checker, `timedatectl` — from the 2nd to the Nth report, so
  start-up is excluded; includes everything between reports);
- idle wake-ups per second (voluntary context switches between reports): no busy loop;
- the signed status size in bytes as it crossed the broker;
- a signer forked per report from the resident's imports (the variant that checks only
  when inputs change still signs each report): through `certmon.wire`, and with
  `cryptography` alone (the floor of any signer), CPU and peak RSS of each child.

Run: `.venv/bin/python bench/agent_footprint.py [--cycles 20] [--baseline HEAD]`
(about 10 s per cycle; all agents run at once).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from baseline import baseline_tree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit (bench/README.md)

import psutil  # noqa: E402
from kit.broker import Mosquitto, wait_until  # noqa: E402
from kit.brokerconf import BrokerFiles, documented_broker  # noqa: E402
from kit.mqttprobe import MqttProbe  # noqa: E402
from kit.pki import PKIFactory, write_bundle  # noqa: E402

from certmon import wire as p  # noqa: E402

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


FLOOR = """
import resource, ssl, sys, time
import paho.mqtt.client as mqtt
ca, cert, key, port, client_id = sys.argv[1:6]
if sys.argv[6:] == ["cryptography"]:
    import cryptography.x509  # noqa: F401
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
c.connect("127.0.0.1", int(port))
c.loop_start()
time.sleep(3600)
"""


CHECK = """
import resource, subprocess, sys
done = subprocess.run([sys.executable, "-m", "agent.cli", *sys.argv[1:]],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
"""


# What a per-report signer forked from the resident process would cost (the variant
# that runs the full checker only when inputs change still signs every report): from
# a process holding the resident's imports, N forked children each sign one
# heartbeat-sized payload with the device key, through certmon.wire (as the agent
# must: the JWS is spelled there) or with cryptography alone (the floor).
SIGNERS = """
import os, resource, statistics, sys
import agent.resident  # noqa: F401 - the resident's imports, inherited by each fork
cert, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def wire():
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from certmon import wire as p
    k = serialization.load_pem_private_key(open(key, "rb").read(), None)
    p.sign_jws(b"{}" * 200, k, x509.load_pem_x509_certificate(open(cert, "rb").read()),
               typ=p.HEARTBEAT_TYP)
def floor():
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    k = serialization.load_pem_private_key(open(key, "rb").read(), None)
    k.sign(b"{}" * 200, ec.ECDSA(hashes.SHA256()))
for name, sign in (("wire", wire), ("floor", floor)):
    cpu, peak = [], []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            sign()
            os._exit(0)
        _, _, usage = os.wait4(pid, 0)
        cpu.append((usage.ru_utime + usage.ru_stime) * 1000)
        peak.append(usage.ru_maxrss / 1024)
    print(name, statistics.median(cpu), max(peak))
"""


@dataclass
class Run:
    label: str
    proc: subprocess.Popen[bytes]
    topic: str | None  # None: the floor process publishes nothing
    samples: list[tuple[int, float, int, float]] = field(default_factory=list)
    mem: Any = None
    peak_rss: int = 0
    child_peak_rss: int = 0  # the largest VmHWM any forked child reached
    children_seen: set[int] = field(default_factory=set)


def watch_children(runs: list[Run], stop: threading.Event) -> None:
    """Poll each agent's children's VmHWM (a high-water mark: a late sample is the
    peak so far) until `stop`."""
    while not stop.is_set():
        for run in runs:
            try:
                children = psutil.Process(run.proc.pid).children()
            except psutil.Error:
                continue
            for child in children:
                run.children_seen.add(child.pid)
                run.child_peak_rss = max(run.child_peak_rss, peak_rss(child.pid))
        stop.wait(0.002)


def peak_rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # exited meanwhile
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def fresh_run(argv: list[str]) -> tuple[float, float]:
    """(peak RSS KiB, CPU ms) of one `certmon-agent ARGV` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", CHECK, *argv], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rss_kib, cpu_s = out.stdout.split()
    return float(rss_kib), float(cpu_s) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--interval-s", type=int, default=10)
    parser.add_argument("--baseline", default="HEAD", help="git revision ('' for none)")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                        help="another source tree (holding certmon/ and agent/) to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = [("this tree", ROOT)]
        if args.baseline:
            trees.append((args.baseline, baseline_tree(args.baseline, work / "baseline",
                                                       ["certmon", "agent"])))
        for spec in args.tree:
            label, _, where = spec.partition("=")
            trees.append((label, Path(where)))
        pki = PKIFactory(datetime.now(UTC))
        root = pki.root("footprint Fleet Root", name="fp-root")
        devices = pki.intermediate(root, "footprint devices", name="fp-devices")
        services = pki.root("footprint Operations CA", name="fp-operations")
        broker_ca = pki.root("footprint Broker CA", name="fp-broker-ca")
        server = pki.leaf(broker_ca, "localhost", name="fp-server", usage="server",
                          sans=("localhost", "127.0.0.1"))
        server_cert, server_key = server.write(work)
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
            runs: list[Run] = []
            for i, (label, tree) in enumerate(trees):
                device_id = f"gw-footprint-{i}"
                cert, key = pki.leaf(devices, device_id, name=f"fp-dev{i}").write(
                    work, chain=True)
                topic = p.status_topic(p.DEFAULT_PREFIX, device_id)
                watcher.subscribe(topic)
                runs.append(Run(label, subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "run", "--broker",
                     f"mqtts://127.0.0.1:{port}", "--ca-bundle", str(bundle), "--cert",
                     str(cert), "--key", str(key), "--state-dir", str(work / f"state{i}"),
                     "--interval-s", str(args.interval_s),
                     # The two-process design is opt-in (agent.fork_checks); measured here.
                     *(["--fork-checks", "true"] if label == "this tree" else [])],
                    cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), topic))
            # Floors: an MQTT session alone (what a long-lived publisher beside a
            # short-lived checker would cost), and with cryptography imported too.
            for floor, extra in (("paho+cryptography", ["cryptography"]), ("paho alone", [])):
                floor_id = f"gw-floor-{len(extra)}"
                floor_cert, floor_key = pki.leaf(devices, floor_id, name=floor_id).write(
                    work, chain=True)
                runs.append(Run(floor, subprocess.Popen(
                    [sys.executable, "-c", FLOOR, str(roots), str(floor_cert), str(floor_key),
                     str(port), floor_id, *extra],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), None))

            def count(topic: str) -> int:
                return sum(1 for t, _, _ in list(watcher.messages) if t == topic)

            stop_watch = threading.Event()
            watcher_thread = threading.Thread(target=watch_children, args=(runs, stop_watch),
                                              daemon=True)
            watcher_thread.start()
            try:
                # The first report, then one per interval (plus one right after connect,
                # when the broker chain is first judged).
                for target in range(1, args.cycles + 1):
                    for run in runs:
                        if run.topic is None:
                            continue
                        topic = run.topic
                        if not wait_until(lambda t=target, tp=topic: count(tp) >= t,  # type: ignore[misc]
                                          args.interval_s * 3):
                            print(f"{run.label}: only {count(topic)} statuses arrived",
                                  file=sys.stderr)
                            return 1
                        proc = psutil.Process(run.proc.pid)
                        run.samples.append((count(topic), cpu_s(proc),
                                            proc.num_ctx_switches().voluntary,
                                            time.monotonic()))
                for run in runs:
                    run.mem = psutil.Process(run.proc.pid).memory_full_info()
                    run.peak_rss = peak_rss(run.proc.pid)
                sizes = {run.label: [len(payload) for t, payload, _ in watcher.messages
                                     if t == run.topic] for run in runs}
            finally:
                stop_watch.set()
                watcher_thread.join()
                for run in runs:
                    run.proc.terminate()
                    run.proc.wait(10)
                watcher.client.disconnect()
                watcher.client.loop_stop()
        # Fresh interpreters on the same files (the broker is gone: `show` does not
        # connect): a checker started with exec instead of fork would cost this.
        show_cert, show_key = pki.leaf(devices, "gw-footprint-show", name="fp-show").write(
            work, chain=True)
        signers = subprocess.run(
            [sys.executable, "-c", SIGNERS, str(show_cert), str(show_key), "9"],
            capture_output=True, text=True, check=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split("\n")
        fresh = {label: fresh_run(argv) for label, argv in (
            ("check --json (fresh)", ["check", "--ca-bundle", str(bundle), "--json"]),
            ("show (fresh)", ["show", "--broker", "mqtts://127.0.0.1:1", "--ca-bundle",
                              str(bundle), "--cert", str(show_cert), "--key", str(show_key),
                              "--state-dir", str(work / "state-show")]))}
    mib = 2 ** 20
    print(f"trust store: {n_system} system CAs + 2 fleet roots; interval {args.interval_s} s; "
          f"{args.cycles} reports; all processes side by side")
    print(f"{'process':22} {'RSS MiB':>8} {'peak':>6} {'USS':>6} {'CPU ms/cycle':>13} "
          f"{'wake-ups/s':>11} {'status bytes':>13} {'children (peak MiB)':>20}")
    for run in runs:
        if run.samples:
            (n0, cpu0, ctx0, t0), (n1, cpu1, ctx1, t1) = run.samples[1], run.samples[-1]
            cpu = f"{(cpu1 - cpu0) / (n1 - n0) * 1000:13.1f}"
            wake = f"{(ctx1 - ctx0) / (t1 - t0):11.2f}"
            size = f"{min(sizes[run.label])}-{max(sizes[run.label])}"
        else:
            cpu, wake, size = f"{'-':>13}", f"{'-':>11}", "-"
        peak = max(run.peak_rss, run.child_peak_rss)
        kids = (f"{len(run.children_seen)} ({run.child_peak_rss / mib:.1f})"
                if run.children_seen else "-")
        print(f"{run.label:22} {run.mem.rss / mib:8.1f} {peak / mib:6.1f} "
              f"{run.mem.uss / mib:6.1f} {cpu} {wake} {size:>13} {kids:>20}")
    for label, (rss_kib, cpu_ms) in fresh.items():
        print(f"{label:22} {'-':>8} {rss_kib / 1024:6.1f} {'-':>6} {cpu_ms:13.1f}   "
              "(one short-lived run: peak RSS, CPU)")
    for line in filter(None, signers):
        name, cpu_ms, peak_mib = line.split()
        label = "signer via certmon.wire" if name == "wire" else "signer, cryptography only"
        print(f"{label:26} {'-':>4} {float(peak_mib):6.1f} {'-':>6} {float(cpu_ms):13.1f}   "
              "(forked from the resident's imports: median of 9)")
    print("targets: steady RSS <= 30 MiB, peak <= 40 MiB, CPU <= 30 ms per cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
