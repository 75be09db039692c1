"""The collector's composition root: config in, a wired CollectorService out.

Owns which parts run together (store, ingest, alert engine and sinks, web server)
and nothing else; each part is built from its own module.
"""

from __future__ import annotations

from .config import CollectorConfig
from .service import CollectorService


def build_collector(config: CollectorConfig) -> CollectorService:
    return CollectorService(config)
