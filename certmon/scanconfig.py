"""The scan keys of collector.toml, declared once for the two programs that read them.

Owns the `[[scan_targets]]` entry schema (`ScanTarget`, which the collector's schema
embeds) and `ScanSettings`: the view of a collector.toml that `certmon-scan --config`
reads, so that a scan from the command line probes the endpoints the collector's
scheduled scans probe, with the same timeout, trust bundle and policy. Must not
declare the collector's other keys (a view ignores them; `certmon-collector
check-config` judges them) nor open anything but the config file. `scan_timeout_s`
is the one key written here and in the collector's schema: a top-level key cannot be
embedded, and `tests/test_scan.py` checks that both read it alike.
"""

from __future__ import annotations

from pathlib import Path

from .config import PolicyConfig, load, schema, section, setting

__all__ = ["ScanSettings", "ScanTarget", "load_scan_settings"]


@schema
class ScanTarget:
    host: str = setting(doc="Endpoint to probe.")
    port: int = setting(default=8883, ge=1, le=65535, doc="TCP port.")
    servername: str | None = setting(default=None, doc="SNI; unset means host.")
    alpn: tuple[str, ...] = setting(default=(), doc="ALPN protocols to offer.")
    mqtt: bool = setting(default=False, doc="Also do a clean MQTT CONNECT/DISCONNECT.")


@schema
class ScanTls:
    # Optional here (required by the collector): a scan-only file may leave it out and
    # judge against --ca-bundle or the system bundle.
    ca_bundle: Path | None = setting(default=None, readable=True,
                                     doc="CA bundle the scanned brokers must chain to.")


@schema
class ScanSettings:
    """What a scan reads from collector.toml; every other key is left to the collector."""

    scan_timeout_s: float = setting(default=10.0, ge=0.1, doc="Per-endpoint probe timeout.")
    tls: ScanTls = section(default_factory=ScanTls, doc="Trust for the scanned endpoints.")
    policy: PolicyConfig = section(default_factory=PolicyConfig,
                                   doc="Expiry thresholds for alerts.")
    scan_targets: tuple[ScanTarget, ...] = setting(default=(), doc="TLS endpoints to scan.")


def load_scan_settings(path: Path, *, check_files: bool = True) -> ScanSettings:
    """The scan keys of a collector config; raises ConfigError (file:line: key: problem)
    for a problem in them, whatever the rest of the file holds."""
    return load(ScanSettings, path, known_only=True, check_files=check_files)
