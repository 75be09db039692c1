"""Alert sinks: the `Sink` seam, the registry of sink kinds, and `build_sinks`.

One module per delivery channel; each sink's `send` formats one `Notification` for
its channel and raises on failure. Retries, queues and threads belong to the engine,
so a sink is a plain blocking call that is easy to test against a real peer. Sinks
must not touch the store or decide whether to notify.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from collector.alerts import Notification
from collector.alerts.sinks.apprise import AppriseSink
from collector.alerts.sinks.log import LogSink
from collector.alerts.sinks.mqtt import MqttSink, Publish
from collector.alerts.sinks.webhook import WebhookSink
from collector.config import AlertsConfig

__all__ = ["SINKS", "AppriseSink", "LogSink", "MqttSink", "Publish", "Sink", "WebhookSink",
           "build_sinks"]


class Sink(Protocol):
    def send(self, notification: Notification) -> None:
        """Deliver one notification or raise (any exception counts as a failed attempt)."""


# A literal registry, not discovery by name: adding a channel is one module and one line.
SINKS: dict[str, Callable[..., Sink]] = {
    "log": LogSink,
    "mqtt": MqttSink,
    "webhook": WebhookSink,
    "apprise": AppriseSink,
}


def build_sinks(alerts: AlertsConfig, *, topic_prefix: str,
                publish: Publish | None = None) -> dict[str, Sink]:
    """The sinks `[alerts]` asks for, by metric-friendly name ("webhook-1" …): the log
    always; MQTT when enabled and a broker link is given; one sink per URL, so one
    dead receiver does not make the others retry. Names never contain the URL:
    webhook and apprise URLs often embed tokens, and names end up in metrics."""
    sinks: dict[str, Sink] = {"log": SINKS["log"]()}
    if alerts.mqtt_topic_enabled and publish is not None:
        sinks["mqtt"] = SINKS["mqtt"](publish, topic_prefix)
    for i, url in enumerate(alerts.webhook_urls, 1):
        sinks[f"webhook-{i}"] = SINKS["webhook"](url)
    for i, url in enumerate(alerts.apprise_urls, 1):
        sinks[f"apprise-{i}"] = SINKS["apprise"]([url])
    return sinks
