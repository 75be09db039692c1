"""`make bench`: every benchmark, each printing its own figures.

Quick sizes by default (a few minutes in all); `--full` runs the sizes the issues set
as targets (10,000 devices, 200 endpoints, 100,000-case fuzzing, a 10-minute load
test: about half an hour). docs/benchmarks.md records the full figures measured.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

QUICK = [
    ["check_bench.py", "--runs", "3"],
    ["agent_footprint.py", "--cycles", "5"],
    ["heartbeat_bytes.py", "--reports", "30"],
    ["collector_ingest.py", "--devices", "2000", "--per-device", "2", "--workers", "0,1"],
    ["scan_bench.py", "--n", "50"],
    ["api_bench.py", "--devices", "10000", "--repeat", "3"],
    ["fuzz_ingest.py", "--cases", "5000"],
    ["load_test.py", "--devices", "1000", "--interval-s", "30", "--minutes", "1"],
]
FULL = [
    ["check_bench.py"],
    ["agent_footprint.py", "--cycles", "20"],
    ["heartbeat_bytes.py"],
    ["collector_ingest.py", "--devices", "10000", "--per-device", "3"],
    ["scan_bench.py", "--n", "200", "--blackbox"],
    ["api_bench.py"],
    ["fuzz_ingest.py", "--cases", "100000"],
    ["load_test.py"],
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    failed = []
    for argv in FULL if args.full else QUICK:
        print(f"\n=== {' '.join(argv)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]]).returncode:
            failed.append(argv[0])
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
