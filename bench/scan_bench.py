"""Scanner throughput: certmon's `scan_targets` vs the `openssl s_client` loop users start from.

Starts ONE mosquitto with N (default 200) TLS listeners on 127.0.0.1, all serving the
same leaf + intermediate from a small generated PKI, then times:
  1. `certmon.scan.scan_targets` over all N (probe + full verdict, concurrency 64);
  2. a sequential shell loop of
     `openssl s_client -connect 127.0.0.1:PORT -servername localhost </dev/null 2>/dev/null
      | openssl x509 -noout -dates` (dates of the leaf only: no chain, no verdict);
  3. optionally (--blackbox) Debian's prometheus-blackbox-exporter, tcp prober with TLS,
     16 concurrent scrapes, if the binary is installed.
Loopback only. Run: `.venv/bin/python bench/scan_bench.py [--n 200] [--concurrency 64]`.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit's PKI and broker (bench/README.md)

from kit.broker import Listener, Mosquitto, free_port, wait_until  # noqa: E402
from kit.pki import PKIFactory, write_bundle  # noqa: E402

from certmon.pki import Policy, Severity  # noqa: E402
from certmon.scan import load_trust, scan_targets  # noqa: E402
from certmon.tlsprobe import ProbeTarget  # noqa: E402


def raise_nofile(needed: int) -> None:
    # mosquitto needs one fd per listener plus one per client; the default soft limit of
    # 1024 is enough for 200 listeners but not for 1000, so lift it to the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            sys.exit(f"RLIMIT_NOFILE hard limit {hard} < {needed}: use a smaller --n")


@contextlib.contextmanager
def broker_with_listeners(workdir: Path, n: int) -> Iterator[tuple[Mosquitto, Path]]:
    pki = PKIFactory(datetime.now(UTC))
    root = pki.root("bench Root CA", name="bench-root")
    inter = pki.intermediate(root, "bench Intermediate CA", name="bench-int")
    leaf = pki.leaf(inter, "localhost", name="bench-leaf", usage="server",
                    sans=("localhost", "127.0.0.1"))
    cert, key = leaf.write(workdir, chain=True)
    trust = write_bundle(workdir / "trust.pem", [root])
    listeners = [Listener(tls=True, certfile=cert, keyfile=key) for _ in range(n)]
    with Mosquitto(workdir / "broker", listeners, start_timeout_s=120) as broker:
        yield broker, trust


def bench_certmon(ports: list[int], trust: Path, concurrency: int) -> tuple[float, int]:
    store = load_trust(str(trust))
    targets = [ProbeTarget("127.0.0.1", p, servername="localhost", timeout_s=10)
               for p in ports]
    started = time.perf_counter()
    reports = scan_targets(targets, store, datetime.now(UTC), Policy(), concurrency)
    elapsed = time.perf_counter() - started
    ok = sum(r.severity == Severity.OK for r in reports)
    return elapsed, ok


def bench_openssl(ports: list[int]) -> tuple[float, int]:
    ok = 0
    started = time.perf_counter()
    for port in ports:
        out = subprocess.run(
            f"openssl s_client -connect 127.0.0.1:{port} -servername localhost "
            "</dev/null 2>/dev/null | openssl x509 -noout -dates",
            shell=True, capture_output=True, text=True, check=False,
        )
        ok += "notAfter=" in out.stdout
    return time.perf_counter() - started, ok


def bench_blackbox(ports: list[int], workdir: Path, binary: str) -> tuple[float, int]:
    config = workdir / "blackbox.yml"
    config.write_text(
        "modules:\n  tls:\n    prober: tcp\n    timeout: 10s\n    tcp:\n"
        "      tls: true\n      tls_config:\n        insecure_skip_verify: true\n"
        "        server_name: localhost\n"
    )
    listen = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--web.listen-address={listen}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            try:
                with urllib.request.urlopen(f"http://{listen}/-/healthy", timeout=1):
                    return True
            except OSError:
                return False

        if not wait_until(up, 10):
            raise RuntimeError("blackbox_exporter did not come up")

        def scrape(port: int) -> bool:
            url = f"http://{listen}/probe?module=tls&target=127.0.0.1:{port}"
            with urllib.request.urlopen(url, timeout=15) as resp:
                return b"probe_success 1" in resp.read()

        started = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            ok = sum(pool.map(scrape, ports))
        return time.perf_counter() - started, ok
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="TLS listeners (default 200)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--blackbox", action="store_true",
                        help="also time prometheus-blackbox-exporter if installed")
    args = parser.parse_args()
    raise_nofile(args.n * 2 + 256)
    with tempfile.TemporaryDirectory(prefix="certmon-scan-bench-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        with broker_with_listeners(workdir, args.n) as (broker, trust):
            print(f"mosquitto with {args.n} TLS listeners ready in "
                  f"{time.perf_counter() - started:.1f} s")
            ports = broker.ports
            bench_certmon(ports[:8], trust, args.concurrency)  # warm-up: imports, first TLS
            ours, ours_ok = bench_certmon(ports, trust, args.concurrency)
            base, base_ok = bench_openssl(ports)
            n = len(ports)
            print(f"certmon scan_targets (concurrency {args.concurrency}): {ours:7.2f} s wall, "
                  f"{ours * 1000 / n:6.1f} ms/endpoint, {ours_ok}/{n} OK")
            print(f"openssl s_client | x509 loop (sequential):   {base:7.2f} s wall, "
                  f"{base * 1000 / n:6.1f} ms/endpoint, {base_ok}/{n} dates")
            print(f"ratio: {base / ours:.1f}x faster than the openssl loop")
            binary = shutil.which("prometheus-blackbox-exporter")
            if args.blackbox and binary:
                bb, bb_ok = bench_blackbox(ports, workdir, binary)
                print(f"blackbox_exporter tcp+tls (16 concurrent scrapes): {bb:7.2f} s wall, "
                      f"{bb * 1000 / n:6.1f} ms/endpoint, {bb_ok}/{n} probe_success; "
                      f"ratio {bb / ours:.1f}x")
            elif args.blackbox:
                print("blackbox_exporter: not installed "
                      "(apt-get install prometheus-blackbox-exporter); skipped")


if __name__ == "__main__":
    main()
