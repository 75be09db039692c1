"""Broker-host mode as the service sees it (`[broker] config`, docs/broker-host.md).

Owns building the `BrokerHostWatch` on first use, with the configured broker kind
and `check_every_s`, and dropping it on a reload (the new `[broker]` and policy are
judged afresh). Imported lazily here: an agent that is not on a broker host never
loads `agent.brokerhost`. Must not judge (`agent.brokerhost`) or build the status.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from certmon import pki
from certmon import wire as p

from .config import BrokerHostConfig

if TYPE_CHECKING:
    from .brokerhost.watch import BrokerHostWatch


class BrokerHostMode:
    def __init__(self) -> None:
        self._watch: BrokerHostWatch | None = None

    def judge(self, broker: BrokerHostConfig, now: datetime, mono_s: float,
              policy: pki.Policy) -> tuple[p.BrokerHostState, tuple[pki.Finding, ...]] | None:
        """The broker host's files and listeners judged, at most once per
        `check_every_s`; the reports between carry the last judgement. None when the
        agent is not on a broker host."""
        if broker.config is None:
            return None
        if self._watch is None:
            from .brokerhost.watch import BrokerHostWatch

            self._watch = BrokerHostWatch(broker.config, broker.kind, broker.check_every_s)
        return self._watch.current(now, mono_s, policy)

    def reset(self) -> None:
        self._watch = None
