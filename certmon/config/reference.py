"""The Markdown reference of a schema: one table row per key, generated, never written.

Owns `render_reference` (key, type with its checks, default, description), which
docs/config.md embeds verbatim and tests/test_config.py compares against; run
`python -m certmon.config module:Class` to print it.
Must not: read or validate a config file; everything it says comes from the schema's
field types and `setting(...)` metadata.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from .schema import MISSING, Rule, hints, join, rule_of, unwrap_optional


def render_reference(schema_cls: type) -> str:
    """A Markdown table (key, type, default, description) of every key of `schema_cls`."""
    out = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for row in _rows(schema_cls, ""):
        cells = (c.replace("|", "\\|").replace("<", "\\<") for c in row)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _type_text(tp: Any, rule: Rule) -> str:
    tp = unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        elem = unwrap_optional(args[0])
        base = "array of tables" if dataclasses.is_dataclass(elem) else (
            f"array of {_type_text(elem, Rule(''))}s")
    elif dataclasses.is_dataclass(tp):
        base = "table"
    elif origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        choices = args if origin is Literal else [m.value for m in tp]
        base = " or ".join(json.dumps(c) for c in choices)
    else:
        base = {bool: "boolean", int: "integer", float: "number", str: "string",
                Path: "path"}[tp]
    notes = [f"≥ {rule.ge:g}"] if rule.ge is not None else []
    notes += [f"≤ {rule.le:g}"] if rule.le is not None else []
    notes += [" or ".join(f"{s}://" for s in rule.schemes)] if rule.schemes else []
    notes += ["readable file" + "s" * (origin is tuple)] if rule.is_readable_file else []
    notes += [f"at least {rule.min_items}"] if rule.min_items else []
    return ", ".join([base, *notes])


def _toml_text(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, tuple):
        return "[" + ", ".join(map(_toml_text, v)) + "]"
    return repr(v)


def _rows(cls: type[Any], prefix: str) -> Iterator[tuple[str, str, str, str]]:
    for f in dataclasses.fields(cls):
        key, tp, rule = join(prefix, f.name), hints(cls)[f.name], rule_of(f)
        inner = unwrap_optional(tp)
        elem = typing.get_args(inner)[0] if typing.get_origin(inner) is tuple else None
        if f.default is not MISSING:
            default = "unset" if f.default is None else f"`{_toml_text(f.default)}`"
        else:
            default = "" if f.default_factory is not MISSING else "**required**"
        if dataclasses.is_dataclass(inner) or dataclasses.is_dataclass(elem):
            header = f"[[{key}]]" if elem else f"[{key}]"
            yield f"`{header}`", _type_text(tp, rule), default if elem else "", rule.doc
            yield from _rows(typing.cast(type[Any], elem or inner), key + ("[]" if elem else ""))
        else:
            yield f"`{key}`", _type_text(tp, rule), default, rule.doc
