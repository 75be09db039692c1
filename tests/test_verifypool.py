"""Signature verification in worker processes: the same verdicts as in-process, and a
collector that loses its worker keeps ingesting."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from kit.fleet import cert_message, make_ca, make_devices, signed_status

from certmon import wire as p
from certmon.mqtt import Incoming
from collector.ingest import Ingestor
from collector.store import open_store
from collector.verify import CertCache
from collector.verifypool import VerifierPool


def test_pool_verdicts_and_survival_of_a_lost_worker(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    root = make_ca("pool root", now)
    devices = make_devices(make_ca("pool devices", now, issuer=root), 6, now, prefix="pool")
    store = open_store(f"sqlite:///{tmp_path / 'pool.db'}")
    store.migrate()
    pool = VerifierPool(1)
    ingest = Ingestor(store, CertCache([root.cert]), now=lambda: datetime.now(UTC), pool=pool)
    try:
        ingest.process([Incoming(p.cert_topic(p.DEFAULT_PREFIX, d.device_id), cert_message(d),
                                 False, 1) for d in devices])
        good = [Incoming(p.status_topic(p.DEFAULT_PREFIX, d.device_id), signed_status(d, 1, now),
                         False, 1) for d in devices]
        # One of them forged: device 0's status on device 1's topic.
        forged = Incoming(p.status_topic(p.DEFAULT_PREFIX, devices[1].device_id),
                          signed_status(devices[0], 2, now), False, 1)
        ingest.process([*good, forged])
        assert ingest.accepted == 6 and dict(ingest.rejected) == {"topic_mismatch": 1}
        pool._procs[0].kill()  # the worker dies (OOM killer, an operator's kill -9)
        pool._procs[0].join()
        ingest.process([Incoming(p.status_topic(p.DEFAULT_PREFIX, d.device_id),
                                 signed_status(d, 3, now), False, 1) for d in devices])
        assert ingest.accepted == 12 and ingest.pool is None  # verified in-process now
    finally:
        pool.close()
        store.close()
