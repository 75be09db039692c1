"""The agent's configuration schema (/etc/certmon/agent.toml) and its loader.

Owns which keys the agent accepts, their defaults and docs. Parsing, validation and
messages belong to `certmon.config`; this module only declares. Must not read
certificates or decide anything at load time beyond "is this value acceptable"
(e.g. the device id's default comes from the client certificate's CN at start).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from certmon.config import (
    BrokerEndpoint,
    PolicyConfig,
    check_mqtt_url,
    load,
    schema,
    section,
    setting,
    validate_device_id,
    validate_topic_prefix,
)
from certmon.wire import DEFAULT_PREFIX

DEFAULT_PATH = Path("/etc/certmon/agent.toml")


@schema
class MqttConfig(BrokerEndpoint):
    broker: str = setting(schemes=("mqtt", "mqtts"), check=check_mqtt_url,
                          doc="Broker URL, mqtts://host[:port] (port 8883 by default) or "
                          "mqtt://host[:port] (1883).")
    client_id: str | None = setting(default=None, doc="MQTT client id; unset means "
                                    "\"certmon-<device_id>\".")
    servername: str | None = setting(default=None, doc="TLS SNI and the name checked in the "
                                     "broker certificate; unset means the URL's host.")
    alpn: tuple[str, ...] = setting(default=(), doc="ALPN protocols to offer, e.g. "
                                    "[\"x-amzn-mqtt-ca\"] for AWS IoT on port 443.")
    keepalive_s: int = setting(default=60, ge=5, le=65535, doc="MQTT keepalive.")
    protocol: Literal["v5", "v311"] = setting(default="v5", doc="MQTT protocol version.")
    retain: bool = setting(default=True, doc="Publish the status, cert, inventory and "
                           "online topics (and the will) retained; false for a broker with "
                           "retained messages off (Mosquitto `retain_available false` refuses "
                           "a retained will), with `status_x5c` left on (docs/brokers.md).")
    status_x5c: Literal["on_change", "always", "never"] = setting(
        default="on_change", doc="When a status carries its signing chain in the JWS `x5c` "
        "header, so a collector learns the certificate on brokers that do not retain the "
        "cert topic: \"on_change\" on the first status after each (re)connect or signing "
        "certificate change and on statuses signed while offline, \"always\", or \"never\" "
        "(docs/brokers.md).")



def _token_uri_problem(value: str) -> str | None:
    from certmon.pki.token import parse_token_uri

    try:
        parse_token_uri(value)
    except ValueError as exc:
        return str(exc)
    return None


@schema
class TlsConfig:
    ca_bundle: Path = setting(readable=True, doc="CA bundle (PEM) the device trusts; it is "
                              "also inventoried and reported.")
    cert: Path = setting(readable=True, doc="Client certificate (PEM), with intermediates.")
    key: Path = setting(readable=True, doc="Private key of the client certificate.")
    signing_cert: Path | None = setting(default=None, readable=True, doc="Dedicated status-"
                                        "signing certificate (with its intermediates); "
                                        "unset means sign with `cert`, or with "
                                        "`signing_key_uri`, the certificates stored on the "
                                        "token.")
    signing_key: Path | None = setting(default=None, readable=True,
                                       doc="Private key of `signing_cert`.")
    signing_key_uri: str | None = setting(
        default=None, check=_token_uri_problem, doc="Instead of `signing_key`: the key of "
        "`signing_cert` on a PKCS#11 token (TPM2, secure element, HSM), as an RFC 7512 URI, "
        "`pkcs11:token=…;object=…`; it signs on the token and never leaves it "
        "(docs/hardware-keys.md; the certmon[pkcs11] extra).")
    pkcs11_module: Path | None = setting(default=None, readable=True, doc="The PKCS#11 "
                                         "module for `signing_key_uri` when the URI names "
                                         "none (module-path).")
    pkcs11_pin_file: Path | None = setting(default=None, readable=True, doc="File holding "
                                           "the token's user PIN (e.g. a systemd "
                                           "credential) when the URI names none "
                                           "(pin-source); never logged.")

    def cross_check(self) -> Iterator[tuple[str, str]]:
        keys = [k for k in ("signing_key", "signing_key_uri") if getattr(self, k) is not None]
        if len(keys) > 1:
            yield "signing_key_uri", "give signing_key or signing_key_uri, not both"
        elif self.signing_cert is not None and not keys:
            yield "signing_key", "signing_cert needs signing_key (or signing_key_uri)"
        elif self.signing_key is not None and self.signing_cert is None:
            # A token key may bring its certificate; a key file never does.
            yield "signing_cert", "signing_key needs signing_cert"
        if self.signing_key_uri is not None and self.pkcs11_module is None \
                and "module-path=" not in self.signing_key_uri:
            yield "pkcs11_module", "signing_key_uri needs a module: module-path in the URI " \
                "or tls.pkcs11_module"

    def signing_args(self) -> dict[str, Any]:
        """The signing material's part of `agent.certstore.read_material`."""
        return {"signing_cert": self.signing_cert, "signing_key": self.signing_key,
                "signing_key_uri": self.signing_key_uri, "pkcs11_module": self.pkcs11_module,
                "pkcs11_pin_file": self.pkcs11_pin_file}

    def watched(self) -> tuple[Path, ...]:
        """The files whose change means new material (a token key is no file)."""
        return tuple(p for p in (self.ca_bundle, self.cert, self.key, self.signing_cert,
                                 self.signing_key, self.pkcs11_pin_file) if p)



