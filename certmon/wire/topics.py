"""Topic names, device ids and the online payloads: where every certmon message goes.

Owns the device-id rule (the one the agent's config refuses at start and the
collector's ingest rejects on the wire: `certmon.config` imports it from here), the
topic layout (per-device topics below `<prefix>/devices/`, fleet, alert and
collector topics beside that subtree), its builders and subscription filters, the
parser that maps a topic back to (device id, kind) — for the current layout and,
while a fleet migrates, the certmon/v1 one — and the two payloads of the retained
online topic.

Why a subtree of their own: a broker lets a device write below a level named by its
certificate CN (`pattern write <prefix>/devices/%u/#`). In v1 that level sat beside
`fleet`, `alerts` and `_collector`, so a CN `fleet` could write the fleet summary on
the broker whatever certmon refused; below `devices/` no CN names those topics.

It must not import paho, do I/O or know about message bodies (`codec`, `messages`).
"""

from __future__ import annotations

import enum
import json
import unicodedata

from certmon.errors import ProtocolError

DEFAULT_PREFIX = "certmon/v2"
DEVICES_LEVEL = "devices"
# The v1 layout, `certmon/v1/<device>/<kind>` (its default prefix), read while a fleet
# migrates (collector `mqtt.legacy_v1_topics`; docs/mosquitto.md).
LEGACY_V1_PREFIX = "certmon/v1"
# No longer needed to keep apart device and fleet topics (they live in different
# subtrees now), still refused: a v1 broker ACL maps these CNs onto collector topics.
RESERVED_DEVICE_IDS = frozenset({"fleet", "alerts"})
MAX_DEVICE_ID_LEN = 64


class TopicKind(enum.StrEnum):
    STATUS = "status"
    CERT = "cert"
    ONLINE = "online"
    INVENTORY = "inventory"
    HEARTBEAT = "heartbeat"  # not retained: the status topic keeps the last full status


def validate_topic_level(level: str) -> str | None:
    """The problem with `level` as one MQTT topic level (device id, share group), or None."""
    if not level:
        return "must not be empty"
    for ch, why in (("/", "it separates topic levels"), ("+", "it is an MQTT wildcard"),
                    ("#", "it is an MQTT wildcard")):
        if ch in level:
            return f"must not contain {ch!r} ({why})"
    # Categories C* and Z*: controls, format characters such as U+202E (which would
    # reorder a dashboard line), unassigned code points and every kind of space.
    if any(ch.isspace() or unicodedata.category(ch)[0] in "CZ" for ch in level):
        return "must not contain whitespace or control characters"
    return None


def validate_device_id(device_id: str) -> str | None:
    """The problem with `device_id` as a device id, or None. The canonical rule:
    the agent refuses such an id at start and the collector rejects its messages."""
    if len(device_id) > MAX_DEVICE_ID_LEN:
        return f"is {len(device_id)} characters long (at most {MAX_DEVICE_ID_LEN})"
    if (problem := validate_topic_level(device_id)) is not None:
        return problem
    if device_id in RESERVED_DEVICE_IDS:
        return f"{device_id!r} is reserved for fleet and collector topics"
    if device_id.startswith("_"):
        return "must not start with '_' (reserved for collector topics)"
    return None


def validate_topic_prefix(prefix: str) -> str | None:
    """The problem with `prefix` as the topic prefix (e.g. "certmon/v2"), or None."""
    if prefix.startswith("$"):
        return "must not start with '$' (reserved for broker topics)"
    for level in prefix.split("/"):
        if (problem := validate_topic_level(level)) is not None:
            return "has an empty level" if not level else problem
    return None


def _checked(device_id: str) -> str:
    # A bad id here is a programming error upstream (config validates at start);
    # refusing it keeps a '+' or '#' from ever being published as a topic.
    if (problem := validate_device_id(device_id)) is not None:
        raise ValueError(f"device id {device_id!r} {problem}")
    return device_id


def device_topic(prefix: str, device_id: str, kind: TopicKind) -> str:
    return f"{prefix}/{DEVICES_LEVEL}/{_checked(device_id)}/{kind}"


