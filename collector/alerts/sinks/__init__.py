"""Alert sinks: the `Sink` and `AlertmanagerSink` seams, the registries, `build_sinks`.

One module per delivery channel. A human channel's `send` formats one `Notification`
and raises on failure; an Alertmanager receiver's `post_alerts` posts one batch of
the active set and raises on failure. Retries, queues, batching and threads belong
to the engine's workers (`delivery`, `feed`), so a sink is a plain blocking call that
is easy to test against a real peer. Sinks must not touch the store or decide
whether or when to notify.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from collector.alerts import AlertmanagerAlert, Notification
from collector.alerts.sinks.apprise import AppriseSink
from collector.alerts.sinks.log import LogSink
from collector.alerts.sinks.mqtt import MqttSink, Publish
from collector.alerts.sinks.webhook import WebhookSink
from collector.config import AlertsConfig

__all__ = ["FEEDS", "SINKS", "AlertmanagerSink", "AppriseSink", "LogSink", "MqttSink",
           "Publish", "Sink", "Sinks", "WebhookSink", "build_sinks"]


class Sink(Protocol):
    def send(self, notification: Notification) -> None:
        """Deliver one notification or raise (any exception counts as a failed attempt)."""


class AlertmanagerSink(Protocol):
    def post_alerts(self, alerts: Sequence[AlertmanagerAlert]) -> None:
        """Post one batch or raise; `ReceiverRejected` when the content was refused."""


# Literal registries, not discovery by name: adding a channel is one module and one line.
# Human channels get notifications at the renotify interval ...
SINKS: dict[str, Callable[..., Sink]] = {
    "log": LogSink,
    "mqtt": MqttSink,
    "apprise": AppriseSink,
}
# ... Alertmanager receivers get the whole active set every resend interval.
FEEDS: dict[str, Callable[..., AlertmanagerSink]] = {
    "webhook": WebhookSink,
}


@dataclass(frozen=True, slots=True)
class Sinks:
    notify: Mapping[str, Sink]  # human channels, by name
    alertmanager: Mapping[str, AlertmanagerSink]  # Alertmanager receivers, by name


def build_sinks(alerts: AlertsConfig, *, topic_prefix: str,
                publish: Publish | None = None) -> Sinks:
    """The sinks `[alerts]` asks for, by metric-friendly name ("webhook-1" …): the log
    always; MQTT when enabled and a broker link is given; one sink per URL, so one
    dead receiver does not make the others retry. Names never contain the URL:
    webhook and apprise URLs often embed tokens, and names end up in metrics."""
    notify: dict[str, Sink] = {"log": SINKS["log"]()}
    if alerts.mqtt_topic_enabled and publish is not None:
        notify["mqtt"] = SINKS["mqtt"](publish, topic_prefix)
    for i, url in enumerate(alerts.apprise_urls, 1):
        notify[f"apprise-{i}"] = SINKS["apprise"]([url])
    receivers = {f"webhook-{i}": FEEDS["webhook"](url)
                 for i, url in enumerate(alerts.webhook_urls, 1)}
    return Sinks(notify, receivers)
