"""The schema machinery: how a config schema is declared and how its fields are read.

Owns `schema`, `setting` and `section` (a schema is a frozen, slotted, keyword-only
dataclass whose field types drive parsing and whose `setting(...)` metadata carries the
doc and the checks; defaults live on the fields and nowhere else), the `Rule` stored
in that metadata, the `Problem`/`ConfigInvalid` error shape, and the small field
helpers that the loader and the reference renderer both need.
Must not: read files, parse TOML or know any concrete schema.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, dataclass_transform

from certmon.errors import ConfigError

T = TypeVar("T")
META = "certmon.config"
MISSING: Any = dataclasses.MISSING


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """What `setting()` stores in a field's metadata."""

    doc: str
    ge: float | None = None
    le: float | None = None
    schemes: tuple[str, ...] = ()
    is_readable_file: bool = False
    min_items: int = 0
    check: Callable[[Any], str | None] | None = None


def setting(*, default: Any = MISSING, doc: str, ge: float | None = None,
            le: float | None = None, schemes: tuple[str, ...] = (),
            readable: bool = False, min_items: int = 0,
            check: Callable[[Any], str | None] | None = None) -> Any:
    """Declare one key: its default (omit it for a required key), doc and checks.

    On a tuple field, `schemes`, `readable`, `ge`/`le` and `check` apply to each item.
    """
    rule = Rule(doc, ge, le, schemes, readable, min_items, check)
    return dataclasses.field(default=default, metadata={META: rule})


def section(*, doc: str, default_factory: Callable[[], Any] | None = None) -> Any:
    """Declare a `[table]`. With `default_factory` (the section's class, when all its
    keys have defaults) the table may be left out of the file."""
    meta = {META: Rule(doc)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(metadata=meta)


@dataclass_transform(frozen_default=True, kw_only_default=True,
                     field_specifiers=(setting, section))
def schema(cls: type[T]) -> type[T]:
    """Make `cls` a frozen, slotted, keyword-only dataclass usable as a config schema.

    A schema may define `cross_check(self) -> Iterator[tuple[str, str]]` yielding
    (field name, problem) for rules spanning several keys; it runs once the keys parse.
    """
    return dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)


class Problem(NamedTuple):
    where: str  # "FILE:LINE", "FILE" or "--flag"
    key: str  # dotted, e.g. "scan_targets[1].port"; "" for file-level problems
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.message}" if self.key else (
            f"{self.where}: {self.message}")


class ConfigInvalid(ConfigError):
    """A ConfigError carrying each problem; the message has one line per problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(map(str, self.problems)))


# --- field helpers (shared by the loader and the reference) ----------------------------

def has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def rule_of(f: dataclasses.Field[Any]) -> Rule:
    rule = f.metadata.get(META)
    return rule if isinstance(rule, Rule) else Rule(doc="")


_HINTS: dict[type[Any], dict[str, Any]] = {}


def hints(cls: type[Any]) -> dict[str, Any]:
    """The resolved field types of a schema (the annotations are strings), cached."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
