"""The store contract: every test runs against SQLite and PostgreSQL alike.

PostgreSQL at 127.0.0.1:5432 (trust auth, user postgres, database `test`) or
$CERTMON_TEST_PG_URL; every test gets a fresh schema `certmon_test_<random>_<n>`,
dropped afterwards, so parallel runs do not clash. Missing PostgreSQL skips those
tests, or fails them when CI is set.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from collector.store import (
    CertLink,
    CertRole,
    CertRow,
    FindingRecord,
    InventoryRecord,
    OutageRecord,
    ScanRecord,
    StatusRecord,
    Store,
    StoreError,
    StoreUnavailable,
    open_store,
)
from collector.store.sqlite import path_from_url

PG_URL = os.environ.get("CERTMON_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
_SESSION = secrets.token_hex(4)
_counter = itertools.count()


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def cert(name: str, *, days: float = 365, is_ca: bool = False, der: bytes | None = None) -> CertRow:
    return CertRow(sha256=sha(name), subject=f"CN={name}", not_before=T0 - timedelta(days=1),
                   not_after=T0 + timedelta(days=days), issuer="CN=Fleet CA",
                   serial_hex="01", key_type="EC", key_bits=256,
                   signature_algorithm="ecdsa-with-SHA256", is_ca=is_ca,
                   is_self_issued=is_ca, der=der)


CA = cert("fleet-ca", days=3000, is_ca=True)


def status(dev: str, seq: int, at_s: float = 0, *, boot: str = "b1", severity: int = 0,
           codes: tuple[str, ...] = (), client: CertRow | None = None,
           trust: str = "d" * 64, interval_s: int = 60, **kw: Any) -> StatusRecord:
    at = T0 + timedelta(seconds=at_s)
    client = client or cert(f"{dev}-leaf")
    return StatusRecord(
        device_id=dev, boot_id=boot, seq=seq, device_ts=at - timedelta(seconds=1),
        received_at=at, interval_s=interval_s, status_json=f'{{"seq":{seq}}}',
        severity=severity, worst_code=codes[0] if codes else None,
        findings=tuple(FindingRecord(c, severity, None, c.lower()) for c in codes),
        client_sha256=client.sha256, trust_digest=trust,
        certs=(CertLink(client, CertRole.CLIENT), CertLink(CA, CertRole.CHAIN)), **kw)


# --------------------------------------------------------------------------- fixtures


def _pg_unavailable() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install certmon[collector])"
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {PG_URL}: {exc}"
    return None


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Any]:
    if (reason := _pg_unavailable()) is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
        pytest.skip(reason)
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        yield conn


@dataclass
class Db:
    """One empty database; `open()` is one more collector's connection to it."""

    url: str
    opened: list[Store] = field(default_factory=list)

    def open(self, **kw: Any) -> Store:
        store = open_store(self.url, **kw)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    schema = None
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path}/certmon.db"
    else:
        admin = request.getfixturevalue("pg_admin")
        schema = f"certmon_test_{_SESSION}_{next(_counter)}"
        admin.execute(f"CREATE SCHEMA {schema}")
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    database = Db(url)
    try:
        yield database
    finally:
        for store in database.opened:
            store.close()
        if schema is not None:
            request.getfixturevalue("pg_admin").execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def store(db: Db) -> Store:
    s = db.open()
    s.migrate()
    return s


