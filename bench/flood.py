"""Flood bench (issue 18): one device floods 60,000 valid statuses, two report every second.

Runs the story of tests/test_flood.py (real Mosquitto with the documented
configuration, a real collector with SQLite, the flooder as `mosquitto_pub -l` at
full speed, the healthy devices at `interval_s = 1` in a process of their own) with
CERTMON_FLOOD statuses and prints the figures instead of asserting them: the healthy
devices' publish-to-stored lag p50 / p99 / max, how fast the flood was published and
drained, what the flooder was counted (superseded / rate_limited / accepted) and the
alerts. With `--baseline REV` the collector code (certmon/, collector/) as of REV
runs the same story too, rounds interleaved, so both meet the same machine.

    .venv/bin/python bench/flood.py                         # 60,000, this tree
    .venv/bin/python bench/flood.py --baseline 4a1c3e0 --rounds 3
    .venv/bin/python bench/flood.py --flood 20000
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from baseline import baseline_tree

ROOT = Path(__file__).resolve().parent.parent


def story(flood: int, tree: Path) -> tuple[str, float | None]:
    # -P: the checkout is not put first on sys.path, so PYTHONPATH decides which
    # certmon/ and collector/ run (this tree's or the baseline's); the story says which.
    env = {**os.environ, "CERTMON_FLOOD": str(flood), "CERTMON_FLOOD_REPORT": "1",
           "PYTHONPATH": str(tree)}
    run = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "tests/test_flood.py", "-q", "-s",
         "-p", "no:cacheprovider", "-k", "flooding_device"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in run.stdout.splitlines()
             if ln.startswith(("flood ", "alerts:", "collector code:"))]
    if not lines:
        return run.stdout[-3000:] + run.stderr[-2000:], None
    found = re.search(r"p99 ([0-9.]+) s", "\n".join(lines))
    return "\n".join(lines), float(found.group(1)) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flood", type=int, default=60_000, help="statuses the flooder sends")
    ap.add_argument("--baseline", help="also run the collector as of this git revision")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees: dict[str, Path] = {"this tree": ROOT}
        if args.baseline:
            trees[f"baseline {args.baseline}"] = baseline_tree(
                args.baseline, Path(tmp) / "baseline", ["certmon", "collector"])
        p99s: dict[str, list[float]] = {label: [] for label in trees}
        for round_no in range(1, args.rounds + 1):
            for label, tree in trees.items():
                text, p99 = story(args.flood, tree)
                print(f"[round {round_no}, {label}]\n{text}", flush=True)
                if p99 is not None:
                    p99s[label].append(p99)
    for label, values in p99s.items():
        if values:
            print(f"{label}: healthy p99 median {statistics.median(values):.3f} s over "
                  f"{len(values)} rounds (each {', '.join(f'{v:.2f}' for v in values)}); "
                  f"target <= 2 s: {'met' if max(values) <= 2.0 else 'MISSED'} in "
                  f"{sum(v <= 2.0 for v in values)} of {len(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
