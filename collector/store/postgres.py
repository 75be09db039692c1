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
retried here. It must not hold queries (they are `collector.store.sql`'s), decide what
changed or read the clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import errors

from collector.store import StoreError, utc
from collector.store.dialect import Dialect, Session, pyformat
from collector.store.sql import SqlStore

_T = TypeVar("_T")
_Conn = psycopg.Connection[tuple[Any, ...]]
_ATTEMPTS = 3


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
        self._conn = self._connect()

    @classmethod
    def from_url(cls, url: str, *, reject_sample_limit: int = 20) -> PostgresStore:
        return cls(url, reject_sample_limit=reject_sample_limit)

    def _connect(self) -> _Conn:
        try:
            conn = psycopg.connect(self._url, autocommit=True)
            # Instants come back tz-aware in UTC whatever the server's default zone.
            conn.execute("SET TIME ZONE 'UTC'")
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self, fn: Callable[[Session], _T]) -> _T:
        """`fn` in one transaction; retried on deadlock or serialization failure, which
        concurrent collectors can provoke and which leave nothing behind."""
        with self._lock:
            for attempt in range(1, _ATTEMPTS + 1):
                if self._conn.broken:  # server restart, network blip: one fresh connection
                    self._conn.close()
                    self._conn = self._connect()
                try:
                    with self._conn.transaction(), self._conn.cursor() as cur:
                        return fn(Session(cur, self._d))
                except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                    if attempt == _ATTEMPTS:
                        raise StoreError(f"postgresql: {exc}") from exc
                except psycopg.Error as exc:
                    raise StoreError(f"postgresql: {exc}") from exc
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
