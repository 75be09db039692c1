"""The apprise sink: notification services (mail, Telegram, Slack, ntfy …) by URL.

Owns the title/body wording and the translation of apprise's boolean failure into
an exception. apprise is in the `collector` extra and imported on first use, so
installs without it can run the other sinks. Must not log the URLs (they carry tokens).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from collector.alerts import AlertSinkError, Notification


def title_of(n: Notification) -> str:
    state = "RESOLVED" if n.status == "resolved" else n.severity.name
    return f"[certmon {state}] {n.rule} on {n.device_id or 'fleet'}"


def body_of(n: Notification) -> str:
    lines = [n.summary, ""]
    if n.reason == "severity":
        lines.append("Severity changed.")
    lines.append(f"Category: {n.category}")
    lines.append(f"Since: {n.starts_at.isoformat()}")
    if n.ends_at is not None:
        lines.append(f"Resolved: {n.ends_at.isoformat()}")
    if n.generator_url:
        lines.append(n.generator_url)
    return "\n".join(lines)


class AppriseSink:
    def __init__(self, urls: Sequence[str]) -> None:
        # apprise 2.x imports the deprecated stdlib `imghdr` while it loads its plugins
        # (on the first add()); that DeprecationWarning is apprise's, not ours, and under
        # `-W error` it would abort the collector's start. catch_warnings is process-
        # wide, which is fine here: sinks are built once, at start, before any thread.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*imghdr", category=DeprecationWarning)
            import apprise  # optional (the `collector` extra): imported on use

            self._apprise: Any = apprise
            self._app = apprise.Apprise()
            for i, url in enumerate(urls, 1):
                if not self._app.add(url):
                    raise ValueError(f"apprise URL #{i} is not understood by apprise")

    def send(self, notification: Notification) -> None:
        n = notification
        t = self._apprise.NotifyType
        kind = (t.SUCCESS if n.status == "resolved"
                else t.FAILURE if n.severity >= n.severity.CRITICAL else t.WARNING)
        if not self._app.notify(title=title_of(n), body=body_of(n), notify_type=kind):
            raise AlertSinkError(f"apprise: {title_of(n)}: not delivered")
