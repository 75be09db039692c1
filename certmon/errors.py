"""One exception root for certmon; third-party errors are translated at one seam.

The CLIs map these to exit codes: ConfigError → 78 (EX_CONFIG; systemd units set
RestartPreventExitStatus=78 so a broken config does not restart-loop), everything
else → 3 (UNKNOWN) for checks or 1 for services.
"""

from __future__ import annotations

EX_CONFIG = 78


class CertmonError(Exception):
    """Root of every error certmon raises on purpose."""


class ConfigError(CertmonError):
    """A config file or flag is wrong; the message names the file, line, key and problem."""


class PKIError(CertmonError):
    """A certificate or key could not be read or understood."""


class ProtocolError(CertmonError):
    """A status message is malformed, forged, replayed or mis-addressed.

    `reason` is a short stable token (e.g. ``bad_signature``) used as a counter label.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TransportError(CertmonError):
    """The MQTT or TLS transport failed (connect, handshake, publish)."""


def unreadable_hint(exc: OSError) -> str:
    """What to do about a file that cannot be read, appended to its one-line message
    (" (run as a user that may read it …)"); empty when the OS error says it all."""
    if isinstance(exc, PermissionError):
        return " (run as a user that may read it, e.g. root or the file's group)"
    if isinstance(exc, IsADirectoryError):
        return " (give the file, not its directory)"
    return ""
