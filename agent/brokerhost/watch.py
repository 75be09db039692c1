"""Broker-host mode under `run` (`[broker]` in agent.toml): when to judge the broker again.

Owns `BrokerHostWatch`: the last judgement (the status part and the findings that
travel with it) and its monotonic instant; `current` judges afresh once it is
`check_every_s` old, else hands back the last one, so a report every minute does
not mean a TLS handshake with every listener every minute. Must not build or sign
the status (`agent.status`, `agent.service`), or read the clock itself.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from certmon import pki
from certmon import wire as p

from . import KINDS
from .inventory import inspect_broker
from .statuspart import host_findings, status_part

log = logging.getLogger("certmon.agent")

Judged = tuple[p.BrokerHostState, tuple[pki.Finding, ...]]


class BrokerHostWatch:
    def __init__(self, config_path: Path, kind: str, check_every_s: float) -> None:
        self.config_path = config_path
        self.kind = kind
        self.check_every_s = check_every_s
        self._last: tuple[float, Judged] | None = None

    def current(self, now: datetime, mono_s: float, policy: pki.Policy) -> Judged:
        if self._last is None or mono_s - self._last[0] >= self.check_every_s:
            report = inspect_broker(KINDS[self.kind](self.config_path), now, policy)
            self._last = (mono_s, (status_part(report), host_findings(report)))
            log.info("broker host %s judged: %s", self.config_path,
                     self._last[1][0].severity.name)
        return self._last[1]
