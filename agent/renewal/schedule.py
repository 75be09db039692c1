"""Renewal as the service loop sees it: the status's `renewal` part, and one check.

Owns the two calls `agent.service` makes: the `renewal` part of a status (when
`renewal.enabled` and there is a client certificate) and one renewal check, with an
attempt when due, against the files just read. `attempt` is imported on first use:
the attempt machinery (and the TLS probe under it, pyOpenSSL) stays out of an agent
that does not renew. Must not decide when (`policy`) or attempt (`attempt`) itself,
nor read files or clocks: the service passes the material and the instant in.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import TYPE_CHECKING

from certmon import pki
from certmon import wire as p

from ..config import AgentConfig

if TYPE_CHECKING:
    from .attempt import RenewalRun


def with_renewal_part(status: p.Status, config: AgentConfig, client: pki.CertFacts | None,
                      now: datetime, *, is_clock_ok: bool) -> p.Status:
    """`status` with its `renewal` part, when renewal is on and there is a client cert."""
    if not config.renewal.enabled or client is None:
        return status
    from . import attempt

    return dataclasses.replace(status, renewal=attempt.status_part(
        config, status.device_id, client, now, is_clock_ok=is_clock_ok))


def renew_if_due(config: AgentConfig, device_id: str, trust_store: pki.Bundle,
                 client: pki.CertFacts, now: datetime, *, is_clock_ok: bool,
                 force: bool = False) -> RenewalRun:
    from . import attempt

    return attempt.renew_if_due(config, device_id, trust_store, client, now,
                                is_clock_ok=is_clock_ok, force=force)