@schema
class LoopConfig:
    interval_s: int = setting(default=300, ge=10, doc="Seconds between status reports.")
    jitter_fraction: float = setting(default=0.1, ge=0, le=0.5, doc="Random spread of each "
                                     "interval, so a rebooted fleet does not report in step.")
    topic_prefix: str = setting(default=DEFAULT_PREFIX, check=validate_topic_prefix,
                                doc="Topic prefix; must match the collector's.")
    state_dir: Path = setting(default=Path("/var/lib/certmon-agent"),
                              doc="Sequence numbers and the offline spool live here.")
    spool_max_bytes: int = setting(default=1_048_576, ge=4096,
                                   doc="Spool size cap; the oldest reports go first.")
    spool_max_messages: int = setting(default=1000, ge=1, doc="Spool length cap.")
    heartbeat: bool = setting(default=False, doc="While nothing but time and counters "
                              "changed, publish a compact signed heartbeat (~0.5 KB) on the "
                              "heartbeat topic instead of the full status; needs a collector "
                              "that knows heartbeats (docs/protocol.md, \"Heartbeats\").")
    full_every_s: int = setting(default=86400, ge=60, doc="With `heartbeat`, a full status "
                                "at least this often even when nothing changed; the retained "
                                "status is kept this long (plus three intervals).")
    fork_checks: bool = setting(default=False, doc="True: `run` keeps only the MQTT "
                                "session resident and forks a checker for each report (~26 "
                                "MiB steady instead of ~47, ~0.2 s CPU per report instead of "
                                "~15 ms; experimental, docs/agent-footprint.md); false: one "
                                "process. Read when `run` starts.")


@schema
class ClockConfig:
    sntp_servers: tuple[str, ...] = setting(default=(), doc="Optional SNTP servers to measure "
                                            "the offset against; empty means kernel state only.")
    skew_tolerance_s: float = setting(default=300.0, ge=0, doc="Offsets beyond this are a "
                                      "CLOCK_BEHIND or CLOCK_AHEAD finding.")


def _check_argv(argv: str) -> str | None:
    return "must not be empty" if not argv.strip() else None


