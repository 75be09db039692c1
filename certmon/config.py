"""Typed TOML configuration: TOML → frozen slotted dataclasses, every problem at once.

Owns the schema machinery (`schema`, `setting`, `section`), loading (`load`, `loads`),
CLI flag overrides, the Markdown reference renderer, and the pieces both roles share
(`PolicyConfig`, `validate_device_id`, the MQTT URL rules). A schema is a dataclass
whose field types drive parsing and whose `setting(...)` metadata carries the doc
and the checks; defaults live on the fields and nowhere else.

Every problem becomes one line `FILE:LINE: KEY: problem` (or `--flag: KEY: problem`
for an override) and all of them are raised together in one `ConfigError`.
Must not: import `agent` or `collector`, touch the network, or read any file other
than the config file and, when `check_files` is on, the files settings name.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import re
import tomllib
import types
import typing
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, dataclass_transform

from certmon.errors import ConfigError

__all__ = [
    "ConfigInvalid", "PolicyConfig", "Problem", "broker_endpoint", "check_mqtt_url",
    "load", "loads", "render_reference", "schema", "section", "setting",
    "validate_device_id", "validate_topic_level", "validate_topic_prefix",
]

T = TypeVar("T")
_META = "certmon.config"
_MISSING: Any = dataclasses.MISSING
_INVALID: Any = object()  # a value that failed; its problems are already recorded


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


def setting(*, default: Any = _MISSING, doc: str, ge: float | None = None,
            le: float | None = None, schemes: tuple[str, ...] = (),
            readable: bool = False, min_items: int = 0,
            check: Callable[[Any], str | None] | None = None) -> Any:
    """Declare one key: its default (omit it for a required key), doc and checks.

    On a tuple field, `schemes`, `readable`, `ge`/`le` and `check` apply to each item.
    """
    rule = Rule(doc, ge, le, schemes, readable, min_items, check)
    return dataclasses.field(default=default, metadata={_META: rule})


def section(*, doc: str, default_factory: Callable[[], Any] | None = None) -> Any:
    """Declare a `[table]`. With `default_factory` (the section's class, when all its
    keys have defaults) the table may be left out of the file."""
    meta = {_META: Rule(doc)}
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


# --- shared rules -----------------------------------------------------------------

_RESERVED_IDS = frozenset({"fleet", "alerts"})


def validate_topic_level(s: str) -> str | None:
    """Problem with `s` as one MQTT topic level (device id, share group), or None."""
    if not s:
        return "must not be empty"
    for c, why in (("/", "it separates topic levels"), ("+", "it is an MQTT wildcard"),
                   ("#", "it is an MQTT wildcard")):
        if c in s:
            return f"must not contain {c!r} ({why})"
    if any(c.isspace() or unicodedata.category(c).startswith("C") for c in s):
        return "must not contain whitespace or control characters"
    return None


def validate_device_id(s: str) -> str | None:
    """Problem with `s` as a device id (agent refuses it, collector rejects it), or None."""
    if len(s) > 64:
        return f"is {len(s)} characters long (at most 64)"
    if (problem := validate_topic_level(s)) is not None:
        return problem
    if s in _RESERVED_IDS:
        return f"{s!r} is reserved for fleet and collector topics"
    if s.startswith("_"):
        return "must not start with '_' (reserved for collector topics)"
    return None


def validate_topic_prefix(s: str) -> str | None:
    """Problem with `s` as the topic prefix (e.g. "certmon/v1"), or None."""
    if s.startswith("$"):
        return "must not start with '$' (reserved for broker topics)"
    for level in s.split("/"):
        if (problem := validate_topic_level(level)) is not None:
            return "has an empty level" if not level else problem
    return None


def broker_endpoint(url: str) -> tuple[str, int, bool]:
    """(host, port, is_tls) of a checked mqtt:// or mqtts:// URL; ports default to 1883/8883."""
    parts = urllib.parse.urlsplit(url)
    is_tls = parts.scheme == "mqtts"
    return parts.hostname or "", parts.port or (8883 if is_tls else 1883), is_tls


