"""When a heartbeat may stand for a full status (`agent.heartbeat`, `agent.full_every_s`).

Owns the record of the last full status signed (its digest, its essence, its
monotonic instant and the connection it was signed on) and the rule that says when
this cycle's status may go out as a compact heartbeat naming that full status.
Must not sign, publish or read a clock or the link itself: the service passes the
instant, the connection and the spool depth in (`agent.status` owns the essence).
"""

from __future__ import annotations

from dataclasses import dataclass

from certmon import wire as p

from .config import AgentConfig
from .status import build_heartbeat, status_essence


@dataclass(frozen=True, slots=True)
class LastFull:
    """The last full status signed: what a heartbeat may stand for."""

    digest: str  # p.status_digest of its payload
    essence: bytes  # status_essence()
    at_mono_s: float
    connects: int | None  # the link's connection count when it was signed


class HeartbeatSchedule:
    """The last full status and the heartbeat rule; one per agent."""

    def __init__(self) -> None:
        self.last_full: LastFull | None = None

    def record_full(self, config: AgentConfig, payload: bytes, status: p.Status,
                    mono_s: float, connects: int | None) -> None:
        """A full status was signed (only remembered with `agent.heartbeat` on)."""
        if config.agent.heartbeat:
            self.last_full = LastFull(p.status_digest(payload), status_essence(status), mono_s,
                                      connects)

    def heartbeat_for(self, config: AgentConfig, status: p.Status, *, connected_on: int | None,
                      spool_depth: int, mono_s: float) -> p.Heartbeat | None:
        """A heartbeat to send instead of `status`, or None: only while connected
        (`connected_on` is the link's connection count, None when not connected) on
        the session the last full status was signed on, with that status confirmed
        (the spool is empty, so order holds: nothing older is still on its way),
        younger than `full_every_s`, and differing from this one only in time and
        counters. A new session starts with a full status, so it re-asserts the
        retained copy a new collector bootstraps from (and carries x5c when due).
        Without retained statuses (`mqtt.retain` false) a new collector would have
        nothing a heartbeat refers to: full statuses then."""
        agent, last = config.agent, self.last_full
        if not agent.heartbeat or last is None or connected_on is None \
                or not config.mqtt.retain:
            return None
        if spool_depth or connected_on != last.connects:
            return None
        if mono_s - last.at_mono_s >= agent.full_every_s:
            return None
        if status_essence(status) != last.essence:
            return None
        return build_heartbeat(status, last.digest)
