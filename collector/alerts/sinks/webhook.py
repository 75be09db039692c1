"""The webhook sink: Alertmanager-compatible `POST /api/v2/alerts` with stdlib urllib.

Body: a JSON array of {labels, annotations, startsAt, endsAt, generatorURL}, the
format Alertmanager's API and most "Alertmanager webhook" receivers accept. A firing
alert's endsAt is its `expires_at` (two renotify intervals): Alertmanager resolves an
alert whose endsAt has passed, so a lost resolution or a dead collector does not
leave it firing forever — and a firing alert without endsAt would be resolved by
Alertmanager after its resolve_timeout (5 min), long before our next re-notify.

Must not follow redirects (a POST is not safely re-sent elsewhere, and a redirect
to another host would leak the alert) and must not put the URL in errors or logs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from email.message import Message
from typing import IO, Any
from urllib.parse import urlsplit

from certmon.wire import format_instant
from collector.alerts import AlertSinkError, Notification


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                         msg: str, headers: Message, newurl: str) -> None:
        return None  # urllib then raises HTTPError for the 3xx


def alertmanager_alerts(n: Notification) -> list[dict[str, Any]]:
    """The Alertmanager v2 representation; a severity change also ends the old label
    set, since Alertmanager identifies alerts by labels."""
    def one(labels: dict[str, str], ends_at: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"labels": labels, "annotations": n.annotations,
                               "startsAt": format_instant(n.starts_at), "endsAt": ends_at}
        if n.generator_url:
            doc["generatorURL"] = n.generator_url
        return doc

    if n.status == "resolved":
        return [one(dict(n.labels), format_instant(n.ends_at or n.at))]
    out = []
    if n.replaces_labels is not None:
        out.append(one(dict(n.replaces_labels), format_instant(n.at)))
    out.append(one(dict(n.labels), format_instant(n.expires_at or n.at)))
    return out


class WebhookSink:
    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook URL must be http:// or https:// with a host")
        self._url = url
        self._host = parts.hostname
        self._timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirect())

    def send(self, notification: Notification) -> None:
        body = json.dumps(alertmanager_alerts(notification), separators=(",", ":"),
                          ensure_ascii=False).encode()
        req = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self._url, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "certmon"})
        try:
            with self._opener.open(req, timeout=self._timeout_s) as resp:
                status = resp.status
                resp.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            raise AlertSinkError(f"webhook {self._host}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AlertSinkError(f"webhook {self._host}: {reason}") from None
        if not 200 <= status < 300:
            raise AlertSinkError(f"webhook {self._host}: HTTP {status}")
