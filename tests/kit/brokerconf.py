"""certmon's documented broker configuration (packaging/mosquitto/), made runnable here.

Owns: reading the shipped `certmon.conf` and its two ACL files, replacing the
deployment's paths and ports (and nothing else) with a test's, and handing the
result to kit.broker as the device and operations `Listener`s plus the file's
global lines (`documented_broker`); the ACL texts, as shipped or in their
"migrating from certmon/v1" form (`documented_acl`).

Must not: change the documented text beyond those paths and ports (an operator
installs these files; the tests must run exactly them), start brokers (kit.broker
does) or issue certificates (kit.pki does). A path or port the shipped file no
longer names is an error here, never a silent mismatch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kit.broker import Listener

__all__ = [
    "DEVICE_ACL",
    "OPERATIONS_ACL",
    "PACKAGING_DIR",
    "BrokerFiles",
    "DocumentedBroker",
    "documented_acl",
    "documented_broker",
]

PACKAGING_DIR = Path(__file__).resolve().parents[2] / "packaging" / "mosquitto"
CONF_NAME = "certmon.conf"
DEVICE_ACL = "certmon-devices.acl"
OPERATIONS_ACL = "certmon-operations.acl"
# The deployment's ports as certmon.conf writes them: `listener 8883` is the device
# listener, `listener 8884` the operations one.
DEVICE_PORT, OPERATIONS_PORT = 8883, 8884
_INSTALLED = "/etc/mosquitto"
# Commented-out rules that the migration from certmon/v1 switches on (the ACL files
# say which, and docs/mosquitto.md says when).
_MIGRATION_RULE = re.compile(r"^#((?:pattern|topic) )", re.MULTILINE)


@dataclass(frozen=True)
class BrokerFiles:
    """The files the documented configuration names, as a test has them."""

    fleet_ca: Path  # device certificates chain to it (the device listener's cafile)
    operations_ca: Path  # the collector's certificate chains to it; it issues no device's
    certfile: Path  # the broker's certificate plus intermediates
    keyfile: Path


@dataclass(frozen=True)
class DocumentedBroker:
    """The two listeners of certmon.conf and its global lines (pass them as
    `extra_conf`; `per_listener_settings true` follows from the listeners)."""

    device: Listener
    operations: Listener
    global_conf: str

    @property
    def listeners(self) -> list[Listener]:
        return [self.device, self.operations]


def documented_acl(name: str, *, migration: bool = False) -> str:
    """The shipped ACL file `name`; with `migration`, with its "migrating from
    certmon/v1" rules uncommented, as docs/mosquitto.md tells an operator to."""
    text = (PACKAGING_DIR / name).read_text()
    if not migration:
        return text
    migrated, count = _MIGRATION_RULE.subn(r"\1", text)
    if not count:
        raise ValueError(f"packaging/mosquitto/{name} has no commented migration rule")
    return migrated


def documented_broker(directory: Path, files: BrokerFiles, *,
                      migration: bool = False) -> DocumentedBroker:
    """certmon.conf with `files` for its certificates and the ACL files written into
    `directory`; each listener on a free port (kit.broker assigns it)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        f"{_INSTALLED}/certs/fleet-ca.pem": files.fleet_ca,
        f"{_INSTALLED}/certs/operations-ca.pem": files.operations_ca,
        f"{_INSTALLED}/certs/broker.crt": files.certfile,
        f"{_INSTALLED}/certs/broker.key": files.keyfile,
    }
    for name in (DEVICE_ACL, OPERATIONS_ACL):
        written = directory / name
        written.write_text(documented_acl(name, migration=migration))
        paths[f"{_INSTALLED}/{name}"] = written
    text = (PACKAGING_DIR / CONF_NAME).read_text()
    for installed, path in paths.items():
        if installed not in text:
            raise ValueError(f"packaging/mosquitto/{CONF_NAME} no longer names {installed}")
        text = text.replace(installed, str(path))
    unknown = [line for line in text.splitlines()
               if _INSTALLED in line and not line.startswith("#")]
    if unknown:
        raise ValueError(f"packaging/mosquitto/{CONF_NAME} names a path kit.brokerconf "
                         f"does not know: {unknown[0]!r}")
    head, sections = _split_listeners(text)
    if set(sections) != {DEVICE_PORT, OPERATIONS_PORT}:
        raise ValueError(f"packaging/mosquitto/{CONF_NAME} listens on {sorted(sections)}, "
                         f"not on {DEVICE_PORT} (devices) and {OPERATIONS_PORT} (operations)")
    # kit.broker writes per_listener_settings itself (true: these listeners carry
    # their own ACLs); the shipped file must say the same.
    if not re.search(r"^per_listener_settings true$", head, re.MULTILINE):
        raise ValueError(f"packaging/mosquitto/{CONF_NAME} lost `per_listener_settings true`")
    global_conf = re.sub(r"^per_listener_settings true\n", "", head, flags=re.MULTILINE)
    return DocumentedBroker(
        device=Listener(tls=True, section=sections[DEVICE_PORT]),
        operations=Listener(tls=True, section=sections[OPERATIONS_PORT]),
        global_conf=global_conf,
    )


def _split_listeners(text: str) -> tuple[str, dict[int, str]]:
    """(lines before the first listener, {deployment port: that listener's lines})."""
    parts = re.split(r"^listener (\d+)\n", text, flags=re.MULTILINE)
    head, rest = parts[0], parts[1:]
    return head, {int(port): body for port, body in zip(rest[::2], rest[1::2], strict=True)}
