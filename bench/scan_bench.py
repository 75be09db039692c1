"""Scanner throughput as users run it: the `certmon-scan` process vs the `openssl` loop.

Starts ONE mosquitto with N (default 200) TLS listeners on 127.0.0.1, all serving the
same leaf + intermediate from a small generated PKI, then times, --rounds times, each
contender once per round, the order rotated from round to round (so none always runs
first or right after the loop), each from process start to output written:
  1. `certmon-scan 127.0.0.1:P1 … --json` as a process (interpreter start, imports,
     probes and full verdicts at --concurrency 64, the JSON document on a pipe);
  2. one `sh -c 'for p in …; do openssl s_client -connect 127.0.0.1:$p -servername
     localhost </dev/null 2>/dev/null | openssl x509 -noout -dates; done'` process
     (dates of the leaf only: no chain, no verdict);
  3. optionally (--blackbox) Debian's prometheus-blackbox-exporter, tcp prober with TLS,
     N scrapes 16 at a time, if the binary is installed (a daemon already running:
     its start is not counted).
It prints each contender's median and range, then each target with its ratio twice,
as the ratio of the medians and as the median of the per-round ratios (the two
contenders of one round share that round's load on a shared machine), and PASS only
when both meet it. Loopback only.
Run: `.venv/bin/python bench/scan_bench.py [--n 200] [--rounds 5] [--blackbox]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from baseline import baseline_tree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit's PKI and broker (bench/README.md)

from kit.broker import Listener, Mosquitto, free_port, wait_until  # noqa: E402
from kit.pki import PKIFactory, write_bundle  # noqa: E402


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


def bench_certmon(ports: list[int], trust: Path, concurrency: int,
                  tree: Path | None = None) -> tuple[float, int]:
    """`certmon-scan … --json` as a process: start to exit, output read from a pipe
    (`tree`: a source tree's scanner instead, by `python -m scanner.cli`)."""
    scan = shutil.which("certmon-scan", path=str(Path(sys.executable).parent)) or "certmon-scan"
    program = [scan] if tree is None else [sys.executable, "-m", "scanner.cli"]
    argv = [*program, *(f"127.0.0.1:{p}" for p in ports), "--ca-bundle", str(trust),
            "--servername", "localhost", "--timeout-s", "10", "--concurrency",
            str(concurrency), "--json"]
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, check=False, cwd=tree, env=env)
    elapsed = time.perf_counter() - started
    doc = json.loads(out.stdout)
    return elapsed, sum(t["severity"] == "OK" for t in doc["targets"])


def bench_start() -> tuple[float, int]:
    """What any certmon-scan run pays before its first probe: the interpreter and the
    imports (`python -c "import scanner.cli"`), for the record, not a contender."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import scanner.cli"], check=True)
    return time.perf_counter() - started, 1


def bench_openssl(ports: list[int]) -> tuple[float, int]:
    """The loop users start from, as one shell process."""
    loop = (f"for p in {' '.join(map(str, ports))}; do openssl s_client -connect "
            "127.0.0.1:$p -servername localhost </dev/null 2>/dev/null | "
            "openssl x509 -noout -dates; done")
    started = time.perf_counter()
    out = subprocess.run(["sh", "-c", loop], capture_output=True, text=True, check=False)
    return time.perf_counter() - started, out.stdout.count("notAfter=")


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


TARGET_VS_OPENSSL = 20.0  # issue 14: >= 20x the sequential openssl loop
TARGET_VS_BLACKBOX = 1.0  # issue 14: not slower than blackbox_exporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="TLS listeners (default 200)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="each contender once a round")
    parser.add_argument("--baseline", default="HEAD",
                        help="also time the scanner of this git revision ('' for none)")
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
            bench_certmon(ports[:8], trust, args.concurrency)  # warm-up: page cache
            baseline = (baseline_tree(args.baseline, workdir / "baseline", ["certmon", "scanner"])
                        if args.baseline else None)
            binary = shutil.which("prometheus-blackbox-exporter")
            contenders: dict[str, Callable[[], tuple[float, int]]] = {
                "certmon": lambda: bench_certmon(ports, trust, args.concurrency)}
            if baseline is not None:
                contenders["baseline"] = lambda: bench_certmon(ports, trust, args.concurrency,
                                                               baseline)
            contenders["start"] = bench_start
            contenders["openssl"] = lambda: bench_openssl(ports)
            if args.blackbox and binary:
                contenders["blackbox"] = lambda: bench_blackbox(ports, workdir, binary)
            times, oks, cpu = run_rounds(contenders, args.rounds)
            report(args, len(ports), times, oks, cpu)
            if args.blackbox and not binary:
                print("blackbox_exporter: not installed "
                      "(apt-get install prometheus-blackbox-exporter); skipped")


def run_rounds(contenders: dict[str, Callable[[], tuple[float, int]]], rounds: int
               ) -> tuple[dict[str, list[float]], dict[str, int], dict[str, list[float]]]:
    """Each contender once per round, the order rotated each round; times in the order
    of the rounds, so that index r of two contenders is one round's pair. Also the CPU
    (user + system) of the processes each one ran and waited for: on a shared machine
    it moves much less than wall time."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    oks: dict[str, int] = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            seconds, oks[name] = contenders[name]()
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            times[name].append(seconds)
            cpu[name].append(after.ru_utime - before.ru_utime
                             + after.ru_stime - before.ru_stime)
    return times, oks, cpu


