"""`/metrics` size and cardinality on a large fleet: before (a git revision's exporter)
and after (this tree's, each `web.metrics_per_device` mode), over one snapshot.

Seeds SQLite with `tests/kit/seed.seed_fleet` (the same fleet and database as
`api_bench.py`: 100,000 devices by default, 38 % of them not ok), builds one fleet
snapshot, and renders it with the exporter of `--baseline` (default HEAD: the file
`collector/web/metrics.py` as committed, loaded beside this tree's) and with this
tree's in "at_risk" (the default) and "all" modes. Prints bytes, series and render time
of each, side by side, and the series per family. Target: <= 5 MB by default.
Run: `.venv/bin/python bench/metrics_size.py [--devices 100000] [--baseline HEAD]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test kit (bench/README.md)

from kit.seed import seed_fleet  # noqa: E402

from collector.store import Store, open_store  # noqa: E402
from collector.web import metrics  # noqa: E402
from collector.web.fleet import build_snapshot  # noqa: E402

SEED_AT = datetime(2026, 11, 1, tzinfo=UTC)  # as api_bench.py: a kept database stays valid
TARGET_BYTES = 5_000_000


def seeded(db: Path, n: int) -> Store:
    store = open_store(f"sqlite:///{db}")
    store.migrate()
    if store.fleet_counts()["total"] != n:
        store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        store = open_store(f"sqlite:///{db}")
        t0 = time.perf_counter()
        seed_fleet(store, SEED_AT, n=n, seed=1, batch=1000)
        print(f"seeded {n} devices in {time.perf_counter() - t0:.1f} s")
    return store


def exporter_at(revision: str) -> ModuleType:
    """collector/web/metrics.py as of `revision`, as a sibling module of this tree's
    (its relative imports resolve to this tree's collector.web)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show",
                             f"{revision}:collector/web/metrics.py"],
                            check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("collector.web._metrics_baseline", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "collector.web"
    exec(compile(source, f"{revision}:collector/web/metrics.py", "exec"), module.__dict__)
    return module


def series_by_family(body: bytes) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in body.splitlines():
        if line and not line.startswith(b"#"):
            name = line.split(b"{", 1)[0].split(b" ", 1)[0].decode()
            for suffix in ("_bucket", "_sum", "_count", "_total", "_info"):
                name = name.removesuffix(suffix)
            counts[name] += 1
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--db", type=Path, default=Path("/tmp/certmon-bench-api.db"))
    ap.add_argument("--baseline", default="HEAD", help="git revision of the 'before' exporter")
    args = ap.parse_args()
    store = seeded(args.db, args.devices)
    t0 = time.perf_counter()
    snap = build_snapshot(store, SEED_AT, [])
    print(f"{args.devices} devices; snapshot built in {time.perf_counter() - t0:.1f} s; "
          f"target <= {TARGET_BYTES / 1e6:g} MB by default")
    before = exporter_at(args.baseline).FleetCollector(store)
    runs: list[tuple[str, object]] = [(f"{args.baseline} (before)", before)]
    runs += [(f"{mode}{' (default)' if mode == 'at_risk' else ''}",
              metrics.FleetCollector(store, per_device=mode)) for mode in metrics.PER_DEVICE_MODES]
    print(f"{'exporter':22} {'bytes':>12} {'series':>9} {'devices':>8} {'render s':>9}")
    families: dict[str, Counter[str]] = {}
    for name, exporter in runs:
        t0 = time.perf_counter()
        body = exporter.exposition(snap)  # type: ignore[attr-defined]
        dt = time.perf_counter() - t0
        fams = families[name] = series_by_family(body)
        exported = next((float(line.split()[-1]) for line in body.splitlines()
                         if line.startswith(b"certmon_exported_devices{")), float(args.devices))
        flag = "" if len(body) <= TARGET_BYTES or "all" in name or "before" in name else "  OVER"
        print(f"{name:22} {len(body):12,d} {sum(fams.values()):9,d} {exported:8,.0f} "
              f"{dt:9.2f}{flag}")
    print("series per family:")
    names = sorted(set().union(*families.values()))
    print(f"  {'family':46} " + " ".join(f"{n.split()[0][:10]:>10}" for n in families))
    for fam in names:
        print(f"  {fam:46} " + " ".join(f"{families[n][fam]:10,d}" for n in families))
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
