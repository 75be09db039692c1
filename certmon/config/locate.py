"""Where is a key? A line scanner mapping every dotted TOML key to the line it starts on.

tomllib gives values, not positions; config problems must still name `FILE:LINE`.
Owns `locate_keys`: tables, arrays of tables (`scan_targets[1]`), dotted and quoted
keys, multi-line strings and arrays; keys inside inline tables map to the enclosing key.
Must not: parse values or judge the file (tomllib has already accepted it when this
runs; on text it cannot follow it maps fewer keys, never raises).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .schema import join

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def locate_keys(text: str) -> dict[str, int]:
    """Dotted key ("a.b", "scan_targets[1].port") → the 1-based line where it starts."""
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
                path = join(path, part)
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
                path = join(path, part)
                lines.setdefault(path, lineno)
            _scan_value(line, parsed[1] + 1, state)
    return lines


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
