"""The MQTT sink: each alert as a retained JSON message on its own topic.

Topic: `<prefix>/alerts/<device or "fleet">/<rule>`, plus `/<cert ref>` when the
alert is about a certificate (one device may have CA_EXPIRING for two CAs, and
clearing one must not clear the other). Retained while firing, so a dashboard that
subscribes to `<prefix>/alerts/#` sees every firing alert at once; resolving
publishes an empty retained payload, which deletes the retained message.

Publishes through an injected callable (the collector's `certmon.mqtt` link); must
not import paho (DESIGN §2: `certmon.mqtt` is its only importer).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from certmon.wire import alerts_topic, cert_ref, format_instant
from collector.alerts import Notification
from collector.alerts.rules import FLEET

# publish(topic, payload, retain); raises (e.g. TransportError) when it cannot.
Publish = Callable[[str, bytes, bool], None]


def alert_topic(prefix: str, n: Notification) -> str:
    dev = alerts_topic(prefix, n.device_id) if n.device_id else f"{alerts_topic(prefix)}/{FLEET}"
    topic = f"{dev}/{n.rule}"
    return f"{topic}/{cert_ref(n.cert_sha256)}" if n.cert_sha256 else topic


def alert_payload(n: Notification) -> bytes:
    doc: dict[str, Any] = {
        "status": n.status, "rule": n.rule, "device": n.device_id or FLEET,
        "severity": n.severity.name.lower(), "category": n.category, "key": n.key,
        "cert": n.cert_sha256, "summary": n.summary, "labels": dict(n.labels),
        "startsAt": format_instant(n.starts_at), "at": format_instant(n.at),
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False).encode()


class MqttSink:
    def __init__(self, publish: Publish, prefix: str) -> None:
        self._publish = publish
        self._prefix = prefix

    def send(self, notification: Notification) -> None:
        topic = alert_topic(self._prefix, notification)
        if notification.status == "firing":
            self._publish(topic, alert_payload(notification), True)
        else:
            self._publish(topic, b"", True)  # an empty retained message clears it
