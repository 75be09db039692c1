"""`certmon-agent check` on the system CA bundle versus the openssl loop users start from.

Prints wall time and peak RSS of one `certmon-agent check --ca-bundle BUNDLE --json`
(best of N runs, a fresh process each time, so Python start-up and imports are counted)
next to a shell loop of `openssl x509 -noout -enddate` over the bundle split into one
file per certificate (the split itself is not timed). Run: `python bench/check_bench.py`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_measured(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one child process, via wait4's rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", default="/etc/ssl/certs/ca-certificates.crt")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    bundle = Path(args.bundle)
    agent = shutil.which("certmon-agent", path=str(Path(sys.executable).parent)) or "certmon-agent"
    certmon = [min(run_measured([agent, "check", "--ca-bundle", str(bundle), "--json"])
                   for _ in range(args.runs))]
    text = bundle.read_text()
    blocks = [b + "-----END CERTIFICATE-----\n" for b in text.split("-----END CERTIFICATE-----")
              if "-----BEGIN CERTIFICATE-----" in b]
    with tempfile.TemporaryDirectory() as tmp:
        for i, block in enumerate(blocks):
            Path(tmp, f"{i:04d}.pem").write_text(block)
        loop = f'for f in {tmp}/*.pem; do openssl x509 -noout -enddate -in "$f"; done'
        openssl = [min(run_measured(["sh", "-c", loop]) for _ in range(args.runs))]
    (c_wall, c_rss), (o_wall, _) = certmon[0], openssl[0]
    print(f"bundle: {bundle} ({len(blocks)} certificates), best of {args.runs} runs")
    print(f"certmon-agent check --json : {c_wall * 1000:8.1f} ms  "
          f"peak RSS {c_rss / 2**20:5.1f} MiB  (every cert: facts, expiry, strength, duplicates)")
    print(f"openssl x509 -enddate loop : {o_wall * 1000:8.1f} ms  (not_after only)")
    print(f"speed-up                   : {o_wall / c_wall:8.1f}x  "
          "(target >= 10x; RSS target < 40 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
