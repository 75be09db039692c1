"""The collector's web face: dashboard, JSON API and Prometheus /metrics.

`start_web(service_or_store, listen)` serves all three from one waitress thread
(collector.web.app); the views are in collector.web.api, the exposition in
collector.web.metrics, the page in static/ (no build step, no external assets).
docs/dashboard.md documents the API; docs/metrics.md every metric.
"""

from __future__ import annotations

from .api import BadRequest, FleetApi, TrustRequirementView
from .app import WebApp, WebError, WebServer, start_web

__all__ = ["BadRequest", "FleetApi", "TrustRequirementView", "WebApp", "WebError", "WebServer",
           "start_web"]
