"""The log sink: one line per notification through `logging` (journald under systemd).

Owns only the line's wording and level. Must not raise for formatting reasons: the
log is the sink of last resort when every other channel is down.
"""

from __future__ import annotations

import logging

from collector.alerts import Notification

DEFAULT_LOGGER = "certmon.alerts"


class LogSink:
    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger(DEFAULT_LOGGER)

    def send(self, notification: Notification) -> None:
        n = notification
        level = logging.WARNING if n.status == "firing" else logging.INFO
        # key=value tail so `journalctl -g 'rule=CERT_EXPIRED'` finds them.
        self._log.log(level, "alert %s (%s) %s: %s [rule=%s device=%s severity=%s key=%s]",
                      n.status.upper(), n.reason, n.rule, n.summary, n.rule,
                      n.device_id or "fleet", n.severity.name.lower(), n.key)
