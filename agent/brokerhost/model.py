"""What a broker's configuration says it uses: endpoints (listeners and bridges) and
the certificate files each one references, with the config FILE:LINE of each.

Owns these frozen types, which every broker kind's reader (one module per kind,
registered in `agent.brokerhost.KINDS`) produces and `agent.brokerhost.inventory`
judges.
Must not: read files or judge anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from certmon.pki import Finding

# The file roles a TLS endpoint can reference, whatever the broker calls them
# (Mosquitto: cafile/capath/certfile/keyfile/crlfile, bridge_cafile/…).
FileRole = Literal["cafile", "capath", "certfile", "keyfile", "crlfile"]


@dataclass(frozen=True, slots=True)
class FileRef:
    """One file (or directory) a config line names."""

    role: FileRole
    directive: str  # as written: "certfile", "bridge_cafile"
    path: str
    at: str  # "FILE:LINE" of the line that names it


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A listener (the broker serves TLS) or a bridge (the broker is a TLS client)."""

    kind: Literal["listener", "bridge"]
    name: str  # "listener 8883 0.0.0.0", "bridge cloud"
    at: str  # FILE:LINE of the `listener`/`connection` line ("default" listener: the file)
    host: str | None  # listener: bind address (None: every address); bridge: remote host
    port: int | None  # None: a Unix socket listener, or a bridge without an address
    require_certificate: bool = False
    files: tuple[FileRef, ...] = ()

    @property
    def is_tls(self) -> bool:
        roles = {f.role for f in self.files}
        if self.kind == "listener":
            return "certfile" in roles
        return bool(roles & {"cafile", "capath"})

    def file(self, role: FileRole) -> FileRef | None:
        """The last line naming `role` wins, as in the broker."""
        found = [f for f in self.files if f.role == role]
        return found[-1] if found else None


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """One broker's configuration as read: where it came from, every endpoint, and
    findings about the configuration text itself (unknown or malformed lines)."""

    kind: str  # a key of agent.brokerhost.KINDS
    path: str
    files_read: tuple[str, ...]  # the main file and every included one, in read order
    per_listener_settings: bool
    endpoints: tuple[Endpoint, ...]
    findings: tuple[Finding, ...] = ()
