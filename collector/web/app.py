"""The HTTP side: a small WSGI app (routes in one literal dict) and its server thread.

Owns routing, basic auth, response headers, static files and the waitress server's
lifecycle (`start_web` → `WebServer.stop`). What a route returns is `api.FleetApi`'s
business; what /metrics says is `metrics.FleetCollector`'s. No framework: nine
routes do not need one, and `wsgiref.util` plus a dict stays readable.
"""

from __future__ import annotations

import base64
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
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import parse_qsl

from certmon import pki
from certmon.clock import SystemClock
from certmon.errors import CertmonError, ConfigError
from collector.store import Store

from .api import JSON, BadRequest, FleetApi, TrustRequirementView
from .metrics import CONTENT_TYPE, CachedExposition, FleetCollector

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from collector.config import TrustRequirement

log = logging.getLogger("certmon.collector.web")

STATIC = ("index.html", "app.js", "style.css")
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


class _ServiceLike(Protocol):
    """What start_web uses of a CollectorService (duck-typed: no import cycle)."""

    store: Store

    @property
    def ingestor(self) -> Any: ...

    @property
    def config(self) -> Any: ...


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
        self.metrics = CachedExposition(metrics)
        self._auth = None if basic_auth is None else (
            b"Basic " + base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()))
        self.routes: dict[str, Callable[[Request], Response]] = {
            "/": lambda r: self._static("index.html"),
            "/app.js": lambda r: self._static("app.js"),
            "/style.css": lambda r: self._static("style.css"),
            "/favicon.ico": lambda r: ("204 No Content", [], b""),
            "/healthz": lambda r: ("200 OK", [("Content-Type", "text/plain")], b"ok\n"),
            "/metrics": lambda r: ("200 OK", [("Content-Type", CONTENT_TYPE)], self.metrics()),
            "/api/summary": lambda r: _json(self.api.summary()),
            "/api/devices": lambda r: _json(self.api.devices(r.params)),
            "/api/timeline": lambda r: _json(self.api.timeline(r.params)),
            "/api/cas": lambda r: _json(self.api.cas()),
            "/api/brokers": lambda r: _json(self.api.brokers()),
            "/api/clock": lambda r: _json(self.api.clock()),
            "/api/alerts": lambda r: _json(self.api.alerts(r.params)),
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
        except Exception:
            log.exception("web request %s failed", path[:200])
            return _error("500 Internal Server Error", "internal error (see collector log)")

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


def resolve_requirements(reqs: Sequence[TrustRequirement | TrustRequirementView]
                         ) -> list[TrustRequirementView]:
    """Config entries → fingerprints; a ca_file is read once here, at start."""
    out = []
    for r in reqs:
        if isinstance(r, TrustRequirementView):
            out.append(r)
            continue
        sha = r.sha256
        if sha is None and r.ca_file is not None:
            bundle = pki.read_bundle(r.ca_file)
            if not bundle.certs:
                raise ConfigError(f"trust_requirements {r.name!r}: {r.ca_file} holds no "
                                  "certificate")
            sha = bundle.certs[0].facts.sha256
        if sha is not None:
            out.append(TrustRequirementView(r.name, sha.lower(), r.status))
    return out


class WebServer:
    """A running waitress server on its own thread."""

    def __init__(self, app: WebApp, sock: socket.socket, threads: int) -> None:
        # waitress ships no type hints (no py.typed); the server object is used as Any.
        from waitress.server import create_server  # type: ignore[import-untyped]

        self.app = app
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        # clear_untrusted_proxy_headers: no proxy is trusted, so X-Forwarded-* is dropped.
        self._server: Any = create_server(app, sockets=[sock], threads=threads,
                                          ident="certmon", clear_untrusted_proxy_headers=True)
        self._stopped = False
        self._thread = threading.Thread(target=self._server.run, name="certmon-web",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._stopped:  # idempotent: the service's close and its owner may both call
            return
        self._stopped = True
        server = self._server

        def close_all() -> None:  # runs on the server's own loop thread: no fd races
            for channel in list(server._map.values()):
                channel.close()  # the listener, open connections and this trigger

        server.trigger.pull_trigger(close_all)
        self._thread.join(timeout_s)
        server.task_dispatcher.shutdown(timeout=timeout_s)


def start_web(service_or_store: _ServiceLike | Store, listen: str = "127.0.0.1:9310", *,
              basic_auth: tuple[str, str] | None = None,
              rejected_counts: Callable[[], Mapping[str, int]] | None = None,
              ingest_counts: Callable[[], Mapping[str, int]] | None = None,
              trust_requirements: Sequence[TrustRequirement | TrustRequirementView] | None = None,
              now: Callable[[], datetime] | None = None, snapshot_ttl_s: float = 10.0,
              threads: int = 4) -> WebServer:
    """Serve the dashboard, JSON API and /metrics. Given a CollectorService, the store,
    ingest counters and trust requirements come from it unless passed explicitly."""
    if hasattr(service_or_store, "ingestor"):
        service = cast(_ServiceLike, service_or_store)
        store = service.store
        ingestor = service.ingestor
        rejected_counts = rejected_counts or (lambda: dict(ingestor.rejected))
        ingest_counts = ingest_counts or (lambda: {
            "accepted": ingestor.accepted, "duplicate": ingestor.duplicates,
            "rejected": sum(ingestor.rejected.values())})
        if trust_requirements is None:
            trust_requirements = service.config.trust_requirements
    else:
        store = service_or_store
    api = FleetApi(store, now=now or SystemClock().now,
                   trust_requirements=resolve_requirements(trust_requirements or ()),
                   snapshot_ttl_s=snapshot_ttl_s)
    collector = FleetCollector(api, ingest_counts=ingest_counts, rejected_counts=rejected_counts)
    app = WebApp(api, collector, basic_auth)
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
