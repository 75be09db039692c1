"""Flood bench (issue 18): one device floods 60,000 valid statuses, two report every second.

Runs the story of tests/test_flood.py (real Mosquitto with the documented
configuration, a real collector with SQLite, the flooder as `mosquitto_pub -l` at
full speed, the healthy devices at `interval_s = 1`) with CERTMON_FLOOD statuses and
prints the figures instead of asserting them: the healthy devices' publish-to-stored
lag p50 / p99 / max, how fast the flood was published and drained, what the flooder
was counted (superseded / rate_limited / accepted) and the alerts.

    .venv/bin/python bench/flood.py            # 60,000
    .venv/bin/python bench/flood.py --flood 20000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flood", type=int, default=60_000, help="statuses the flooder sends")
    args = ap.parse_args()
    env = {**os.environ, "CERTMON_FLOOD": str(args.flood), "CERTMON_FLOOD_REPORT": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_flood.py", "-q", "-s",
         "-p", "no:cacheprovider", "-k", "flooding_device"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith(("flood ", "alerts:"))]
    print("\n".join(lines) if lines else run.stdout[-3000:] + run.stderr[-2000:])
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
