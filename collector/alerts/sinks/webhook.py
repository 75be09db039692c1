"""The webhook sink: Alertmanager-compatible `POST /api/v2/alerts` with stdlib urllib.

Owns the body and the HTTP exchange: a JSON array of {labels, annotations, startsAt,
endsAt, generatorURL}, the format Alertmanager's API and most "Alertmanager webhook"
receivers accept, one POST per batch. What goes into a batch, and when (the whole
active set every resend interval, `endsAt` a few intervals ahead), is the feed's
(`collector.alerts.feed`); this module only says whether the receiver took it:
HTTP 400/413/422 raise `ReceiverRejected` (the content; the feed splits the batch),
anything else that is not 2xx raises `AlertSinkError`.

Must not follow redirects (a POST is not safely re-sent elsewhere, and a redirect
to another host would leak the alert) and must not put the URL in errors or logs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from email.message import Message
from typing import IO, Any
from urllib.parse import urlsplit

from certmon.wire import format_instant
from collector.alerts import AlertmanagerAlert, AlertSinkError, ReceiverRejected

# Statuses that refuse what was sent rather than the sending: 400 (Alertmanager: an
# invalid alert, e.g. "start time must be before end time"), 413, 422.
CONTENT_REFUSED = frozenset({400, 413, 422})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                         msg: str, headers: Message, newurl: str) -> None:
        return None  # urllib then raises HTTPError for the 3xx


def alertmanager_body(alerts: Sequence[AlertmanagerAlert]) -> bytes:
    """The Alertmanager v2 `postableAlerts` JSON array."""
    docs: list[dict[str, Any]] = []
    for a in alerts:
        doc: dict[str, Any] = {"labels": dict(a.labels), "annotations": dict(a.annotations),
                               "startsAt": format_instant(a.starts_at),
                               "endsAt": format_instant(a.ends_at)}
        if a.generator_url:
            doc["generatorURL"] = a.generator_url
        docs.append(doc)
    return json.dumps(docs, separators=(",", ":"), ensure_ascii=False).encode()


class WebhookSink:
    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook URL must be http:// or https:// with a host")
        self._url = url
        self._host = parts.hostname
        self._timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirect())

    def post_alerts(self, alerts: Sequence[AlertmanagerAlert]) -> None:
        req = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self._url, data=alertmanager_body(alerts), method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "certmon"})
        try:
            with self._opener.open(req, timeout=self._timeout_s) as resp:
                status = resp.status
                resp.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            error = ReceiverRejected if exc.code in CONTENT_REFUSED else AlertSinkError
            raise error(f"webhook {self._host}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AlertSinkError(f"webhook {self._host}: {reason}") from None
        except Exception as exc:  # noqa: BLE001 - re-raised as ours, without the message
            # http.client's InvalidURL / HTTPException quote the path and query, where
            # receivers' tokens live: the class name only, never the message.
            raise AlertSinkError(f"webhook {self._host}: {type(exc).__name__}") from None
        if not 200 <= status < 300:
            raise AlertSinkError(f"webhook {self._host}: HTTP {status}")
