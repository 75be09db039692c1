"""The HTTP side: a small WSGI app (routes in one literal dict) and its server thread.

Owns routing, basic auth, response headers, static files and the waitress server's
lifecycle (`start_web` → `WebServer.stop`). What a route returns is `api.FleetApi`'s
business; what /metrics says is `metrics.FleetCollector`'s. No framework: a dozen
routes do not need one, and `wsgiref.util` plus a dict stays readable. Must not know
the collector service: it is handed a store, resolved trust requirements and,
when a collector runs, its `ProcessCounters`.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import mimetypes
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from certmon.clock import SystemClock
from certmon.errors import CertmonError
from collector.store import Store, StoreError
from collector.trust import RequiredCA

from .api import BadRequest, FleetApi
from .fleet import JSON
from .metrics import CONTENT_TYPE, FleetCollector, PerDevice, ProcessCounters

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger("certmon.collector.web")

STATIC = ("index.html", "app.js", "style.css")
METRICS_VIEW = "metrics"  # the /metrics body's key among a snapshot's memoised views
# Same-origin everything: the page has no inline script or style and no external
# asset, so a strict policy costs nothing and blunts an injected device id.
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
     "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
]


class WebError(CertmonError):
    """The web server could not start (address in use, bad listen address)."""


Response = tuple[str, list[tuple[str, str]], bytes]


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    params: Mapping[str, str]


def _json(body: JSON | None, status: str = "200 OK") -> Response:
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return status, [("Content-Type", "application/json; charset=utf-8"),
                    ("Cache-Control", "no-store")], data


def _error(status: str, message: str) -> Response:
    return _json({"error": message}, status)


class WebApp:
    """The WSGI callable. Routes: exact paths in `routes`, one prefix for devices."""

    def __init__(self, api: FleetApi, metrics: FleetCollector,
                 basic_auth: tuple[str, str] | None = None) -> None:
        self.api = api
        self.metrics = metrics
        self._auth = None if basic_auth is None else (
            b"Basic " + base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()))
        self.routes: dict[str, Callable[[Request], Response]] = {
            "/": lambda r: self._static("index.html"),
            "/app.js": lambda r: self._static("app.js"),
            "/style.css": lambda r: self._static("style.css"),
            "/favicon.ico": lambda r: ("204 No Content", [], b""),
            "/healthz": lambda r: ("200 OK", [("Content-Type", "text/plain")], b"ok\n"),
            "/metrics": lambda r: ("200 OK", [("Content-Type", CONTENT_TYPE)],
                                   self._metrics()),
            "/api/summary": lambda r: _json(self.api.summary()),
            "/api/devices": lambda r: _json(self.api.devices(r.params)),
            "/api/timeline": lambda r: _json(self.api.timeline(r.params)),
            "/api/cas": lambda r: _json(self.api.cas()),
            "/api/brokers": lambda r: _json(self.api.brokers()),
            "/api/clock": lambda r: _json(self.api.clock()),
            "/api/alerts": lambda r: _json(self.api.alerts(r.params)),
            "/api/health": lambda r: _json(self._health()),
        }
        self._static_cache: dict[str, bytes] = {}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        status, headers, body = self.handle(environ)
        start_response(status, [*headers, *SECURITY_HEADERS,
                                ("Content-Length", str(len(body)))])
        return [body]

    def handle(self, environ: WSGIEnvironment) -> Response:
        # /healthz stays open: a load balancer's probe carries no credentials.
        path = environ.get("PATH_INFO") or "/"
        if self._auth is not None and path != "/healthz" and not self._authorised(environ):
            return ("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="certmon"'),
                                         ("Content-Type", "text/plain")], b"unauthorised\n")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _error("405 Method Not Allowed", "read-only API: GET only")
        params = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        request = Request(method, path, params)
        try:
            route = self.routes.get(path)
            if route is not None:
                return route(request)
            if path.startswith("/api/devices/"):
                # PATH_INFO is already percent-decoded by the server (PEP 3333).
                device = self.api.device(path[len("/api/devices/"):])
                return _error("404 Not Found", "no such device") if device is None else \
                    _json(device)
            return _error("404 Not Found", f"no route {path[:100]}")
        except BadRequest as exc:
            return _error("400 Bad Request", str(exc))
        except StoreError:
            # The store is down and this view has no snapshot to fall back on: say so
            # (the dashboard shows /api/health's banner), not a traceback per request.
            return _error("503 Service Unavailable", "the store is unavailable; see /api/health")
        except Exception:
            log.exception("web request %s failed", path[:200])
            return _error("500 Internal Server Error", "internal error (see collector log)")

    def _metrics(self) -> bytes:
        # The fleet once per snapshot: at 100k devices the exposition is ~650k samples
        # and seconds of prometheus_client formatting, too much per scrape; the
        # snapshot's background rebuild regenerates it before the swap (start_web's
        # extra_views). The process's few series are read on every scrape: during a
        # store outage no new snapshot comes, and store_up must still say 0.
        live = self.metrics.live_exposition()
        try:
            return self.api.memo(METRICS_VIEW, self.metrics.exposition) + live
        except StoreError:
            return live  # no snapshot yet and the store is down: what the process knows

    def _health(self) -> JSON:
        process = self.metrics.process
        if process is None:
            return self.api.health(None, None, None)
        return self.api.health(process.store_health(), process.backlog(),
                               process.broker_connected())

    def _authorised(self, environ: WSGIEnvironment) -> bool:
        given = str(environ.get("HTTP_AUTHORIZATION", "")).encode("latin-1", "replace")
        assert self._auth is not None
        return hmac.compare_digest(given, self._auth)  # constant time: no length oracle

    def _static(self, name: str) -> Response:
        body = self._static_cache.get(name)
        if body is None:
            body = files("collector.web").joinpath("static", name).read_bytes()
            self._static_cache[name] = body
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return "200 OK", [("Content-Type", f"{ctype}; charset=utf-8"),
                          ("Cache-Control", "no-cache")], body


# --------------------------------------------------------------------------- server


def parse_listen(listen: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", listen)
    if m is None:
        raise WebError(f"listen {listen!r}: expected host:port or [v6addr]:port")
    host, port = (m[1], m[2]) if m[1] else (m[3], m[4])
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebServer:
    """A running waitress server on its own thread."""

    def __init__(self, app: WebApp, sock: socket.socket, threads: int) -> None:
        # waitress ships no type hints (no py.typed); the server object is used as Any.
        from waitress.server import create_server  # type: ignore[import-untyped]

        self.app = app
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        # Our own socket map (create_server's `map`): every channel of this server, the
        # listener and open connections, so that stop() can close them all.
        self._channels: dict[int, Any] = {}
        # clear_untrusted_proxy_headers: no proxy is trusted, so X-Forwarded-* is dropped.
        self._server: Any = create_server(app, map=self._channels, sockets=[sock],
                                          threads=threads, ident="certmon",
                                          clear_untrusted_proxy_headers=True)
        self._stopped = False
        self._thread = threading.Thread(target=self._server.run, name="certmon-web",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._stopped:  # idempotent: the service's close and its owner may both call
            return
        self._stopped = True
        from waitress.wasyncore import close_all  # type: ignore[import-untyped]

        # On the server's own loop thread (no fd races): the loop ends once the map
        # is empty. waitress's server.close() would only close the listener.
        # OSError: the loop, already awake (a finished request pulls the trigger too),
        # ran the queued close between queueing and this wake-up write: done already.
        with contextlib.suppress(OSError):
            self._server.trigger.pull_trigger(lambda: close_all(self._channels))
        self._thread.join(timeout_s)
        self._server.task_dispatcher.shutdown(timeout=timeout_s)


def start_web(store: Store, listen: str = "127.0.0.1:9310", *,
              process: ProcessCounters | None = None,
              trust_requirements: Sequence[RequiredCA] = (),
              basic_auth: tuple[str, str] | None = None,
              now: Callable[[], datetime] | None = None, snapshot_ttl_s: float = 10.0,
              threads: int = 4, metrics_per_device: PerDevice = "at_risk",
              metrics_horizon_days: float = 30.0) -> WebServer:
    """Serve the dashboard, JSON API and /metrics over `store`. `process`: the running
    collector's counters and broker link (None: a store alone, e.g. tests and benches;
    /metrics then reports the store's persistent rejection totals). `metrics_per_device`
    and `metrics_horizon_days`: which devices get per-device series (web.metrics_per_device,
    "at risk" meaning expiring within policy.warn_days)."""
    metrics = FleetCollector(store, process, per_device=metrics_per_device,
                             horizon_days=metrics_horizon_days)
    api = FleetApi(store, now=now or SystemClock().now, trust_requirements=trust_requirements,
                   snapshot_ttl_s=snapshot_ttl_s, extra_views={METRICS_VIEW: metrics.exposition})
    app = WebApp(api, metrics, basic_auth)
    host, port = parse_listen(listen)
    if not is_loopback(host) and basic_auth is None:
        log.warning("web server on %s without basic auth: anyone who can reach it sees the "
                    "fleet (set [web] basic_auth_user and basic_auth_password_file)", listen)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise WebError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    server = WebServer(app, sock, threads)
    log.info("dashboard at %s/", server.url)
    return server
