"""What the two halves of `certmon-agent run` hand each other (`agent.resident`,
`agent.checker`): plain values, importable without cryptography.

Owns `Plan` (what the resident process needs to hold the MQTT session, the spool and
the timing, derived by the checker from the config and the device's identity) and
`Reply` (one check's plan, its outbox, and the checker's own state, which the
resident keeps as opaque bytes for the next check). Must not import cryptography,
`certmon.pki`, `certmon.wire`, `certmon.config` or anything that does: the resident
unpickles these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from certmon.mqtt import LinkSettings

from .delivery import Outbox


@dataclass(frozen=True, slots=True)
class Plan:
    state_dir: Path
    spool_max_messages: int
    spool_max_bytes: int
    interval_s: int
    jitter_fraction: float
    watched: tuple[Path, ...]  # the TLS files stat()ed between reports
    status_expiry_s: int  # message expiry of a spooled status on the broker
    beacon_topic: str
    # None until the device id is known (from the config or the client certificate).
    settings: LinkSettings | None = None
    client_sha256: str | None = None  # a new client certificate: a new link
    online_topic: str = ""
    online_payload: bytes = b""  # retained on each new session
    offline_payload: bytes = b""  # retained on a clean stop
    # How long a check may take before the resident kills it: a renewal hook runs
    # inside the check (renewal.timeout_s), everything else takes seconds.
    check_deadline_s: float = 600.0


@dataclass(frozen=True, slots=True)
class Reply:
    plan: Plan
    outbox: Outbox | None  # None: the report failed (the checker logged why)
    state: bytes  # the checker's state (agent.checker pickles it), opaque here
