"""Alerts: rules over findings and fleet facts, a firing → resolved lifecycle, sinks.

- `rules` (pure): findings and store-derived facts → `AlertCandidate`s.
- `engine`: candidates → atomic store transitions → `Notification`s, dispatched off
  the ingest path to the human channels (`delivery`) and the Alertmanager feeds
  (`feed`), and the Alertmanager resend cycle.
- `delivery`: one worker thread per human channel (log, MQTT, apprise): a bounded
  schedule of notifications, each retried on its own with backoff.
- `feed`: one worker thread per Alertmanager receiver: the active set, re-posted in
  one batch every resend interval, resolutions until delivered.
- `sinks/`: one module per delivery channel, registered in `sinks.SINKS` / `FEEDS`.
- `driver`: when each rule family runs (the collector's device listener and jobs).

This package module owns only the values that cross the engine → sink seam
(`Notification`, `AlertmanagerAlert`) and the sinks' error types, so that sink modules
can import them without importing the engine or the registry. It must not import
paho or apprise.
See docs/alerts.md for the rules, the scoping design and the delivery guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from certmon.errors import CertmonError
from certmon.pki import Severity

__all__ = ["AlertSinkError", "AlertmanagerAlert", "Notification", "ReceiverRejected"]


class AlertSinkError(CertmonError):
    """A sink could not deliver (HTTP status, apprise failure …). The message never
    carries the sink's URL: webhook and apprise URLs often embed tokens."""


class ReceiverRejected(AlertSinkError):
    """The receiver refused the *content* of a batch (HTTP 400, 413, 422), not the
    connection: one bad alert may be the cause, so the feed splits the batch to find
    it instead of holding back every other alert."""


@dataclass(frozen=True, slots=True)
class Notification:
    """One thing to tell the humans: an alert started/repeats/changed, or it resolved.

    `at` is the instant of the store transition that claimed this notification.
    `replaces_labels` is set when the severity changed: receivers that identify an
    alert by its labels (Alertmanager) must end the old label set. How long a firing
    claim stands at Alertmanager (`endsAt`) is the feed's business: it re-posts every
    active alert each resend interval with `endsAt` a few intervals ahead.
    """

    status: Literal["firing", "resolved"]
    reason: Literal["new", "repeat", "severity", "resolved"]
    key: str
    rule: str
    device_id: str | None
    cert_sha256: str | None
    severity: Severity
    category: str
    summary: str
    labels: Mapping[str, str]
    starts_at: datetime
    at: datetime
    ends_at: datetime | None = None  # resolved only: when it resolved
    replaces_labels: Mapping[str, str] | None = None
    generator_url: str | None = None

    @property
    def annotations(self) -> dict[str, str]:
        return {"summary": self.summary}


@dataclass(frozen=True, slots=True)
class AlertmanagerAlert:
    """One element of an Alertmanager `POST /api/v2/alerts` body. `ends_at` in the
    future: firing until then unless refreshed; in the past (or now): resolved."""

    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: datetime
    ends_at: datetime
    generator_url: str | None = None
