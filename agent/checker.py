"""The short-lived half of `certmon-agent run`: one report, in a child that
`agent.resident` forks for it and that exits after it.

Owns what a check carries from one report to the next (`CheckerState`, pickled into
`Reply.state`, which the resident keeps as opaque bytes): the config in force
(loaded at the first check and after SIGHUP; one that no longer loads is logged and
the running one kept), the device id, the last full status (heartbeats), the x5c
memory, the broker chain judged on this connection, the broker host's last
judgement and the last valid beacon. One check builds an `AgentService` around the
resident's link, runs the renewal check and the cycle, spools the status, and
returns the plan and the outbox.
Must not publish, or touch the resident's link beyond reading its state: the socket
is the parent's, and a byte written here would corrupt its MQTT stream.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING

from certmon import wire as p
from certmon.errors import ConfigError, TransportError

from .brokerchain import BrokerChainWatch
from .config import AgentConfig
from .handoff import Reply
from .heartbeat import LastFull
from .hostmode import BrokerHostMode
from .linkplan import plan_for, read_beacon
from .service import AgentService, CycleResult
from .x5c import X5cSchedule

if TYPE_CHECKING:
    from .resident import ResidentAgent

log = logging.getLogger("certmon.agent")


class CheckerConfigError(Exception):
    """The first check could not load the config: `run` exits 78."""


@dataclass(slots=True)
class CheckerState:
    config: AgentConfig
    device_id: str | None
    last_full: LastFull | None
    x5c: X5cSchedule
    broker_chain: BrokerChainWatch
    broker_host: BrokerHostMode
    beacon: p.BeaconEcho | None
    link_generation: int
    last_seq: int = 0  # the last sequence number used, whatever the counter file says


def check(resident: ResidentAgent, *, reload: bool) -> Reply:
    state = pickle.loads(resident.state) if resident.state else None  # noqa: S301 - ours
    if state is not None and not isinstance(state, CheckerState):
        state = None
    config = _config(resident, state, reload=reload)
    # A reload that failed keeps the running config, and with it what was judged.
    is_reloaded = state is not None and config is not state.config
    if resident.plan is not None and resident.plan.state_dir != config.agent.state_dir:
        # As in one process: the state directory (spool, sequence numbers) is the one
        # the agent started with; a reload does not move it.
        config = dataclasses.replace(config, agent=dataclasses.replace(
            config.agent, state_dir=resident.plan.state_dir))
    service = AgentService(config)
    # The agent is the resident process: its boot, its start, its memory.
    service.boot_id, service.started_mono_s = resident.boot_id, resident.started_mono_s
    service.rss_pid = os.getppid()
    if resident.delivery is not None:  # spool counters and the last PUBACK's instant
        service.delivery = resident.delivery
    service.uplink.link = resident.link  # read only: the link's state, never its socket
    raw = resident.uplink.beacon
    beacon = read_beacon(*raw) if raw is not None else None
    if state is not None:
        # Resolved once, as in one process: a reload does not rename the device.
        if state.device_id is not None:
            service.device_id = state.device_id
        service.heartbeats.last_full = state.last_full
        service.x5c = state.x5c
        service.broker_chain = state.broker_chain
        if state.link_generation != resident.link_generation:
            service.broker_chain.forget_session()  # a new link: judged afresh
        if not is_reloaded:  # after a reload, judged afresh with the new [broker] and policy
            service.broker_host = state.broker_host
        beacon = beacon or state.beacon
        service.seq.at_least(state.last_seq)
    service.uplink.beacon = beacon
    result = _report(service)
    client_sha = None
    if result is not None:
        client = result.material.client
        client_sha = client.certs[0].facts.sha256 if client and client.certs else None
    elif resident.plan is not None:
        client_sha = resident.plan.client_sha256  # keep the link as it is
    outbox = None
    if result is not None:
        outbox = service.prepare(result)
        service.log_report(result)
    new_state = CheckerState(config, service.device_id, service.heartbeats.last_full,
                             service.x5c, service.broker_chain, service.broker_host,
                             service.uplink.beacon, resident.link_generation, service.seq.last)
    return Reply(plan_for(config, service.device_id, client_sha), outbox,
                 pickle.dumps(new_state))


def _report(service: AgentService) -> CycleResult | None:
    """`AgentService._report_logged` without the link: renewal, then the cycle."""
    service.renew_logged()
    try:
        return service.cycle()
    except (ConfigError, TransportError, OSError) as exc:
        log.error("report failed: %s", exc)
        return None


def _config(resident: ResidentAgent, state: CheckerState | None, *,
            reload: bool) -> AgentConfig:
    if state is not None and not reload:
        return state.config
    import argparse  # with the CLI: only when the config is (re)loaded

    from .cli import load_config

    try:
        config = load_config(argparse.Namespace(**resident.flags))
    except ConfigError as exc:
        if state is None:
            raise CheckerConfigError(str(exc)) from exc
        log.error("configuration not reloaded, keeping the running one: %s", exc)
        return state.config
    if state is not None:
        log.info("configuration reloaded")
    return config

