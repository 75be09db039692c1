"""Reading the small files certmon judges: certificates, keys, CRLs, configuration.

Owns one rule: only a regular file is read. A FIFO, a character device or a socket
given where a certificate belongs would block the read for ever (an agent that never
reports again) or never end (/dev/zero); opening non-blocking and checking what was
opened, before reading, makes that a clear OSError the caller turns into a finding —
with no window between a check and the open. Must not interpret the bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["NotRegularFile", "read_regular"]


class NotRegularFile(OSError):
    """The path names a FIFO, device or socket, not a file."""


def read_regular(path: str | Path) -> bytes:
    """The bytes of the regular file at `path`; OSError (e.g. NotRegularFile,
    IsADirectoryError, PermissionError) otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file (a FIFO, device or "
                                 "socket; give the certificate file itself)", str(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            return fh.read()
    finally:
        if fd >= 0:
            os.close(fd)