def check_mqtt_url(url: str) -> str | None:
    """Host and port part of the broker URL rule (the scheme is checked by `schemes`)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on "host:99999" or "host:x")
    except ValueError as exc:
        return f"invalid URL: {exc}"
    if not parts.hostname:
        return "has no host (e.g. mqtts://broker.example.net:8883)"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be scheme://host[:port] with no path"
    return None


def _url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    use = " or ".join(f"{s}://" for s in schemes)
    scheme = urllib.parse.urlsplit(url).scheme if "://" in url else ""
    if not scheme:
        return f"not a URL (use {use})"
    if scheme not in schemes:
        return f"unsupported scheme {scheme!r} (use {use})"
    return None


@schema
class PolicyConfig:
    """Expiry thresholds; names match `certmon.pki.Policy` (`Policy(**asdict(cfg))`)."""

    warn_days: float = setting(default=30.0, ge=0, doc="Warn when a certificate expires "
                               "within this many days.")
    crit_days: float = setting(default=7.0, ge=0, doc="Critical within this many days.")
    warn_fraction: float = setting(default=0.0, ge=0, le=1, doc="Also warn when less than "
                                   "this fraction of the lifetime remains (0 = off); "
                                   "the stricter rule wins.")
    crit_fraction: float = setting(default=0.0, ge=0, le=1,
                                   doc="Critical below this fraction of the lifetime (0 = off).")
    ca_horizon_days: float = setting(default=90.0, ge=0, doc="Report trust-store CAs "
                                     "expiring within this many days.")
    min_rsa_bits: int = setting(default=2048, ge=1024, doc="Smaller RSA keys are weak.")
    min_ec_bits: int = setting(default=256, ge=160, doc="Smaller EC keys are weak.")

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if self.crit_days > self.warn_days:
            yield "crit_days", f"must not exceed warn_days ({self.warn_days:g})"
        if self.crit_fraction > self.warn_fraction > 0:
            yield "crit_fraction", f"must not exceed warn_fraction ({self.warn_fraction:g})"


# --- loading ----------------------------------------------------------------------

def load(schema_cls: type[T], path: Path, *, overrides: Mapping[str, object] | None = None,
         flag_names: Mapping[str, str] | None = None, check_files: bool = True) -> T:
    """Read `path` as `schema_cls`; raise ConfigInvalid listing every problem.

    Relative paths in the file are relative to the file's directory. `overrides` maps
    dotted keys ("agent.interval_s") to values; a str is parsed like the flag it came
    from ("60", "true", "a,b") and None means "flag not given". Problems with them are
    reported as `--dotted.key`, or as `flag_names[key]`. `check_files=False` skips the
    "readable file" checks.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigInvalid([Problem(str(path), "", f"cannot read config file: "
                                     f"{exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigInvalid([Problem(str(path), "", f"not UTF-8: {exc.reason}")]) from exc
    return loads(schema_cls, text, source=str(path), base_dir=path.absolute().parent,
                 overrides=overrides, flag_names=flag_names, check_files=check_files)


def loads(schema_cls: type[T], text: str, *, source: str = "<string>",
          base_dir: Path | None = None, overrides: Mapping[str, object] | None = None,
          flag_names: Mapping[str, str] | None = None, check_files: bool = True) -> T:
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
    ctx = _Context(source, base_dir or Path.cwd(), _locate_keys(text), {}, check_files, [])
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


@dataclasses.dataclass(slots=True)
class _Context:
    source: str
    base_dir: Path
    lines: dict[str, int]
    flags: dict[str, str]
    check_files: bool
    problems: list[Problem]

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


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not _MISSING or f.default_factory is not _MISSING


def _rule(f: dataclasses.Field[Any]) -> Rule:
    rule = f.metadata.get(_META)
    return rule if isinstance(rule, Rule) else Rule(doc="")


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type[Any], data: Mapping[str, Any], key: str, ctx: _Context) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    is_ok = True
    for name, value in data.items():
        if name not in fields:
            is_table = isinstance(value, dict) or (
                isinstance(value, list) and bool(value) and isinstance(value[0], dict))
            what = "unknown section" if is_table else "unknown key"
            close = difflib.get_close_matches(name, fields, n=1)
            ctx.add(_join(key, name), f"{what} (did you mean {close[0]!r}?)" if close else what)
            is_ok = False
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        full, tp = _join(key, name), _hints(cls)[name]
        if name in data:
            value = _convert(tp, data[name], full, _rule(f), ctx)
        elif _has_default(f):
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
        ctx.add(_join(key, name), message)
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
    tp = _unwrap_optional(tp)
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
                with value.open("rb"):
                    pass
            except OSError as exc:
                problem = f"cannot read {str(value)!r}: {exc.strerror or exc}"
    if rule.ge is not None and value < rule.ge:
        problem = f"must be at least {rule.ge:g} (got {value!r})"
    if rule.le is not None and value > rule.le:
        problem = f"must be at most {rule.le:g} (got {value!r})"
    if problem is None and rule.schemes:
        problem = _url_problem(value, rule.schemes)
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
        tp = _unwrap_optional(_hints(tp)[name])
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


# --- where is a key? ---------------------------------------------------------------
# tomllib gives values, not positions; this scanner maps every dotted key to the line
# where it (or its table) starts. Keys inside inline tables map to the enclosing key.

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _parse_key(s: str, i: int) -> tuple[list[str], int] | None:
    parts: list[str] = []
    while True:
        while i < len(s) and s[i] in " \t":
            i += 1
        if s.startswith('"', i):
            m = re.compile(r'"(?:[^"\\]|\\.)*"').match(s, i)
            if not m:
                return None
            parts.append(json.loads(m[0]) if "\\" in m[0] else m[0][1:-1])
        elif s.startswith("'", i):
            m = re.compile(r"'[^']*'").match(s, i)
            if not m:
                return None
            parts.append(m[0][1:-1])
        elif m := _BARE_KEY.match(s, i):
            parts.append(m[0])
        else:
            return None
        i = m.end()
        while i < len(s) and s[i] in " \t":
            i += 1
        if not s.startswith(".", i):
            return parts, i
        i += 1


def _scan_value(s: str, i: int, state: list[Any]) -> None:
    """Advance over value text; state = [bracket depth, open multi-line delimiter]."""
    while i < len(s):
        if state[1]:
            end = s.find(state[1], i)
            if end < 0:
                return
            i, state[1] = end + 3, None
            continue
        c = s[i]
        if c == "#":
            return
        if s.startswith(('"""', "'''"), i):
            state[1], i = s[i:i + 3], i + 3
            continue
        if c in "\"'":
            m = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'').match(s, i)
            i = m.end() if m else len(s)
            continue
        state[0] += (c in "[{") - (c in "]}")
        i += 1


def _locate_keys(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}
    arrays: dict[str, int] = {}  # "scan_targets" → how many [[scan_targets]] so far
    table = ""
    state: list[Any] = [0, None]
    for lineno, line in enumerate(text.splitlines(), start=1):
        if state[0] > 0 or state[1]:
            _scan_value(line, 0, state)
            continue
        i = len(line) - len(line.lstrip())
        is_array = line.startswith("[[", i)
        if line.startswith("[", i):
            parsed = _parse_key(line, i + 1 + is_array)
            if parsed is None:
                continue
            path = ""
            for n, part in enumerate(parsed[0], start=1):
                path = _join(path, part)
                if is_array and n == len(parsed[0]):
                    arrays[path] = arrays.get(path, 0) + 1
                lines.setdefault(path, lineno)
                if path in arrays:
                    path += f"[{arrays[path] - 1}]"
            table = path
            lines[path] = lineno
        elif (parsed := _parse_key(line, i)) and line.startswith("=", parsed[1]):
            path = table
            for part in parsed[0]:
                path = _join(path, part)
                lines.setdefault(path, lineno)
            _scan_value(line, parsed[1] + 1, state)
    return lines


# --- reference ---------------------------------------------------------------------

def _type_text(tp: Any, rule: Rule) -> str:
    tp = _unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        elem = _unwrap_optional(args[0])
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
        key, tp, rule = _join(prefix, f.name), _hints(cls)[f.name], _rule(f)
        inner = _unwrap_optional(tp)
        elem = typing.get_args(inner)[0] if typing.get_origin(inner) is tuple else None
        if f.default is not _MISSING:
            default = "unset" if f.default is None else f"`{_toml_text(f.default)}`"
        else:
            default = "" if f.default_factory is not _MISSING else "**required**"
        if dataclasses.is_dataclass(inner) or dataclasses.is_dataclass(elem):
            header = f"[[{key}]]" if elem else f"[{key}]"
            yield f"`{header}`", _type_text(tp, rule), default if elem else "", rule.doc
            yield from _rows(typing.cast(type[Any], elem or inner), key + ("[]" if elem else ""))
        else:
            yield f"`{key}`", _type_text(tp, rule), default, rule.doc


def render_reference(schema_cls: type) -> str:
    """A Markdown table (key, type, default, description) of every key of `schema_cls`."""
    out = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for row in _rows(schema_cls, ""):
        cells = (c.replace("|", "\\|").replace("<", "\\<") for c in row)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # python -m certmon.config agent.config:AgentConfig
    import importlib
    import sys

    from certmon import config  # not this __main__ copy: its Rule class is another class

    module, _, name = sys.argv[1].partition(":")
    sys.stdout.write(config.render_reference(getattr(importlib.import_module(module), name)))


class BrokerEndpoint:
    """For a schema with a `broker` URL: its host, port and whether it is TLS."""

    __slots__ = ()
    broker: str

    @property
    def host(self) -> str:
        return broker_endpoint(self.broker)[0]

    @property
    def port(self) -> int:
        return broker_endpoint(self.broker)[1]

    @property
    def is_tls(self) -> bool:
        return broker_endpoint(self.broker)[2]


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

