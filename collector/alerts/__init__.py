"""Alerts: rules over findings and fleet facts, a firing → resolved lifecycle, sinks.

- `rules` (pure): findings and store-derived facts → `AlertCandidate`s.
- `engine`: candidates → atomic store transitions → `Notification`s, dispatched to
  sinks off the ingest path (bounded queue and one worker thread per sink).
- `sinks/`: one module per delivery channel, registered in `sinks.SINKS`.
- `driver`: when each rule family runs (the collector's device listener and jobs).

This package module owns only the value that crosses the engine → sink seam
(`Notification`) and the sinks' error type, so that sink modules can import them
without importing the engine or the registry. It must not import paho or apprise.
See docs/alerts.md for the rules, the scoping design and the delivery guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from certmon.errors import CertmonError
from certmon.pki import Severity

__all__ = ["AlertSinkError", "Notification"]


class AlertSinkError(CertmonError):
    """A sink could not deliver (HTTP status, apprise failure …). The message never
    carries the sink's URL: webhook and apprise URLs often embed tokens."""


@dataclass(frozen=True, slots=True)
class Notification:
    """One thing to tell the humans: an alert started/repeats/changed, or it resolved.

    `at` is the instant of the store transition that claimed this notification.
    `expires_at` (firing only) is how long this claim stands without a refresh: the
    engine sets it to two renotify intervals, so a receiver such as Alertmanager
    resolves an alert by itself if every later notification is lost (collector gone).
    `replaces_labels` is set when the severity changed: receivers that identify an
    alert by its labels (Alertmanager) must end the old label set.
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
    expires_at: datetime | None = None  # firing only
    replaces_labels: Mapping[str, str] | None = None
    generator_url: str | None = None

    @property
    def annotations(self) -> dict[str, str]:
        return {"summary": self.summary}
