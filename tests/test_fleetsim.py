"""The fleet simulator (bench/fleetsim.py), as a demo or load-test user runs it: a
simulated fleet with chosen problems, published through a real broker, lands in a
collector that trusts the simulator's CA — with the problems it was given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Fleet, collector_config
from kit.broker import wait_until

from collector.wiring import build_collector

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_simulated_fleet_arrives_with_its_problems(fleet_broker: Fleet, tmp_path: Path) -> None:
    ca = tmp_path / "sim-ca.pem"
    done = subprocess.run(
        [sys.executable, str(BENCH / "fleetsim.py"), "--broker",
         f"mqtt://127.0.0.1:{fleet_broker.plain_port}", "--devices", "20", "--expiring", "0.2",
         "--clock-behind", "0.1", "--interval-s", "1", "--duration-s", "1.5",
         "--prefix", "simtest", "--ca-out", str(ca)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "20 devices (4 expiring, 2 clock behind)" in done.stdout
    # A collector that trusts the simulator's CA picks the fleet up from the retained
    # cert and status topics.
    service = build_collector(collector_config(fleet_broker, tmp_path, **{"tls.fleet_ca": str(ca)}),
                              web=False)
    service.start()
    try:
        store = service.store

        def simulated() -> list:  # type: ignore[type-arg]
            return [d for d in store.devices() if d.device_id.startswith("simtest")]

        assert wait_until(lambda: len(simulated()) == 20, 20), service.ingestor.rejected
        worst = {d.device_id: d.worst_code for d in simulated()}
        assert sum(code == "CERT_EXPIRING" for code in worst.values()) == 4
        assert sum(code == "CLOCK_BEHIND" for code in worst.values()) >= 1
        assert sum(code is None for code in worst.values()) >= 14
    finally:
        service.close()
