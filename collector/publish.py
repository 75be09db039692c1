"""What the collector publishes, and how: QoS 1 that never raises, signed payloads, and
the retained per-device fleet views.

Owns the `Publisher` (every publish of the collector goes through it, so every payload
carries the collector's signature, certmon.fleetsig, where MQTT v5 can carry it) and
`FleetTopics` (the retained `fleet/devices/<id>` views, published when a device's
state changed). Must not subscribe, read the store or decide alerts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime

from certmon import pki
from certmon import wire as p
from certmon.errors import TransportError
from certmon.fleetsig import FleetSigner
from certmon.mqtt import MqttLink
from certmon.mqttproc import ProcessLink

from . import aggregate
from .effects import Stored

log = logging.getLogger("certmon.collector")


class Publisher:
    """QoS 1 publishes on the link that never raise: what the collector publishes
    (beacon, fleet topics, alert messages) is re-published later anyway, so a
    disconnected link drops it (logged at debug) instead of failing the caller.
    With a signer, each payload carries the collector's signature (certmon.fleetsig)
    as a user property, for consumers that cannot rely on the broker's ACL — except
    on an MQTT 3.1.1 link (`mqtt.protocol = "v311"`), which has no properties to
    carry it: there nothing is signed (docs/protocol.md)."""

    def __init__(self, link: MqttLink | ProcessLink, signer: FleetSigner | None = None) -> None:
        self._link = link
        # A signature per publish that the link would drop unsent is pure cost.
        self._signer = signer if link.settings.protocol == "v5" else None

    def __call__(self, topic: str, payload: bytes, retain: bool = False) -> None:
        props = self._signer.user_properties(topic, payload) if (
            self._signer is not None and payload) else ()  # b"": clearing a retained topic
        try:
            self._link.publish(topic, payload, qos=1, retain=retain, user_properties=props)
        except TransportError as exc:
            log.debug("not published to %s: %s", topic, exc)


class FleetTopics:
    """The retained `fleet/device/<id>` views dashboards subscribe to."""

    def __init__(self, publish: Publisher, prefix: str) -> None:
        self._publish = publish
        self._prefix = prefix
        self._published: dict[str, tuple[object, ...]] = {}

    def on_stored(self, stored: Sequence[Stored]) -> None:
        for item in stored:
            record = item.record
            # Published only when the device's state changed: the common case (nothing
            # changed) must cost one tuple comparison, not a JSON document.
            key = (record.severity, record.worst_code, tuple(f.code for f in record.findings))
            if self._published.get(record.device_id) == key:
                continue
            self._published[record.device_id] = key
            state = aggregate.device_state(record.severity, record.worst_code, online=True)
            view = {"device_id": record.device_id, "state": str(state),
                    "severity": pki.Severity(record.severity).name,
                    "worst": record.worst_code, "seq": record.seq,
                    "ts": p.format_instant(record.device_ts),
                    "received_at": p.format_instant(record.received_at),
                    "findings": [f.code for f in record.findings],
                    "clock_offset_lo_s": record.clock_offset_lo_s,
                    "clock_offset_hi_s": record.clock_offset_hi_s}
            self._publish(p.fleet_device_topic(self._prefix, record.device_id),
                          json.dumps(view, sort_keys=True).encode(), retain=True)

    def on_online(self, device_id: str, online: bool, at: datetime) -> None:
        self._published.pop(device_id, None)  # the next status republishes the view
