"""The pieces hostile inputs are built from, shared by the ingest fuzz tests
(tests/test_fuzz_ingest.py) and the long campaign (bench/fuzz_ingest.py).

Owns: walking a JSON document's paths and base64url without padding (JWS parts).

Must not: decide what is hostile or what the collector must answer (each fuzzer
does), or sign anything (kit.fleet's devices do).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

__all__ = ["b64url", "json_paths"]


def b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def json_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path in a JSON document: dict keys and list indexes, nested."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield (*prefix, key)
            yield from json_paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield (*prefix, i)
            yield from json_paths(value, (*prefix, i))