def ratios(slow: list[float], fast: list[float]) -> tuple[float, float, float, float]:
    """(ratio of the medians, median of the per-round ratios, their min, max)."""
    paired = [s / f for s, f in zip(slow, fast, strict=True)]
    return (statistics.median(slow) / statistics.median(fast), statistics.median(paired),
            min(paired), max(paired))


def report(args: argparse.Namespace, n: int, times: dict[str, list[float]],
           oks: dict[str, int], cpu: dict[str, list[float]]) -> None:
    ours = statistics.median(times["certmon"])

    def line(label: str, key: str, what: str | None) -> None:
        med = statistics.median(times[key])
        done = f"{med * 1000 / n:6.1f} ms/endpoint, {oks[key]}/{n} {what}; " if what else ""
        print(f"{label:44} {med:6.2f} s median ({min(times[key]):.2f}-"
              f"{max(times[key]):.2f}), {done}{med / ours:5.2f}x certmon's time; "
              f"CPU {statistics.median(cpu[key]):.2f} s")

    print(f"{n} endpoints, {args.rounds} rounds, order rotated each round")
    line(f"certmon-scan --json (process, conc. {args.concurrency})", "certmon", "OK")
    if "baseline" in times:
        line(f"certmon-scan --json at {args.baseline} (process)", "baseline", "OK")
    line("  of it: interpreter start + imports", "start", None)
    line("openssl s_client | x509 loop (process)", "openssl", "dates")
    if "blackbox" in times:
        # Its CPU: the daemon's whole life (start, 200 probes, stop), not the scrapes'
        # client side, which runs in this process.
        line("blackbox_exporter tcp+tls (16 concurrent)", "blackbox", "probe_success")
    of_medians, paired, low, high = ratios(times["openssl"], times["certmon"])
    passed = min(of_medians, paired) >= TARGET_VS_OPENSSL and oks["certmon"] == n
    print(f"target >= {TARGET_VS_OPENSSL:g}x the openssl loop: {of_medians:.1f}x (medians), "
          f"{paired:.1f}x (median of rounds, {low:.1f}-{high:.1f}x): "
          f"{'PASS' if passed else 'FAIL'}")
    if "blackbox" in times:
        # certmon's time over blackbox's: <= 1 is "not slower".
        of_medians, paired, low, high = ratios(times["certmon"], times["blackbox"])
        passed = max(of_medians, paired) <= TARGET_VS_BLACKBOX and oks["certmon"] == n
        print(f"target not slower than blackbox_exporter: certmon takes {of_medians:.2f}x "
              f"its time (medians), {paired:.2f}x (median of rounds, {low:.2f}-{high:.2f}x): "
              f"{'PASS' if passed else 'FAIL'}")
    else:
        print("target not slower than blackbox_exporter: not measured (--blackbox)")


if __name__ == "__main__":
    main()
