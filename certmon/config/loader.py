"""Loading a config: TOML text and command-line flags → one frozen schema instance.

Owns `load`, `loads` and `load_with_flags`: TOML decoding, conversion of every value
by its field's type and `Rule` (numbers, paths relative to the file, readable files,
URLs, enums and literals, arrays of tables), unknown-key detection with a "did you
mean", `cross_check`, and the flag overrides layered on top. Every problem becomes one
line `FILE:LINE: KEY: problem` (or `--flag: KEY: problem`) and all of them are raised
together in one `ConfigInvalid`.
Must not: read any file other than the config file and, when `check_files` is on, the
files settings name; touch the network; or know any concrete schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..files import check_readable
from .locate import locate_keys
from .schema import (
    ConfigInvalid,
    Problem,
    Rule,
    has_default,
    hints,
    join,
    rule_of,
    unwrap_optional,
)
from .shared import url_problem

T = TypeVar("T")
_INVALID: Any = object()  # a value that failed; its problems are already recorded


def load(schema_cls: type[T], path: Path, *, overrides: Mapping[str, object] | None = None,
         flag_names: Mapping[str, str] | None = None, check_files: bool = True,
         known_only: bool = False) -> T:
    """Read `path` as `schema_cls`; raise ConfigInvalid listing every problem.

    Relative paths in the file are relative to the file's directory. `overrides` maps
    dotted keys ("agent.interval_s") to values; a str is parsed like the flag it came
    from ("60", "true", "a,b") and None means "flag not given". Problems with them are
    reported as `--dotted.key`, or as `flag_names[key]`. `check_files=False` skips the
    "readable file" checks. `known_only=True` reads a view of another program's file:
    keys the schema does not declare are ignored, except inside an array of tables.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigInvalid([Problem(str(path), "", f"cannot read config file: "
                                     f"{exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigInvalid([Problem(str(path), "", f"not UTF-8: {exc.reason}")]) from exc
    return loads(schema_cls, text, source=str(path), base_dir=path.absolute().parent,
                 overrides=overrides, flag_names=flag_names, check_files=check_files,
                 known_only=known_only)


def loads(schema_cls: type[T], text: str, *, source: str = "<string>",
          base_dir: Path | None = None, overrides: Mapping[str, object] | None = None,
          flag_names: Mapping[str, str] | None = None, check_files: bool = True,
          known_only: bool = False) -> T:
    """Like `load`, from TOML text; `source` names it in messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg, line = str(exc), None
        if m := re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", msg, re.S):
            msg, line = f"{m[1]} (column {m[3]})", int(m[2])
        elif msg.endswith("(at end of document)"):
            line = max(len(text.splitlines()), 1)
        where = f"{source}:{line}" if line else source
        raise ConfigInvalid([Problem(where, "", f"invalid TOML: {msg}", line)]) from exc
    ctx = _Context(source, base_dir or Path.cwd(), locate_keys(text), {}, check_files, [],
                   known_only)
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue  # a flag that was not given (argparse's default)
        ctx.flags[key] = (flag_names or {}).get(key, f"--{key}")
        _apply_override(schema_cls, data, key, raw, ctx)
    result = _build(schema_cls, data, "", ctx)
    if ctx.problems:
        # File order, then keys with no line (missing sections), then flags.
        ctx.problems.sort(key=lambda p: (p.where.startswith("-"), p.line is None, p.line or 0))
        raise ConfigInvalid(ctx.problems)
    return typing.cast(T, result)


def load_with_flags(schema_cls: type[T], config_path: str | None, flags: Mapping[str, object],
                    flag_keys: Mapping[str, str], *, check_files: bool = True) -> T:
    """A program's config: the TOML file when one is given, the command-line flags on
    top (flag → dotted key in `flag_keys`; None means "not given"; a repeated flag's
    list becomes a comma list), problems named by the flag the user typed."""
    overrides: dict[str, object] = {}
    for flag, key in flag_keys.items():
        value = flags.get(flag)
        overrides[key] = ",".join(value) if isinstance(value, list) else value
    flag_names = {key: "--" + flag.replace("_", "-") for flag, key in flag_keys.items()}
    if config_path:
        return load(schema_cls, Path(config_path), overrides=overrides, flag_names=flag_names,
                    check_files=check_files)
    return loads(schema_cls, "", source="<command line>", base_dir=Path.cwd(),
                 overrides=overrides, flag_names=flag_names, check_files=check_files)


@dataclasses.dataclass(slots=True)
class _Context:
    source: str
    base_dir: Path
    lines: dict[str, int]
    flags: dict[str, str]
    check_files: bool
    problems: list[Problem]
    known_only: bool = False

    def add(self, key: str, message: str) -> None:
        for k in _prefixes(key):
            if k in self.flags:
                self.problems.append(Problem(self.flags[k], key, message))
                return
            if k in self.lines:
                line = self.lines[k]
                self.problems.append(Problem(f"{self.source}:{line}", key, message, line))
                return
        self.problems.append(Problem(self.source, key, message))


def _prefixes(key: str) -> Iterator[str]:
    """"a[1].b" → "a[1].b", "a[1]", "a": where to look for a line, innermost first."""
    while key:
        yield key
        key = key[: max(key.rfind("."), key.rfind("["), 0)]


def _build(cls: type[Any], data: Mapping[str, Any], key: str, ctx: _Context) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    is_ok = True
    for name, value in data.items():
        if name not in fields:
            if ctx.known_only and not key.endswith("]"):
                continue  # another program's key (an array entry's typo is still ours)
            is_table = isinstance(value, dict) or (
                isinstance(value, list) and bool(value) and isinstance(value[0], dict))
            what = "unknown section" if is_table else "unknown key"
            close = difflib.get_close_matches(name, fields, n=1)
            ctx.add(join(key, name), f"{what} (did you mean {close[0]!r}?)" if close else what)
            is_ok = False
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        full, tp = join(key, name), hints(cls)[name]
        if name in data:
            value = _convert(tp, data[name], full, rule_of(f), ctx)
        elif has_default(f):
            continue
        elif dataclasses.is_dataclass(tp):  # a missing section: name each key it lacks
            value = _build(typing.cast(type[Any], tp), {}, full, ctx)
        else:
            ctx.add(full, "required key is missing")
            value = _INVALID
        if value is _INVALID:
            is_ok = False
        kwargs[name] = value
    if not is_ok:
        return _INVALID
    obj = cls(**kwargs)
    for name, message in getattr(obj, "cross_check", lambda: ())():
        ctx.add(join(key, name), message)
        is_ok = False
    return obj if is_ok else _INVALID


_WANT = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
         Path: "a path (string)"}


def _describe(v: object) -> str:
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    for tp, name in ((int, "integer"), (float, "float"), (str, "string")):
        if isinstance(v, tp):
            return f"{name} {v!r}"
    return "an array" if isinstance(v, list) else "a table" if isinstance(v, dict) else (
        "a date/time")


def _convert(tp: Any, value: Any, key: str, rule: Rule, ctx: _Context) -> Any:
    tp = unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if not isinstance(value, list):
            ctx.add(key, f"expected an array, got {_describe(value)}")
            return _INVALID
        items = [_convert(args[0], v, f"{key}[{i}]", rule, ctx) for i, v in enumerate(value)]
        if _INVALID in items:
            return _INVALID
        if len(items) < rule.min_items:
            ctx.add(key, f"needs at least {rule.min_items} item(s)")
            return _INVALID
        return tuple(items)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            ctx.add(key, f"expected a table, got {_describe(value)}")
            return _INVALID
        return _build(typing.cast(type[Any], tp), value, key, ctx)
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        choices = list(args) if origin is Literal else [m.value for m in tp]
        if value not in choices or isinstance(value, bool):
            ctx.add(key, f"must be one of {', '.join(map(repr, choices))} (got {value!r})")
            return _INVALID
        return value if origin is Literal else tp(value)
    return _convert_scalar(tp, value, key, rule, ctx)


def _convert_scalar(tp: Any, value: Any, key: str, rule: Rule, ctx: _Context) -> Any:
    is_number = tp is float and isinstance(value, int | float)
    if isinstance(value, bool) != (tp is bool) or not (
            is_number or isinstance(value, str if tp is Path else tp)):
        ctx.add(key, f"expected {_WANT.get(tp, str(tp))}, got {_describe(value)}")
        return _INVALID
    if tp is float:
        value = float(value)
    problem = None
    if tp is Path:
        if not value:
            problem = "must not be empty"
        value = ctx.base_dir / value
        if problem is None and rule.is_readable_file and ctx.check_files:
            try:
                check_readable(value)  # a FIFO would block the load: only a regular file
            except OSError as exc:
                problem = f"cannot read {str(value)!r}: {exc.strerror or exc}"
    if rule.ge is not None and value < rule.ge:
        problem = f"must be at least {rule.ge:g} (got {value!r})"
    if rule.le is not None and value > rule.le:
        problem = f"must be at most {rule.le:g} (got {value!r})"
    if problem is None and rule.schemes:
        problem = url_problem(value, rule.schemes)
    if problem is None and rule.check is not None:
        problem = rule.check(value)
    if problem is not None:
        ctx.add(key, problem)
        return _INVALID
    return value


# --- CLI overrides ----------------------------------------------------------------

def _apply_override(cls: type[Any], data: dict[str, Any], key: str, raw: object,
                    ctx: _Context) -> None:
    tp: Any = cls
    for name in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(
            tp) else {}
        if name not in fields:
            ctx.add(key, "unknown key")
            return
        tp = unwrap_optional(hints(tp)[name])
    is_table = dataclasses.is_dataclass(tp) or (
        typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]))
    if is_table:
        ctx.add(key, "is a table; set its keys one by one")
        return
    node = data
    for name in key.split(".")[:-1]:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            return  # the file already has a wrong-typed value here; that is reported
    node[key.rsplit(".", 1)[-1]] = _from_flag(tp, raw) if isinstance(raw, str) else raw


def _from_flag(tp: Any, raw: str) -> Any:
    """Parse a flag's text for `tp`; text that does not parse is kept and then reported."""
    if typing.get_origin(tp) is tuple:
        elem = typing.get_args(tp)[0]
        return [_from_flag(elem, s.strip()) for s in raw.split(",") if s.strip()]
    if tp is bool:
        return {"true": True, "yes": True, "1": True, "on": True, "false": False,
                "no": False, "0": False, "off": False}.get(raw.lower(), raw)
    if tp is Path:
        return str(Path(raw).absolute())  # relative to the working directory, not the file
    for number in (int, float):
        if tp is number:
            try:
                return number(raw)
            except ValueError:
                return raw
    return raw
