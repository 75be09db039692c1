"""The SQLite backend (stdlib sqlite3): the default store of a single collector.

Owns the SQLite side of the store: the connections (WAL, synchronous=NORMAL,
busy_timeout, foreign keys; a second connection for reads), the transactions, the
migration runner and the `SQLITE` dialect (fixed-width ISO-8601 text instants with 'Z',
`max()`, julianday arithmetic). One write connection is shared by the ingest worker and
the web thread behind a lock; writes run in BEGIN IMMEDIATE transactions so that a
second process on the same file waits instead of failing halfway. Errors a retry can
cure (busy, disk full, I/O, read-only) are `StoreUnavailable`.
It must not hold queries (they are `collector.store.sql`'s), decide what changed or
read the clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from collector.store import StoreError, StoreUnavailable, utc
from collector.store.dialect import Dialect, Session, same
from collector.store.sql import SqlStore

_T = TypeVar("_T")


def ts(when: datetime) -> str:
    """'2026-01-02T03:04:05.000000Z': fixed width, so text order is time order."""
    # isoformat is C; years < 1000 are still zero-padded to four digits by it.
    return utc(when).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def dt(text: str) -> datetime:
    return datetime.fromisoformat(text)  # 3.11 reads the 'Z' as UTC


SQLITE = Dialect(
    name="sqlite", sql=same, encode=ts, decode=dt, greatest="max",
    silent="(julianday(:now) - julianday(last_received_at)) * 86400.0 > :f * interval_s",
    lock_devices="",  # BEGIN IMMEDIATE already holds the database's one write lock
    no_limit=-1,
    max_params=999,  # the oldest SQLite's limit; `SqliteStore` asks its library
    row_arrays={},  # no arrays: rows travel as VALUES lists
    migrations_table="CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER"
                     " PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
    integrity_sql="PRAGMA integrity_check",
)


def path_from_url(url: str) -> str:
    """sqlite:///abs/path.db → /abs/path.db; sqlite://rel.db → rel.db (relative to cwd).
    The three-slash form is always absolute, as in the collector's config docs."""
    if not url.startswith("sqlite://") or "?" in url:
        raise StoreError(f"not a SQLite URL (sqlite:///ABS/PATH.db): {url!r}")
    path = url[len("sqlite://"):]
    if not path or path.endswith("/"):
        raise StoreError(f"SQLite URL without a file name: {url!r}")
    return path


def _statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT first; migrations must run inside our transaction.
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""
    if any(ln.strip() and not ln.strip().startswith("--") for ln in buf.splitlines()):
        raise StoreError(f"incomplete SQL statement at the end of a migration: {buf[:80]!r}")


# Primary result codes that say "not now" rather than "not this": busy/locked beyond
# busy_timeout, out of memory, read-only (a remount), I/O error, disk full, cannot
# open, lock protocol. The same statement can succeed later (docs/store.md).
_TRANSIENT = frozenset({5, 6, 7, 8, 10, 13, 14, 15})


def translate(exc: sqlite3.Error, what: str = "sqlite") -> StoreError:
    """sqlite3's error as ours: `StoreUnavailable` when a retry can succeed."""
    code = getattr(exc, "sqlite_errorcode", None)
    kind = StoreUnavailable if code is not None and code & 0xFF in _TRANSIENT else StoreError
    return kind(f"{what}: {exc}")


@contextlib.contextmanager
def _transaction(c: sqlite3.Connection, lock: threading.Lock,
                 begin: str) -> Iterator[sqlite3.Cursor]:
    with lock:
        try:
            c.execute(begin)
            with contextlib.closing(c.cursor()) as cur:
                yield cur
            c.execute("COMMIT")
        except sqlite3.Error as exc:
            if c.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # the error stands, not this one
                    c.execute("ROLLBACK")
            raise translate(exc) from exc
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves (BEGIN IMMEDIATE).
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    return conn


class SqliteStore(SqlStore):
    """`Store` on one SQLite file. Construct with `from_url` or `open_store`."""

    def __init__(self, path: str, *, reject_sample_limit: int = 20,
                 busy_timeout_s: float = 30.0) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = _connect(path, busy_timeout_s)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # NORMAL in WAL mode: a power cut may lose the last commits, never corrupt.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            limit = self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        except sqlite3.Error as exc:
            raise translate(exc, f"cannot open SQLite database {path}") from exc
        if path != ":memory:" and mode != "wal":
            self._conn.close()
            raise StoreError(f"{path}: cannot switch to WAL (journal_mode is {mode})")
        super().__init__(dataclasses.replace(SQLITE, max_params=limit),
                         reject_sample_limit=reject_sample_limit)
        # Reads get their own connection: in WAL mode readers do not block the writer,
        # so a dashboard snapshot of a 100,000-device fleet (seconds of SQL) does not
        # stall ingest. An in-memory database is one connection's, so it shares.
        self._read_lock = self._lock
        self._reader = self._conn
        if path != ":memory:":
            try:
                self._reader = _connect(path, busy_timeout_s)
            except sqlite3.Error as exc:
                self._conn.close()
                raise translate(exc, f"cannot open SQLite database {path}") from exc
            self._read_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, reject_sample_limit: int = 20) -> SqliteStore:
        return cls(path_from_url(url), reject_sample_limit=reject_sample_limit)

    def close(self) -> None:
        with self._lock:
            if self._reader is not self._conn:
                self._reader.close()
            self._conn.close()

    def _write(self, fn: Callable[[Session], _T]) -> _T:
        # IMMEDIATE takes the write lock up front: a deferred transaction that
        # upgrades later can fail with SQLITE_BUSY at once.
        with _transaction(self._conn, self._lock, "BEGIN IMMEDIATE") as cur:
            return fn(Session(cur, self._d))

    def _read(self, fn: Callable[[Session], _T]) -> _T:
        # One snapshot for multi-statement reads, on the read connection.
        with _transaction(self._reader, self._read_lock, "BEGIN") as cur:
            return fn(Session(cur, self._d))

    def _run_script(self, s: Session, script: str) -> None:
        for stmt in _statements(script):
            s.script(stmt)
