"""The settings both roles share: the expiry policy and the MQTT broker URL rules.

Owns `PolicyConfig` (names match `certmon.pki.Policy`), the broker URL checks
(`check_mqtt_url`, the scheme rule `url_problem`), `broker_endpoint` and the
`BrokerEndpoint` mixin. The device-id and topic rules are not here: they are the
wire contract's (`certmon.wire.topics`, their one home).
Must not: read files or touch the network (a URL is checked as text, never resolved).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

from .schema import schema, setting

__all__ = ["BrokerEndpoint", "PolicyConfig", "broker_endpoint", "check_mqtt_url", "url_problem"]


def broker_endpoint(url: str) -> tuple[str, int, bool]:
    """(host, port, is_tls) of a checked mqtt:// or mqtts:// URL; ports default to 1883/8883."""
    parts = urllib.parse.urlsplit(url)
    is_tls = parts.scheme == "mqtts"
    return parts.hostname or "", parts.port or (8883 if is_tls else 1883), is_tls


def check_mqtt_url(url: str) -> str | None:
    """Host and port part of the broker URL rule (the scheme is checked by `schemes`)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on "host:99999" or "host:x")
    except ValueError as exc:
        return f"invalid URL: {exc}"
    if not parts.hostname:
        return "has no host (e.g. mqtts://broker.example.net:8883)"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be scheme://host[:port] with no path"
    return None


def url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    """The `schemes=` rule of `setting`: a URL with one of these schemes."""
    use = " or ".join(f"{s}://" for s in schemes)
    scheme = urllib.parse.urlsplit(url).scheme if "://" in url else ""
    if not scheme:
        return f"not a URL (use {use})"
    if scheme not in schemes:
        return f"unsupported scheme {scheme!r} (use {use})"
    return None


class BrokerEndpoint:
    """For a schema with a `broker` URL: its host, port and whether it is TLS."""

    __slots__ = ()
    broker: str

    @property
    def host(self) -> str:
        return broker_endpoint(self.broker)[0]

    @property
    def port(self) -> int:
        return broker_endpoint(self.broker)[1]

    @property
    def is_tls(self) -> bool:
        return broker_endpoint(self.broker)[2]


@schema
class PolicyConfig:
    """Expiry thresholds; names match `certmon.pki.Policy` (`Policy(**asdict(cfg))`)."""

    warn_days: float = setting(default=30.0, ge=0, doc="Warn when a certificate expires "
                               "within this many days.")
    crit_days: float = setting(default=7.0, ge=0, doc="Critical within this many days.")
    warn_fraction: float = setting(default=0.0, ge=0, le=1, doc="Also warn when less than "
                                   "this fraction of the lifetime remains (0 = off); "
                                   "the stricter rule wins.")
    crit_fraction: float = setting(default=0.0, ge=0, le=1,
                                   doc="Critical below this fraction of the lifetime (0 = off).")
    ca_horizon_days: float = setting(default=90.0, ge=0, doc="Report trust-store CAs "
                                     "expiring within this many days.")
    min_rsa_bits: int = setting(default=2048, ge=1024, doc="Smaller RSA keys are weak.")
    min_ec_bits: int = setting(default=256, ge=160, doc="Smaller EC keys are weak.")

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if self.crit_days > self.warn_days:
            yield "crit_days", f"must not exceed warn_days ({self.warn_days:g})"
        if self.crit_fraction > self.warn_fraction > 0:
            yield "crit_fraction", f"must not exceed warn_fraction ({self.warn_fraction:g})"
