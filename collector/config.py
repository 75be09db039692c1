"""The collector's configuration schema (/etc/certmon/collector.toml) and its loader.

Owns which keys the collector accepts, their defaults and docs (the scan keys are
`certmon.scanconfig`'s, which `certmon-scan --config` reads too).
Parsing, validation and messages belong to `certmon.config`; this module only
declares. Must not open the store, the broker or any URL at load time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

from certmon.config import (
    BrokerEndpoint,
    PolicyConfig,
    check_mqtt_url,
    load,
    schema,
    section,
    setting,
    validate_topic_level,
    validate_topic_prefix,
)
from certmon.scanconfig import ScanTarget
from certmon.wire import DEFAULT_PREFIX, LEGACY_V1_PREFIX

from .crlfetch import check_crl_url

DEFAULT_PATH = Path("/etc/certmon/collector.toml")


def _check_listen(value: str) -> str | None:
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(\d+)", value)
    if not m or not 0 <= int(m[2]) < 65536:
        return "must be host:port, e.g. 127.0.0.1:9310 or [::1]:9310 (port 0: any free port)"
    return None


def _check_sha256(value: str) -> str | None:
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", value):
        return "must be 64 hex digits, the SHA-256 of the DER certificate (no colons)"
    return None


def _check_apprise(value: str) -> str | None:
    return None if "://" in value else "not an apprise URL (e.g. mailto://…, tgram://…)"


@schema
class MqttConfig(BrokerEndpoint):
    broker: str = setting(schemes=("mqtt", "mqtts"), check=check_mqtt_url,
                          doc="Broker URL, mqtts://host[:port] (8883) or mqtt://host[:port].")
    client_id: str | None = setting(default=None, doc="MQTT client id; unset means "
                                    "\"certmon-collector-<hostname>\". Give each collector "
                                    "of a share group its own.")
    protocol: Literal["v5", "v311"] = setting(
        default="v5", doc="MQTT protocol version. \"v311\" for a broker without MQTT "
        "v5 (RabbitMQ 3.10): ingest stays at least once, session_expiry_s > 0 still "
        "keeps a persistent session; no share_group, and what the collector publishes "
        "carries no certmon-sig signature (docs/brokers.md, \"MQTT 3.1.1 collector\").")
    session_expiry_s: int = setting(default=3600, ge=0, doc="MQTT v5 session expiry: the "
                                    "broker queues statuses this long while the collector "
                                    "is down (0: clean session, nothing queued). With "
                                    "protocol v311, any value > 0 is clean_session false "
                                    "for as long as the broker keeps sessions.")
    share_group: str | None = setting(default=None, check=validate_topic_level,
                                      doc="Subscribe via $share/<group>/… (MQTT v5) so "
                                      "several collectors split the load.")
    keepalive_s: int = setting(default=60, ge=5, le=65535, doc="MQTT keepalive.")
    topic_prefix: str = setting(default=DEFAULT_PREFIX, check=validate_topic_prefix,
                                doc="Topic prefix; must match the agents'.")
    legacy_v1_topics: bool = setting(default=False, doc="While a fleet migrates from "
                                     "certmon/v1: also subscribe to and accept the v1 "
                                     "layout, certmon/v1/<device>/<kind> "
                                     "(docs/mosquitto.md, \"Migrating from certmon/v1\").")

    def cross_check(self) -> Iterator[tuple[str, str]]:
        # MQTT 3.1.1 has no shared subscriptions. Some brokers accept "$share/g/…"
        # from 3.1.1 clients anyway (Mosquitto); a 3.1.1-only one takes it as a plain
        # filter whose first level is "$share", which no device topic matches: the
        # group would receive nothing, and nobody would be told.
        if self.protocol == "v311" and self.share_group is not None:
            yield "share_group", ('needs mqtt.protocol = "v5": shared subscriptions are '
                                  'MQTT v5; with "v311" run one collector per broker')
        # A prefix at or below certmon/v1 puts the v2 device subtree where the v1
        # broker rule `pattern write certmon/v1/%u/#` lets a CN "devices" (or the
        # prefix's next level) write any device's topics during the migration.
        if self.legacy_v1_topics and (self.topic_prefix + "/").startswith(
                LEGACY_V1_PREFIX + "/"):
            yield "legacy_v1_topics", (f"needs a topic_prefix outside {LEGACY_V1_PREFIX} "
                                       f"(the v1 layout's), e.g. {DEFAULT_PREFIX}")



@schema
class TlsConfig:
    ca_bundle: Path = setting(readable=True, doc="CA bundle for the broker's certificate.")
    cert: Path = setting(readable=True, doc="The collector's client certificate (PEM).")
    key: Path = setting(readable=True, doc="Its private key.")
    fleet_ca: tuple[Path, ...] = setting(readable=True, min_items=1, doc="CA certificates "
                                         "device certificates must chain to (PEM files).")
    fleet_crl: tuple[Path, ...] = setting(default=(), readable=True, doc="CRL files of the "
                                          "fleet CAs (PEM or DER, re-read at every fleet "
                                          "sweep): an online device whose client "
                                          "certificate one lists raises CERT_REVOKED.")
    fleet_crl_urls: tuple[str, ...] = setting(
        default=(), schemes=("http", "https"), check=check_crl_url, doc="CRL "
        "Distribution Point URLs of the fleet CAs' CRLs (docs/broker-host.md), fetched at "
        "the fleet sweep at most every `crl_fetch_every_s` and used as `fleet_crl` files "
        "are (only a CRL whose signature verifies under a fleet CA or a device chain's "
        "intermediate is believed); no user:password@, redirects are not followed; a "
        "failed, unverifiable or older fetch keeps the last good CRL and is logged.")
    crl_fetch_timeout_s: float = setting(default=10.0, ge=0.1, le=300, doc="Total deadline "
                                         "of one CRL fetch (connect, headers and body).")
    crl_fetch_every_s: float = setting(default=3600.0, ge=10, doc="A fetched CRL is fetched "
                                       "again once its copy is this old (a failed fetch is "
                                       "retried after a tenth of it).")


@schema
class StoreConfig:
    url: str = setting(default="sqlite:///var/lib/certmon-collector/certmon.db",
                       schemes=("sqlite", "postgresql"),
                       doc="sqlite:///ABSOLUTE/PATH (WAL) or postgresql://user@host/db.")


@schema
class WebConfig:
    listen: str = setting(default="127.0.0.1:9310", check=_check_listen,
                          doc="Dashboard, JSON API and /metrics.")
    basic_auth_user: str | None = setting(default=None, doc="Require HTTP basic auth as "
                                          "this user.")
    basic_auth_password_file: Path | None = setting(default=None, readable=True,
                                                    doc="File holding that user's password.")
    metrics_per_device: Literal["at_risk", "all"] = setting(
        default="at_risk", doc="/metrics per-device series: at_risk (only what puts a "
        "device at risk: a connection certificate within policy.warn_days, offline, clock "
        "in doubt, renewal due or failing; fleet-level families cover the rest) or all "
        "(every device's series: about 6 per device). docs/metrics.md, Cardinality.")

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if (self.basic_auth_user is None) != (self.basic_auth_password_file is None):
            missing = "basic_auth_user" if self.basic_auth_user is None else (
                "basic_auth_password_file")
            yield missing, "basic_auth_user and basic_auth_password_file must be set together"


@schema
class IngestConfig:
    verify_workers: int = setting(default=1, ge=0, le=64, doc="Worker processes that "
                                  "verify signatures alongside the collector process "
                                  "(0: none). One is worth it from 2 cores: about +10 % "
                                  "statuses/s here (docs/benchmarks.md).")
    max_payload_bytes: int = setting(default=65536, ge=1024,
                                     doc="Larger messages are rejected unread.")
    reject_samples: int = setting(default=20, ge=0, doc="Rejected messages kept per reason "
                                  "for inspection.")
    offline_after_intervals: float = setting(default=3.0, ge=1, doc="A device is offline "
                                             "after this many of its intervals of silence.")
    store_retry_max_s: float = setting(default=30.0, ge=0.1, le=600, doc="While the store "
                                       "is unavailable, a batch is retried with backoff up "
                                       "to this many seconds between tries; nothing is "
                                       "acknowledged or dropped meanwhile.")
    device_rate_per_min: float = setting(default=6.0, ge=0.01, doc="Statuses per minute a "
                                         "device may send sustained (its token bucket's "
                                         "refill). Beyond it and the burst, only a device's "
                                         "newest pending status is verified and stored; the "
                                         "others count as superseded / rate_limited and "
                                         "DEVICE_FLOODING names it.")
    device_burst: int = setting(default=1000, ge=1, doc="Statuses a device may send at "
                                "once within budget (its token bucket's size): covers an "
                                "agent flushing its full spool after an outage (the "
                                "agent's spool_max_messages, 1000 by default).")


@schema
class AlertsConfig:
    renotify_interval_s: int = setting(default=14400, ge=60,
                                       doc="Repeat a firing alert this often on human "
                                       "channels (log, MQTT, apprise).")
    resend_interval_s: int = setting(default=60, ge=5, le=3600,
                                     doc="Alertmanager receivers (webhook_urls) get the "
                                     "whole active set this often, one POST per cycle, "
                                     "with endsAt a few intervals ahead (as Prometheus "
                                     "does), so a restarted Alertmanager has every "
                                     "alert back within one interval.")
    webhook_urls: tuple[str, ...] = setting(default=(), schemes=("http", "https"),
                                            doc="Alertmanager-compatible webhook receivers.")
    apprise_urls: tuple[str, ...] = setting(default=(), check=_check_apprise,
                                            doc="Notification services, as apprise URLs.")
    mqtt_topic_enabled: bool = setting(default=True, doc="Publish alerts on "
                                       "<topic_prefix>/fleet/alerts.")


@schema
class TrustRequirement:
    name: str = setting(doc="Label for views and alerts, e.g. \"ISRG Root X2\".")
    ca_file: Path | None = setting(default=None, readable=True, doc="The CA (PEM).")
    sha256: str | None = setting(default=None, check=_check_sha256,
                                 doc="Or its SHA-256 fingerprint.")
    status: Literal["required", "retiring"] = setting(default="required", doc="required: "
                                                      "devices must trust it; retiring: "
                                                      "report who still depends on it.")

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if (self.ca_file is None) == (self.sha256 is None):
            yield "ca_file", "set exactly one of ca_file and sha256"


@schema
class CollectorConfig:
    scan_interval_s: int = setting(default=3600, ge=60, doc="Seconds between scans.")
    scan_timeout_s: float = setting(default=10.0, ge=0.1, doc="Per-endpoint probe timeout.")
    mqtt: MqttConfig = section(doc="Broker connection.")
    tls: TlsConfig = section(doc="Broker identity and the fleet's CAs.")
    store: StoreConfig = section(default_factory=StoreConfig, doc="Where state lives.")
    web: WebConfig = section(default_factory=WebConfig, doc="HTTP server.")
    ingest: IngestConfig = section(default_factory=IngestConfig, doc="Message acceptance.")
    alerts: AlertsConfig = section(default_factory=AlertsConfig, doc="Alert delivery.")
    policy: PolicyConfig = section(default_factory=PolicyConfig,
                                   doc="Expiry thresholds for alerts.")
    trust_requirements: tuple[TrustRequirement, ...] = setting(
        default=(), doc="CAs to track across the fleet's trust stores.")
    scan_targets: tuple[ScanTarget, ...] = setting(default=(), doc="TLS endpoints to scan.")


def load_collector_config(path: Path = DEFAULT_PATH, *,
                          overrides: Mapping[str, object] | None = None,
                          flag_names: Mapping[str, str] | None = None,
                          check_files: bool = True) -> CollectorConfig:
    """Load and check the collector's config; raises ConfigError listing every problem."""
    return load(CollectorConfig, path, overrides=overrides, flag_names=flag_names,
                check_files=check_files)
