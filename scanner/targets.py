"""Where `certmon-scan`'s targets come from: arguments, a targets file, a collector config.

Owns the endpoint syntax (`host`, `host:port`, `[v6]:port`), the line-based targets
file (`host[:port] [key=value …]`, every bad line reported at once as `file:line:
problem`) and putting the three sources together with the command line's defaults,
each probe with its own MQTT client id. Must not probe, judge or read the TOML
schema itself (`certmon.scanconfig` declares the `[[scan_targets]]` it is given).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from certmon.errors import ConfigError
from certmon.scan import distinct_client_ids, probe_targets
from certmon.tlsprobe import ProbeTarget

if TYPE_CHECKING:  # the schema machinery loads only when a --config is read
    from certmon.scanconfig import ScanTarget

__all__ = ["DEFAULT_PORT", "collect_targets", "parse_endpoint", "parse_targets"]

DEFAULT_PORT = 8883
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def collect_targets(endpoints: Sequence[str], targets_file: str | None,
                    configured: Sequence[ScanTarget], defaults: ProbeTarget) -> list[ProbeTarget]:
    """Arguments, then the targets file's lines, then the config's `[[scan_targets]]`;
    `defaults` (the flags) fills what each leaves unset."""
    targets = [dataclasses.replace(defaults, host=host, port=port)
               for host, port in map(parse_endpoint, endpoints)]
    if targets_file:
        try:
            text = Path(targets_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--targets {targets_file}: {exc.strerror or exc}") from exc
        targets += parse_targets(text.splitlines(), targets_file, defaults)
    targets += probe_targets(configured, defaults)
    return distinct_client_ids(targets, f"certmon-scan-{os.getpid()}",
                               defaults.mqtt_client_id)


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """"host", "host:port", "[v6]", "[v6]:port" or a bare IPv6 literal → (host, port)."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and not text[end + 1 :].startswith(":")):
            raise ConfigError(f"bad endpoint {text!r}: expected [ipv6]:port")
        host, port_text = text[1:end], text[end + 2 :]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ConfigError(f"bad endpoint {text!r}: empty host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"bad endpoint {text!r}: port must be 1-65535")
    return host, int(port_text)


def parse_targets(lines: Iterable[str], source: str, defaults: ProbeTarget) -> list[ProbeTarget]:
    """One `host[:port] [key=value …]` per line; `#` starts a comment. Keys: servername,
    alpn (comma list), mqtt, client_id, cert, key, timeout_s. Every bad line is
    reported at once, as `file:line: problem`."""
    targets: list[ProbeTarget] = []
    errors: list[str] = []
    for number, raw in enumerate(lines, 1):
        try:
            words = shlex.split(raw, comments=True)
            if words:
                targets.append(_target_from_words(words, defaults))
        except (ConfigError, ValueError) as exc:
            errors.append(f"{source}:{number}: {exc}")
    if errors:
        raise ConfigError("\n".join(errors))
    return targets


def _target_from_words(words: list[str], defaults: ProbeTarget) -> ProbeTarget:
    host, port = parse_endpoint(words[0])
    target = dataclasses.replace(defaults, host=host, port=port)
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {word!r}")
        target = _with_option(target, key, value)
    return target


def _with_option(target: ProbeTarget, key: str, value: str) -> ProbeTarget:
    if key == "mqtt":
        if value.lower() not in _TRUE | _FALSE:
            raise ConfigError(f"mqtt={value!r}: expected true or false")
        return dataclasses.replace(target, mqtt=value.lower() in _TRUE)
    if key == "alpn":
        return dataclasses.replace(target, alpn=tuple(p for p in value.split(",") if p))
    if key == "timeout_s":
        timeout_s = float(value)  # ValueError → reported with the line number
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s={value!r}: must be > 0")
        return dataclasses.replace(target, timeout_s=timeout_s)
    if key == "servername":
        return dataclasses.replace(target, servername=value)
    if key == "client_id":
        return dataclasses.replace(target, mqtt_client_id=value)
    if key == "cert":
        return dataclasses.replace(target, client_cert=value)
    if key == "key":
        return dataclasses.replace(target, client_key=value)
    raise ConfigError(f"unknown key {key!r} (known: servername, alpn, mqtt, client_id, "
                      "cert, key, timeout_s)")
