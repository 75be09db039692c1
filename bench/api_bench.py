"""Dashboard API latency on a large fleet: every endpoint the page calls, over real HTTP.

Seeds SQLite with `tests/kit/seed.seed_fleet` (default 100,000 devices: each holds a
client cert, the fleet intermediate, two broker certs and 1-3 trust-store CAs, i.e.
~630k device_certs rows over ~100k certificate rows), kept in --db between runs, then
reports the cold cost (the first request, which builds the fleet snapshot from the
store) and times each endpoint warm (median of --repeat), the dashboard's normal mode:
one snapshot per TTL shared by all endpoints, rebuilt in the background.
Target: <= 300 ms per endpoint. Loopback only.
Run: `.venv/bin/python bench/api_bench.py [--devices 100000] [--db /tmp/certmon-bench.db]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit (bench/README.md)

from kit.seed import Pki, device_ids, seed_fleet  # noqa: E402

from collector.store import Store, open_store  # noqa: E402
from collector.web import TrustRequirementView, start_web  # noqa: E402
from collector.web.api import build_snapshot  # noqa: E402

ENDPOINTS = ["/api/summary", "/api/devices?state=at_risk&limit=100",
             "/api/devices?q=0042&sort=days_left", "/api/timeline?weeks=26", "/api/cas",
             "/api/brokers", "/api/clock",
             "/api/alerts?limit=50", "/api/devices/{device}", "/metrics"]
SEED_AT = datetime(2026, 11, 1, tzinfo=UTC)  # fixed: a kept database stays valid


def seeded(db: Path, n: int) -> Store:
    store = open_store(f"sqlite:///{db}")
    store.migrate()
    have = store.fleet_counts()["total"]
    if have != n:
        store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        store = open_store(f"sqlite:///{db}")
        t0 = time.perf_counter()
        seed_fleet(store, SEED_AT, n=n, seed=1, batch=1000)
        print(f"seeded {n} devices in {time.perf_counter() - t0:.1f} s")
    return store


def fetch(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as resp:
        size = len(resp.read())
    return time.perf_counter() - t0, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--db", type=Path, default=Path("/tmp/certmon-bench-api.db"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    store = seeded(args.db, args.devices)
    pki = Pki.build(SEED_AT, 1)
    reqs = [TrustRequirementView("Fleet Root CA 2", pki.new_root.sha256, "required"),
            TrustRequirementView("Legacy Root CA", pki.old_root.sha256, "retiring")]
    device = device_ids(args.devices)[args.devices // 2]
    print(f"{args.devices} devices; median of {args.repeat}; target <= 300 ms")
    srv = start_web(store, "127.0.0.1:0", trust_requirements=reqs, snapshot_ttl_s=3600.0,
                    now=lambda: SEED_AT)
    try:
        # Cold: the first request builds the fleet snapshot (the store queries); every
        # later request within the TTL, and all requests after it (stale-while-
        # revalidate), are served from a snapshot.
        cold_s, _ = fetch(srv.url + "/api/summary")
        builds = [srv.app.api.snapshot().build_s]
        t0 = time.perf_counter()
        build_snapshot(store, SEED_AT, reqs)
        builds.append(time.perf_counter() - t0)
        print(f"snapshot build (cold first request): {cold_s * 1000:.0f} ms; "
              f"build alone, 2 runs: {', '.join(f'{b * 1000:.0f}' for b in builds)} ms")
        print(f"{'endpoint (warm)':42} {'median ms':>10} {'max ms':>8} {'bytes':>10}")
        for path in ENDPOINTS:
            url = srv.url + path.format(device=device)
            times, size = [], 0
            for _ in range(args.repeat):
                dt, size = fetch(url)
                times.append(dt)
            med = statistics.median(times)
            flag = "" if med <= 0.3 else "  OVER TARGET"
            print(f"{path:42} {med * 1000:10.1f} {max(times) * 1000:8.1f} {size:10d}{flag}")
    finally:
        srv.stop()
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
