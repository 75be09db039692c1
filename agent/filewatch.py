"""Has the device's certificate material changed on disk since the last look?

Owns the stat signature (inode, size, mtime in ns, or the errno when a file cannot
be stat()ed) of the configured TLS files (`Plan.watched`), so a renewed certificate is reported (and
used for the connection) within seconds, not at the next interval. Stat only: the
files are read and parsed by `agent.certstore`. Must not read the files' contents.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def stamp(path: Path) -> object:
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.errno
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatch:
    def __init__(self) -> None:
        self._stamp: tuple[object, ...] | None = None

    def is_changed(self, paths: Iterable[Path]) -> bool:
        """True when a file changed since the previous call (never on the first)."""
        now = tuple(stamp(path) for path in paths)
        changed = self._stamp is not None and now != self._stamp
        self._stamp = now
        return changed