def race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) in n threads released together; results in thread order."""
    barrier, out = threading.Barrier(n), [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            out[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


# --------------------------------------------------------------------------- schema


def test_migrate_twice_and_concurrently(db: Db) -> None:
    a, b = db.open(), db.open()
    race(2, lambda i: (a, b)[i].migrate())  # two collectors starting at once
    a.migrate()
    assert a.record_statuses([status("dev1", 1)]) == [True]
    assert b.device("dev1") is not None


def test_open_store_urls(tmp_path: Path) -> None:
    assert path_from_url("sqlite:///var/lib/x.db") == "/var/lib/x.db"
    assert path_from_url("sqlite://rel/x.db") == "rel/x.db"
    with pytest.raises(StoreError, match="unsupported store URL scheme 'mysql'"):
        open_store("mysql://localhost/db")


# --------------------------------------------------------------------------- statuses


def test_record_batch_and_read_back(store: Store) -> None:
    leaf = cert("dev1-leaf", der=b"\x30\x82DER")
    batch = [status("dev1", 1, client=leaf, codes=("CERT_EXPIRING",), severity=1,
                    clock_offset_lo_s=-0.5),
             status("dev2", 1), status("dev3", 1, severity=2)]
    assert store.record_statuses(batch) == [True, True, True]
    dev = store.device("dev1")
    assert dev is not None
    assert (dev.boot_id, dev.seq, dev.severity, dev.worst_code) == ("b1", 1, 1, "CERT_EXPIRING")
    assert dev.findings == (FindingRecord("CERT_EXPIRING", 1, None, "cert_expiring"),)
    assert dev.status_json == '{"seq":1}' and dev.is_online and dev.interval_s == 60
    assert dev.last_received_at == T0 and dev.last_status_ts == T0 - timedelta(seconds=1)
    assert (dev.clock_offset_lo_s, dev.clock_offset_hi_s, dev.clock_offset_at) == (-0.5, None, T0)
    assert dev.client_sha256 == leaf.sha256 and dev.trust_digest == "d" * 64
    assert {(link.role, link.cert.sha256) for link in store.device_certs("dev1")} == {
        (CertRole.CLIENT, leaf.sha256), (CertRole.CHAIN, CA.sha256)}
    assert store.certificate(leaf.sha256) == leaf  # facts and DER round-trip
    assert store.seen_count("dev1") == 1
    assert [d.device_id for d in store.devices()] == ["dev3", "dev1", "dev2"]  # by severity
    assert [d.device_id for d in store.devices(limit=1, offset=1, order_by="device_id")] == [
        "dev2"]
    counts = store.fleet_counts()
    assert counts["total"] == 3 and counts["online"] == 3
    assert (counts["ok"], counts["warning"], counts["critical"]) == (1, 1, 1)
    assert store.integrity_check()


def test_replay_returns_false_and_changes_nothing(store: Store) -> None:
    assert store.record_statuses([status("dev1", 5)]) == [True]
    before = store.device("dev1")
    # Same (boot, seq), different content and a later receipt: still a replay.
    assert store.record_statuses([status("dev1", 5, 30, severity=2)]) == [False]
    assert store.device("dev1") == before
    assert store.seen_count("dev1") == 1
    # Duplicates inside one batch: the first copy counts.
    assert store.record_statuses([status("dev1", 6, 40), status("dev1", 6, 41)]) == [True, False]
    assert store.seen_seqs("dev1") == [("b1", 5), ("b1", 6)]


def test_reordered_older_status_does_not_overwrite(store: Store) -> None:
    assert store.record_statuses([status("dev1", 7, 10, severity=1)]) == [True]
    assert store.record_statuses([status("dev1", 6, 11, severity=2)]) == [True]  # late
    dev = store.device("dev1")
    assert dev is not None and (dev.seq, dev.severity) == (7, 1)
    assert dev.last_received_at == T0 + timedelta(seconds=11)  # but it was received
    assert store.seen_count("dev1") == 2
    # Newer first inside one batch.
    assert store.record_statuses([status("dev1", 9, 20), status("dev1", 8, 20)]) == [True, True]
    dev = store.device("dev1")
    assert dev is not None and dev.seq == 9
    # A reboot: boots are ordered by when they were first seen, not by their ids.
    assert store.record_statuses([status("dev1", 0, 30, boot="a-new")]) == [True]
    assert store.record_statuses([status("dev1", 10, 31, boot="b1")]) == [True]  # stale boot
    dev = store.device("dev1")
    assert dev is not None and (dev.boot_id, dev.seq) == ("a-new", 0)


def test_history_only_on_change(store: Store) -> None:
    store.record_statuses([status("dev1", 1)])
    store.record_statuses([status("dev1", 2, 60), status("dev1", 3, 120)])  # nothing changed
    assert [h.kind for h in store.history("dev1")] == ["first_status"]
    store.record_statuses([status("dev1", 4, 180, severity=1, codes=("CERT_EXPIRING",))])
    store.record_statuses([status("dev1", 5, 240, severity=1, codes=("CERT_EXPIRING",),
                                  client=cert("dev1-renewed"), trust="e" * 64)])
    kinds = [h.kind for h in reversed(store.history("dev1"))]
    assert kinds == ["first_status", "status_change", "cert_change", "trust_change"]
    change = store.history("dev1")[-2]
    assert change.detail == {"severity": [0, 1], "codes": [[], ["CERT_EXPIRING"]]}
    # The renewal replaced the client link; the old leaf is no longer held.
    assert store.holders(sha("dev1-leaf")) == []
    assert store.holders(sha("dev1-renewed")) == [("dev1", CertRole.CLIENT)]


def test_certificates_expiring_before_with_role_filter(store: Store) -> None:
    leaf = cert("dev1-leaf", days=10)
    store.record_statuses([status("dev1", 1, client=leaf), status("dev2", 1)])
    old_ca, new_ca = cert("old-root", days=20, is_ca=True), cert("new-root", days=4000)
    for dev in ("dev2", "dev3"):
        store.put_inventory(InventoryRecord(dev, "f" * 64, "[]", T0, cas=(old_ca, new_ca)))
    soon = T0 + timedelta(days=30)
    got = {(h.cert.sha256, h.device_id, h.role) for h in store.certificates_expiring_before(soon)}
    assert got == {(leaf.sha256, "dev1", CertRole.CLIENT), (old_ca.sha256, "dev2", CertRole.TRUST),
                   (old_ca.sha256, "dev3", CertRole.TRUST)}
    trust = store.certificates_expiring_before(soon, role=CertRole.TRUST)
    assert [(h.device_id, h.cert.subject) for h in trust] == [("dev2", "CN=old-root"),
                                                              ("dev3", "CN=old-root")]
    assert store.holders(CA.sha256) == [("dev1", CertRole.CHAIN), ("dev2", CertRole.CHAIN)]
    assert store.devices_holding_count(new_ca.sha256) == 2
    assert store.devices_holding_count(new_ca.sha256, CertRole.CLIENT) == 0
    # dev3 rotated its bundle: the old root is gone, an older inventory cannot undo it.
    store.put_inventory(InventoryRecord("dev3", "a" * 64, "[]", T0 + timedelta(hours=1),
                                        cas=(new_ca,)))
    store.put_inventory(InventoryRecord("dev3", "f" * 64, "[]", T0, cas=(old_ca, new_ca)))
    assert store.holders(old_ca.sha256) == [("dev2", CertRole.TRUST)]
    inv = store.inventory("dev3")
    assert inv is not None and inv.digest == "a" * 64
    assert store.devices_with_inventory() == {"dev2", "dev3"}


def test_set_online_and_mark_silent(store: Store) -> None:
    store.record_statuses([status("dev1", 1, interval_s=60), status("dev2", 1, interval_s=600)])
    at = T0 + timedelta(seconds=10)
    assert store.set_online("dev1", False, at) is True  # LWT
    assert store.set_online("dev1", False, at) is False
    assert store.set_online("dev1", True, at - timedelta(seconds=5)) is False  # stale birth
    assert store.set_online("dev1", True, at + timedelta(seconds=1)) is True
    assert store.mark_silent(T0 + timedelta(seconds=179)) == []
    assert store.mark_silent(T0 + timedelta(seconds=181)) == ["dev1"]  # 3 × 60 s
    assert store.mark_silent(T0 + timedelta(seconds=181)) == []
    assert store.mark_silent(T0 + timedelta(seconds=1801), factor=3.0) == ["dev2"]
    counts = store.fleet_counts()
    assert (counts["online"], counts["offline"]) == (0, 2)
    store.record_statuses([status("dev1", 2, 2000)])  # back
    dev = store.device("dev1")
    assert dev is not None and dev.is_online
    assert dev.online_changed_at == T0 + timedelta(seconds=2000)
    causes = [h.detail["cause"] for h in store.history("dev1") if h.kind == "online_change"]
    assert causes == ["status", "silence", "message", "message"]
    assert store.set_online("new-dev", False, at) is False  # unknown devices start offline


def test_mark_silent_judges_at_the_horizon_it_is_given(store: Store) -> None:
    """The collector passes its ingest watermark: silence is dated there, not at now."""
    store.record_statuses([status("dev1", 1, interval_s=60)])
    horizon = T0 + timedelta(seconds=200)
    assert store.mark_silent(horizon) == ["dev1"]
    dev = store.device("dev1")
    assert dev is not None and not dev.is_online and dev.online_changed_at == horizon
    # A status that arrived before the horizon but is stored later still brings it back:
    # its received time is its arrival, which is after the silence began.
    store.record_statuses([status("dev1", 2, 190)])
    dev = store.device("dev1")
    assert dev is not None and not dev.is_online  # 190 s < the horizon: not newer
    store.record_statuses([status("dev1", 3, 201)])
    dev = store.device("dev1")
    assert dev is not None and dev.is_online


def test_store_outages_recorded_newest_first_and_bounded(store: Store) -> None:
    for i in range(103):
        store.record_outage(OutageRecord(f"collector-{i % 2}", T0 + timedelta(minutes=i),
                                         T0 + timedelta(minutes=i, seconds=20 + i), i, "x\x00"))
    newest = store.store_outages(limit=2)
    assert [(o.collector, o.messages_held, o.duration_s) for o in newest] == [
        ("collector-0", 102, 122.0), ("collector-1", 101, 121.0)]
    assert newest[0].started_at == T0 + timedelta(minutes=102)
    assert newest[0].error == "x\ufffd"  # NUL: PostgreSQL refuses it in text
    assert len(store.store_outages(limit=1000)) == 100  # the newest 100 are kept


def test_alert_lifecycle(store: Store) -> None:
    def fire(minutes: float, severity: int = 1, renotify: float | None = 3600) -> bool:
        return store.alert_fire("expiry|dev1|x", rule="expiry", device_id="dev1",
                                cert_sha256="x", severity=severity, summary="expires soon",
                                labels={"rule": "expiry"}, now=T0 + timedelta(minutes=minutes),
                                renotify_interval_s=renotify)

    assert fire(0) is True  # new
    assert fire(1) is False  # dedup
    assert fire(59) is False
    assert fire(60) is True  # renotify interval elapsed
    assert fire(61, severity=2) is True  # severity change
    assert fire(62, severity=2, renotify=None) is False
    assert fire(200, severity=2, renotify=None) is False  # None: never renotify
    (alert,) = store.active_alerts()
    assert (alert.state, alert.severity, alert.notify_count) == ("firing", 2, 3)
    assert alert.started_at == T0 and alert.last_notified_at == T0 + timedelta(minutes=61)
    assert alert.labels == {"rule": "expiry"}
    assert store.alert_resolve("expiry|dev1|x", T0 + timedelta(minutes=300)) is True
    assert store.alert_resolve("expiry|dev1|x", T0 + timedelta(minutes=301)) is False
    assert store.alert_resolve("never-fired", T0) is False
    assert store.active_alerts() == []
    (done,) = store.alert_history("dev1")
    assert done.state == "resolved" and done.resolved_at == T0 + timedelta(minutes=300)
    assert fire(400) is True  # a new episode
    (again,) = store.active_alerts()
    assert again.started_at == T0 + timedelta(minutes=400) and again.notify_count == 1
    assert again.resolved_at is None
    assert store.alert_history("other") == []


def test_two_collectors_race_alert_fire_exactly_one_notifies(db: Db) -> None:
    a, b = db.open(), db.open()
    a.migrate()
    stores = (a, b, db.open(), db.open())
    for round_ in range(15):
        now = T0 + timedelta(hours=round_)  # every round is due again (renotify 1 h)
        got = race(len(stores), lambda i, now=now: stores[i].alert_fire(
            "race|dev1", rule="race", device_id="dev1", cert_sha256=None, severity=1,
            summary="s", labels={}, now=now, renotify_interval_s=3600))
        assert got.count(True) == 1, (round_, got)
        if round_ % 2:  # odd rounds also race the resolve; the next round re-fires
            resolved = race(len(stores),
                            lambda i, now=now: stores[i].alert_resolve("race|dev1", now))
            assert resolved.count(True) == 1, (round_, resolved)


def test_two_collectors_same_statuses_store_each_once(db: Db) -> None:
    a, b = db.open(), db.open()
    a.migrate()
    batches = [[status(f"dev{d}", s, s * 60) for d in range(20)] for s in range(1, 6)]

    def ingest(i: int) -> list[bool]:
        store = (a, b)[i]
        return [flag for batch in batches for flag in store.record_statuses(
            batch if i == 0 else list(reversed(batch)))]

    flags = race(2, ingest)
    assert sum(flags[0]) + sum(flags[1]) == 100  # every status stored exactly once
    dev = a.device("dev7")
    assert dev is not None and dev.seq == 5 and a.seen_count("dev7") == 5
    assert [h.kind for h in a.history("dev7")] == ["first_status"]


def test_rejections_counted_and_samples_bounded(db: Db) -> None:
    store = db.open(reject_sample_limit=3)
    store.migrate()
    for i in range(10):
        store.count_rejection("bad_signature", at=T0 + timedelta(seconds=i),
                              topic="certmon/v2/devices/dev1/status", detail=f"try {i}\x00",
                              sample=bytes([i]) * 600)
    store.count_rejection("not_json", at=T0, topic="t", detail="d", sample=b"{")
    assert store.rejection_counts() == {"bad_signature": 10, "not_json": 1}
    samples = store.rejection_samples("bad_signature")
    assert [s.detail for s in samples] == ["try 9\ufffd", "try 8\ufffd", "try 7\ufffd"]
    assert samples[0].sample == b"\x09" * 512 and samples[0].at == T0 + timedelta(seconds=9)
    assert len(store.rejection_samples()) == 4
    assert len(store.rejection_samples(limit=2)) == 2


def test_try_claim(db: Db) -> None:
    a, b = db.open(), db.open()
    a.migrate()
    assert a.try_claim("fleet-summary", T0, 60) is True
    assert b.try_claim("fleet-summary", T0 + timedelta(seconds=59), 60) is False
    assert a.try_claim("other-job", T0, 60) is True
    later = T0 + timedelta(seconds=60)
    assert race(2, lambda i: (a, b)[i].try_claim("fleet-summary", later, 60)).count(True) == 1


def test_prune_seen_scans_and_integrity(store: Store) -> None:
    store.record_statuses([status("dev1", s, s * 60) for s in range(1, 6)])
    # The current boot's window is kept however old: only boots a device left forget.
    assert store.prune_seen(T0 + timedelta(days=1)) == 0
    assert store.seen_seqs("dev1") == [("b1", s) for s in range(1, 6)]
    store.record_statuses([status("dev1", 1, 400, boot="b2")])  # a reboot
    assert store.prune_seen(T0 + timedelta(seconds=300)) == 1
    # b1's window is forgotten: everything up to its highest counts as seen.
    assert store.seen_seqs("dev1") == [("b1", s) for s in range(6)] + [("b2", 1)]
    assert store.record_statuses([status("dev1", 0, 401)]) == [False]  # never sent, now a replay
    assert store.record_statuses([status("dev1", 6, 402)]) == [True]  # above: received, stale
    dev = store.device("dev1")
    assert dev is not None and (dev.boot_id, dev.seq) == ("b2", 1)
    scan = ScanRecord("broker.example:8883", T0, 1, '{"chain":[]}')
    store.put_scan(scan)
    store.put_scan(ScanRecord("broker.example:8883", T0 + timedelta(hours=1), 0, "{}"))
    assert store.scans() == [ScanRecord("broker.example:8883", T0 + timedelta(hours=1), 0, "{}")]
    assert store.integrity_check()


def test_an_unreachable_database_is_unavailable_not_refused(tmp_path: Path) -> None:
    """The ingest retries `StoreUnavailable` and only that: a server that refuses the
    connection and a SQLite file on a disk that cannot be opened are "not now"."""
    import socket

    with socket.socket() as sock:  # a free port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        open_store(f"postgresql://postgres@127.0.0.1:{port}/test")
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StoreUnavailable):  # SQLITE_CANTOPEN
        open_store(f"sqlite://{tmp_path}/dir.db").migrate()


def test_postgres_errors_are_judged_by_sqlstate_not_by_class() -> None:
    """psycopg files a program limit or a corrupt index under OperationalError /
    InternalError too; retried as an outage, one such batch would stall ingest for
    ever. By SQLSTATE: only what a retry can cure is `StoreUnavailable`."""
    import psycopg
    from psycopg import errors

    from collector.store.postgres import translate

    for cure in (errors.AdminShutdown, errors.ConnectionFailure, errors.DiskFull,
                 errors.TooManyConnections, errors.ReadOnlySqlTransaction,
                 errors.LockNotAvailable):
        assert isinstance(translate(cure("x")), StoreUnavailable), cure
    assert isinstance(translate(psycopg.OperationalError("server closed the connection")),
                      StoreUnavailable)
    assert isinstance(translate(psycopg.InterfaceError("connection is closed")),
                      StoreUnavailable)
    for poison in (errors.ProgramLimitExceeded, errors.IndexCorrupted, errors.DataCorrupted,
                   errors.UniqueViolation, errors.StatementTooComplex):
        exc = translate(poison("x"))
        assert isinstance(exc, StoreError) and not isinstance(exc, StoreUnavailable), poison


def test_naive_datetimes_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        store.mark_silent(datetime(2026, 1, 1))
