"""How the store's one set of SQL meets each database: the `Dialect` and the `Session`.

Owns what truly differs between the backends' SQL (placeholder style, the scalar
"greatest", the silence arithmetic, row locks, instant encoding, the "no limit" value,
how a batch of rows travels), the `Session` through which every statement runs, and
the loading of `migrations/<dialect>/NNNN_name.sql`.
It must not hold queries of its own (they are `collector.store.sql`'s and
`collector.store.queries`'), open connections or manage transactions (each backend
module does).

The shared SQL is written with `?` (positional) or `:name` (named) placeholders, which
sqlite3 takes as they are; the PostgreSQL dialect rewrites them to psycopg's `%s` /
`%(name)s` once per distinct statement (so no SQL string literal may hold `?`, `%` or
`:name`). A set of rows is `{rows}` in a statement run by `Session.each`: VALUES lists
in SQLite, one `unnest` array per column in PostgreSQL.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

Row = tuple[Any, ...]  # a result row: its values' types are the database's
Params = Sequence[object] | Mapping[str, object]
Kind = Literal["text", "int", "instant"]  # a column's kind, for `Dialect.row_arrays`


@dataclass(frozen=True, slots=True)
class Dialect:
    """What one backend's SQL differs in; the statements themselves are shared."""

    name: str  # also the folder of its migrations
    sql: Callable[[str], str]  # shared placeholder style → the driver's
    encode: Callable[[datetime], object]  # a tz-aware instant → its stored value
    decode: Callable[[Any], datetime]  # a stored instant → tz-aware UTC
    greatest: str  # the scalar maximum of two non-NULL values: max() / GREATEST()
    silent: str  # true for a device row silent for more than :f × interval_s at :now
    lock_devices: str  # appended to a SELECT over `devices d` that must lock the rows
    no_limit: int | None  # the LIMIT that means "all rows"
    max_params: int  # bound parameters per statement
    # How a set of rows travels (`Session.each`): empty, as `VALUES (?, ?), …` lists
    # within max_params; else one array per column, `unnest(?::<array type>[], …)`,
    # mapping each column kind to its array element type.
    row_arrays: Mapping[Kind, str]
    migrations_table: str  # CREATE TABLE IF NOT EXISTS schema_migrations …
    integrity_sql: str  # answers [("ok",)] when the database is sound


def same(sql: str) -> str:
    """sqlite3 takes `?` and `:name` as written."""
    return sql


_PLACEHOLDER = re.compile(r"%|\?|(?<![:\w]):(\w+)")


@functools.lru_cache(maxsize=512)
def pyformat(sql: str) -> str:
    """`?` → `%s`, `:name` → `%(name)s`, a literal `%` → `%%`; `::type` casts stay."""
    def swap(m: re.Match[str]) -> str:
        found = m.group(0)
        return "%%" if found == "%" else "%s" if found == "?" else f"%({m.group(1)})s"

    return _PLACEHOLDER.sub(swap, sql)


class Cursor(Protocol):
    """What the store needs of a DB-API cursor: sqlite3's and psycopg's both are one."""

    @property
    def description(self) -> object: ...
    @property
    def rowcount(self) -> int: ...
    def execute(self, sql: str, params: Params = ..., /) -> object: ...
    def executemany(self, sql: str, params: Iterable[Params], /) -> object: ...
    def fetchall(self) -> list[Row]: ...


class Session:
    """One transaction's statements, in the shared placeholder style."""

    def __init__(self, cursor: Cursor, dialect: Dialect) -> None:
        self._cur = cursor
        self._d = dialect

    def rows(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one statement; its rows (RETURNING included), or [] if it has none."""
        self._cur.execute(self._d.sql(sql), params)
        return self._cur.fetchall() if self._cur.description is not None else []

    def count(self, sql: str, params: Params = ()) -> int:
        """Run one statement; the number of rows it changed."""
        self._cur.execute(self._d.sql(sql), params)
        return self._cur.rowcount

    def many(self, sql: str, rows: Sequence[Params]) -> None:
        if rows:
            self._cur.executemany(self._d.sql(sql), rows)

    def script(self, sql: str) -> None:
        """A migration statement: no parameters, so no placeholder rewriting."""
        self._cur.execute(sql)

    def each(self, sql: str, kinds: Sequence[Kind], rows: Sequence[Sequence[object]]
             ) -> list[Row]:
        """`sql` with `{rows}` standing for the row set `rows` (columns of `kinds`),
        in as few statements as the dialect allows; all their result rows. Rows keep
        the given order, which is the order PostgreSQL takes their locks in."""
        out: list[Row] = []
        d = self._d
        size = len(rows) if d.row_arrays else max(1, d.max_params // len(kinds))
        params: list[object]
        for i in range(0, len(rows), size or 1):
            chunk = rows[i:i + size]
            if d.row_arrays:
                rel = "SELECT * FROM unnest(" + ", ".join(  # noqa: S608
                    f"?::{d.row_arrays[k]}[]" for k in kinds) + ")"
                params = [list(col) for col in zip(*chunk, strict=True)]
            else:
                one = "(" + ", ".join("?" * len(kinds)) + ")"
                rel = "VALUES " + ", ".join([one] * len(chunk))
                params = [v for row in chunk for v in row]
            out += self.rows(sql.replace("{rows}", rel), params)
        return out


def migrations(dialect: str) -> list[tuple[int, str]]:
    """(version, SQL) of migrations/<dialect>/NNNN_name.sql, in version order."""
    from importlib.resources import files

    folder = files("collector.store").joinpath("migrations", dialect)
    out = [(int(entry.name.partition("_")[0]), entry.read_text("utf-8"))
           for entry in folder.iterdir() if entry.name.endswith(".sql")]
    return sorted(out)
