"""The collector's web face: dashboard, JSON API and Prometheus /metrics.

`start_web(store, listen, process=..., trust_requirements=...)` serves all three from
one waitress thread (collector.web.app); the views are in collector.web.api, the
exposition in collector.web.metrics, the page in static/ (no build step, no external
assets). docs/dashboard.md documents the API; docs/metrics.md every metric. This
package must not import the collector service: the composition root
(collector.wiring) hands it what it reads.
"""

from __future__ import annotations

from .api import BadRequest, FleetApi, TrustRequirementView
from .app import WebApp, WebError, WebServer, start_web
from .metrics import ProcessCounters

__all__ = ["BadRequest", "FleetApi", "ProcessCounters", "TrustRequirementView", "WebApp",
           "WebError", "WebServer", "start_web"]
