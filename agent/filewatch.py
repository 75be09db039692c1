"""Has the device's certificate material changed on disk since the last look?

Owns the stat signature (inode, size, mtime in ns, or the errno when a file cannot
be stat()ed) of the configured TLS files, so a renewed certificate is reported (and
used for the connection) within seconds, not at the next interval. Stat only: the
files are read and parsed by `agent.certstore`. Must not read the files' contents.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import TlsConfig

# Files are stat()ed this often between reports.
WATCH_EVERY_S = 15.0


def stamp(path: Path) -> object:
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.errno
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatch:
    def __init__(self) -> None:
        self._stamp: tuple[object, ...] | None = None

    def is_changed(self, tls: TlsConfig) -> bool:
        """True when a file changed since the previous call (never on the first)."""
        now = tuple(stamp(path) for path in (tls.ca_bundle, tls.cert, tls.key,
                                             tls.signing_cert, tls.signing_key) if path)
        changed = self._stamp is not None and now != self._stamp
        self._stamp = now
        return changed