def legacy_v1_device_topic(device_id: str, kind: TopicKind) -> str:
    """Where a certmon/v1 agent (default prefix) publishes: `certmon/v1/<dev>/<kind>`."""
    return f"{LEGACY_V1_PREFIX}/{_checked(device_id)}/{kind}"


def status_topic(prefix: str, device_id: str) -> str:
    return device_topic(prefix, device_id, TopicKind.STATUS)


def cert_topic(prefix: str, device_id: str) -> str:
    return device_topic(prefix, device_id, TopicKind.CERT)


def online_topic(prefix: str, device_id: str) -> str:
    return device_topic(prefix, device_id, TopicKind.ONLINE)


def inventory_topic(prefix: str, device_id: str) -> str:
    return device_topic(prefix, device_id, TopicKind.INVENTORY)


def heartbeat_topic(prefix: str, device_id: str) -> str:
    return device_topic(prefix, device_id, TopicKind.HEARTBEAT)


def beacon_topic(prefix: str) -> str:
    return f"{prefix}/_collector/time"


def fleet_summary_topic(prefix: str) -> str:
    return f"{prefix}/fleet/summary"


def fleet_device_topic(prefix: str, device_id: str) -> str:
    # fleet/devices/<dev>, not fleet/<dev>: a device named "summary" must not collide.
    return f"{prefix}/fleet/devices/{_checked(device_id)}"


def alerts_topic(prefix: str, device_id: str | None = None) -> str:
    return f"{prefix}/alerts" if device_id is None else f"{prefix}/alerts/{_checked(device_id)}"


def device_topic_filter(prefix: str, kind: TopicKind | None = None) -> str:
    """Subscription filter for one kind (or all kinds) of every device's topics."""
    return f"{prefix}/{DEVICES_LEVEL}/+/{kind or '+'}"


def device_topic_filters(prefix: str, kind: TopicKind, *,
                         legacy_v1: bool = False) -> tuple[str, ...]:
    """What a collector subscribes to for `kind`: the current layout, and with
    `legacy_v1` the certmon/v1 one as well (`certmon/v1/+/<kind>`)."""
    current = device_topic_filter(prefix, kind)
    return (current, f"{LEGACY_V1_PREFIX}/+/{kind}") if legacy_v1 else (current,)


def parse_device_topic(prefix: str, topic: str, *,
                       legacy_v1: bool = False) -> tuple[str, TopicKind] | None:
    """(device_id, kind) of a per-device topic `<prefix>/devices/<dev>/<kind>` — and,
    with `legacy_v1`, of a v1 one, `certmon/v1/<dev>/<kind>` — or None for anything
    else (fleet, alerts and collector topics, bad ids, unknown kinds)."""
    parsed = _parse_below(f"{prefix}/{DEVICES_LEVEL}/", topic)
    if parsed is None and legacy_v1:
        parsed = _parse_below(f"{LEGACY_V1_PREFIX}/", topic)
    return parsed


def _parse_below(head: str, topic: str) -> tuple[str, TopicKind] | None:
    if not topic.startswith(head):
        return None
    device_id, sep, kind = topic[len(head):].partition("/")
    if not sep or kind not in TopicKind.__members__.values():
        return None
    if validate_device_id(device_id) is not None:
        return None
    return device_id, TopicKind(kind)


# --------------------------------------------------------------------------- online

# Retained on the online topic. The broker publishes the offline payload as the
# agent's last will; the agent publishes it itself on a clean shutdown.
_ONLINE_PAYLOADS = {True: b'{"online":true}', False: b'{"online":false}'}


def online_payload(online: bool) -> bytes:
    return _ONLINE_PAYLOADS[online]


def parse_online(payload: bytes) -> bool:
    """The state an online-topic payload announces; ProtocolError for anything else."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("not_json", f"online payload is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("online"), bool):
        raise ProtocolError("bad_schema", 'online payload must be {"online": true|false}')
    online: bool = data["online"]
    return online