@schema
class RenewalConfig:
    """docs/renewal.md: when the agent renews its client certificate and how."""

    enabled: bool = setting(default=False, doc="`run` renews the client certificate with "
                            "`command` when due (`certmon-agent renew` needs only `command`).")
    command: tuple[str, ...] = setting(default=(), check=_check_argv, doc="The hook: an "
                                       "argv list run without a shell; exit 0 means it wrote "
                                       "CERTMON_NEW_CERT and CERTMON_NEW_KEY (docs/renewal.md).")
    timeout_s: float = setting(default=120.0, ge=1, le=3600, doc="The hook is killed after "
                               "this many seconds (an attempt that failed).")
    at_lifetime_fraction: float = setting(default=2 / 3, ge=0, le=1, doc="Renew once this "
                                          "fraction of the lifetime has elapsed (0 = off).")
    days_before: float = setting(default=0.0, ge=0, doc="Renew this many days before "
                                 "notAfter (0 = off); with both set the earlier point wins.")
    jitter_fraction: float = setting(default=0.05, ge=0, le=0.5, doc="Move the renewal "
                                     "point earlier by up to this fraction of the lifetime, "
                                     "fixed per device and certificate, so a fleet does not "
                                     "renew in step.")
    retry_min_s: float = setting(default=300.0, ge=1, doc="Wait after the first failed "
                                 "attempt; doubled after each further failure.")
    retry_max_s: float = setting(default=21600.0, ge=1, doc="Cap of the retry wait.")
    connect_timeout_s: float = setting(default=10.0, ge=1, le=300, doc="Bound of the MQTT "
                                       "CONNECT/CONNACK that proves the new pair.")

    def cross_check(self) -> Iterator[tuple[str, str]]:
        if self.enabled and not self.command:
            yield "command", "is required when renewal is enabled"
        if self.at_lifetime_fraction == 0 and self.days_before == 0:
            yield "days_before", "at_lifetime_fraction and days_before are both 0 (off)"
        if self.retry_min_s > self.retry_max_s:
            yield "retry_min_s", f"must not exceed retry_max_s ({self.retry_max_s:g})"


@schema
class BrokerHostConfig:
    """docs/broker-host.md: `run` on a broker host also judges the broker's own files."""

    config: Path | None = setting(default=None, doc="The broker's configuration file (e.g. "
                                  "/etc/mosquitto/mosquitto.conf); set, `run` judges its "
                                  "listeners, bridges and files and reports them signed. A "
                                  "missing or unreadable file is a finding, not an error.")
    kind: Literal["mosquitto"] = setting(default="mosquitto", doc="Which broker reads "
                                         "`config`.")
    check_every_s: int = setting(default=300, ge=10, doc="Seconds between two judgements "
                                 "of the broker's files and listeners; the reports in "
                                 "between carry the last one.")


@schema
class AgentConfig:
    device_id: str | None = setting(default=None, check=validate_device_id, doc="Device id in "
                                    "topics; unset means the client certificate's CN.")
    mqtt: MqttConfig = section(doc="Broker connection.")
    tls: TlsConfig = section(doc="The device's trust store and identity.")
    agent: LoopConfig = section(default_factory=LoopConfig, doc="Reporting loop and spool.")
    policy: PolicyConfig = section(default_factory=PolicyConfig,
                                   doc="Expiry thresholds for findings.")
    clock: ClockConfig = section(default_factory=ClockConfig, doc="Clock checks.")
    renewal: RenewalConfig = section(default_factory=RenewalConfig,
                                     doc="Client certificate renewal (docs/renewal.md).")
    broker: BrokerHostConfig = section(default_factory=BrokerHostConfig,
                                       doc="Broker-host mode (docs/broker-host.md).")


def load_agent_config(path: Path = DEFAULT_PATH, *,
                      overrides: Mapping[str, object] | None = None,
                      flag_names: Mapping[str, str] | None = None,
                      check_files: bool = True) -> AgentConfig:
    """Load and check the agent's config; raises ConfigError listing every problem."""
    return load(AgentConfig, path, overrides=overrides, flag_names=flag_names,
                check_files=check_files)
