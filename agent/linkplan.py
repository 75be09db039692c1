"""What the MQTT link needs from the config, and what comes back on it: the settings
(client id, TLS files, the retained offline will), the topics and expiries of the
session's own messages, and the collector's beacon decoded.

Owns `link_settings`, `plan_for` (the `agent.handoff.Plan` the resident half of `run`
holds) and `read_beacon`. Must not build the link (`agent.uplink`) or publish.
"""

from __future__ import annotations

import dataclasses

from certmon import wire as p
from certmon.errors import ProtocolError
from certmon.mqtt import LinkSettings, Will

from .config import AgentConfig
from .handoff import Plan


def link_settings(config: AgentConfig, device_id: str) -> LinkSettings:
    mqtt, prefix = config.mqtt, config.agent.topic_prefix
    return LinkSettings(
        host=mqtt.host, port=mqtt.port, client_id=mqtt.client_id or f"certmon-{device_id}",
        is_tls=mqtt.is_tls, ca_bundle=str(config.tls.ca_bundle),
        cert=str(config.tls.cert), key=str(config.tls.key), alpn=mqtt.alpn,
        servername=mqtt.servername, keepalive_s=mqtt.keepalive_s, protocol=mqtt.protocol,
        will=Will(p.online_topic(prefix, device_id), p.online_payload(False), 1, True),
        retain=mqtt.retain,
    )


def status_expiry_s(config: AgentConfig) -> int:
    """With heartbeats the retained full status must outlive the heartbeats that refer
    to it: a new collector learns the device's state from that copy."""
    agent = config.agent
    return 3 * agent.interval_s + (agent.full_every_s if agent.heartbeat else 0)


def heartbeat_expiry_s(config: AgentConfig) -> int:
    return 3 * config.agent.interval_s


def plan_for(config: AgentConfig, device_id: str | None, client_sha256: str | None) -> Plan:
    agent, tls, prefix = config.agent, config.tls, config.agent.topic_prefix
    watched = tls.watched()
    deadline_s = max(600.0, config.renewal.timeout_s + 300.0)
    plan = Plan(state_dir=agent.state_dir, spool_max_messages=agent.spool_max_messages,
                spool_max_bytes=agent.spool_max_bytes, interval_s=agent.interval_s,
                jitter_fraction=agent.jitter_fraction, watched=watched,
                status_expiry_s=status_expiry_s(config), beacon_topic=p.beacon_topic(prefix),
                check_deadline_s=deadline_s)
    if device_id is None:
        return plan
    return dataclasses.replace(plan, settings=link_settings(config, device_id),
                               client_sha256=client_sha256,
                               online_topic=p.online_topic(prefix, device_id),
                               online_payload=p.online_payload(True),
                               offline_payload=p.online_payload(False))


def read_beacon(payload: bytes, received_mono_s: float) -> p.BeaconEcho | None:
    """The collector's live beacon as the status echoes it; None when malformed."""
    try:
        beacon = p.decode_message(p.Beacon, payload, max_bytes=1024)
    except ProtocolError:
        return None
    return p.BeaconEcho(beacon_ts=beacon.ts, received_mono_s=received_mono_s)
