"""The PostgreSQL backend (psycopg 3): the store several collectors share.

Owns the PostgreSQL side of the store: the connection (session time zone UTC,
reconnect when broken), the transactions with their retries, the migration runner with
its advisory lock, and the `POSTGRES` dialect (TIMESTAMPTZ instants, `GREATEST`,
interval arithmetic, `FOR NO KEY UPDATE` row locks). N collectors are safe on one
database because every "exactly once" transition in the shared SQL is one conditional
statement (insert-if-absent, conditional upsert with RETURNING), device rows are locked
`FOR NO KEY UPDATE` in device_id order (NO KEY, so foreign-key checks from other
batches do not conflict) and every multi-row write is sorted by key, so concurrent
batches take row locks in the same order. Deadlocks and serialization failures are
retried here; a lost or refused connection is `StoreUnavailable` (the ingest retries
with back-off) and the next call reconnects. It must not hold queries (they are
`collector.store.sql`'s), decide what changed or read the clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from collector.store import StoreError, StoreUnavailable, utc
from collector.store.dialect import Dialect, Session, pyformat
from collector.store.sql import SqlStore

_T = TypeVar("_T")
_Conn = psycopg.Connection[tuple[Any, ...]]
_ATTEMPTS = 3
# A server that does not answer (host down, partition) must not hold the ingest for
# libpq's default of "forever"; a URL's own connect_timeout wins.
CONNECT_TIMEOUT_S = 10
# By SQLSTATE, not by exception class (psycopg files program limits and corruption
# under OperationalError/InternalError too): what a retry can cure is a connection
# lost or refused (08), the server out of resources (53: disk full, memory, too many
# connections), shutting down or cancelled (57), an I/O error (58), a read-only
# standby after a failover (25006) or a lock not available (55P03). Anything else
# (data, constraint, program limit, corruption) fails the same way every time.
_TRANSIENT_CLASSES = ("08", "53", "57", "58")
_TRANSIENT_STATES = frozenset({"25006", "55P03"})
# After a failed connect, calls fail at once for this long instead of each trying
# again under the store's lock (which the ingest, the tick and web threads share).
RECONNECT_EVERY_S = 2.0


def is_transient(exc: psycopg.Error) -> bool:
    if isinstance(exc, psycopg.InterfaceError):
        return True  # the connection object itself is gone
    state = exc.sqlstate
    if state is None:  # no server answer at all: libpq lost the connection
        return isinstance(exc, psycopg.OperationalError)
    return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES


def translate(exc: psycopg.Error) -> StoreError:
    """psycopg's error as ours: `StoreUnavailable` when a retry can succeed."""
    kind = StoreUnavailable if is_transient(exc) else StoreError
    return kind(f"postgresql: {exc}")


def _decode(value: datetime) -> datetime:
    return value.astimezone(UTC)


POSTGRES = Dialect(
    name="postgres", sql=pyformat, encode=utc, decode=_decode, greatest="GREATEST",
    silent="last_received_at + make_interval(secs => :f * interval_s) < :now",
    lock_devices="FOR NO KEY UPDATE OF d",
    no_limit=None,  # LIMIT NULL: all rows
    max_params=65535,  # the protocol's 16-bit parameter count
    # A batch as one array per column: a handful of parameters however many rows.
    row_arrays={"text": "text", "int": "bigint", "instant": "timestamptz"},
    migrations_table="CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER"
                     " PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    # PostgreSQL checks its own pages; what we can verify is that it answers.
    integrity_sql="SELECT 'ok'",
)


class PostgresStore(SqlStore):
    """`Store` on one PostgreSQL schema (the first of the URL's search_path)."""

    def __init__(self, url: str, *, reject_sample_limit: int = 20) -> None:
        super().__init__(POSTGRES, reject_sample_limit=reject_sample_limit)
        self._url = url
        self._lock = threading.Lock()
        self._retry_connect_at = 0.0  # monotonic
        self._conn = self._connect()

    @classmethod
    def from_url(cls, url: str, *, reject_sample_limit: int = 20) -> PostgresStore:
        return cls(url, reject_sample_limit=reject_sample_limit)

    def _connect(self) -> _Conn:
        try:
            url = self._url
            if "connect_timeout" not in conninfo_to_dict(url):
                url = make_conninfo(url, connect_timeout=CONNECT_TIMEOUT_S)
            conn = psycopg.connect(url, autocommit=True)
            # Instants come back tz-aware in UTC whatever the server's default zone.
            conn.execute("SET TIME ZONE 'UTC'")
        except psycopg.ProgrammingError as exc:  # a malformed URL: no retry helps
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self, fn: Callable[[Session], _T]) -> _T:
        """`fn` in one transaction; retried on deadlock or serialization failure, which
        concurrent collectors can provoke and which leave nothing behind."""
        with self._lock:
            for attempt in range(1, _ATTEMPTS + 1):
                if self._conn.broken or self._conn.closed:
                    # Server restart, network blip: a fresh connection (once per call,
                    # at most every RECONNECT_EVERY_S; the caller retries with back-off
                    # while the server is away).
                    if time.monotonic() < self._retry_connect_at:
                        raise StoreUnavailable("postgresql: reconnecting (last attempt "
                                               "failed moments ago)")
                    self._conn.close()
                    try:
                        self._conn = self._connect()
                    except StoreUnavailable:
                        self._retry_connect_at = time.monotonic() + RECONNECT_EVERY_S
                        raise
                try:
                    with self._conn.transaction(), self._conn.cursor() as cur:
                        return fn(Session(cur, self._d))
                except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                    if attempt == _ATTEMPTS:
                        raise translate(exc) from exc
                except psycopg.Error as exc:
                    raise translate(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, fn: Callable[[Session], _T]) -> _T:
        return self._write(fn)  # one connection: a read is a (short) transaction too

    def _lock_migrations(self, s: Session) -> None:
        (schema,) = s.rows("SELECT current_schema()")[0]
        if schema is None:
            raise StoreError("the search_path names no existing schema to migrate")
        # Two collectors starting at once: the second waits here, then finds the
        # versions applied. Keyed by schema so parallel test schemas do not queue.
        s.rows("SELECT pg_advisory_xact_lock(hashtext('certmon.migrate.' || ?))", (schema,))

    def _run_script(self, s: Session, script: str) -> None:
        s.script(script)  # no parameters: several statements in one call
