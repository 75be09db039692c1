"""Reading the small files certmon judges: certificates, keys, CRLs, PINs, configuration.

Owns one rule: only a regular file is read. A FIFO, a character device or a socket
given where a certificate belongs would block the read for ever (an agent that never
reports again) or never end (/dev/zero); opening some devices has side effects (a
serial line's DTR resets the board on it, /dev/watchdog arms). So the path is
`stat`ed first and only a regular file is opened — non-blocking, and checked again on
the opened descriptor (no window between the check and the read) — and the read is
capped. Every refusal is an OSError the caller turns into a finding. Must not
interpret the bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["MAX_FILE_BYTES", "NotRegularFile", "check_readable", "read_regular"]

# Far above any certificate bundle (the system's is ~220 KB), CRL or key.
MAX_FILE_BYTES = 64 * 1024 * 1024


class NotRegularFile(OSError):
    """The path names a FIFO, device or socket, not a file."""


def _refuse_non_regular(path: str | Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(mode):
        raise NotRegularFile(errno.EINVAL, "not a regular file (a FIFO, device or socket; "
                             "give the file itself)", str(path))


def _open(path: str | Path) -> int:
    _refuse_non_regular(path, os.stat(path).st_mode)  # before any open: no side effects
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _refuse_non_regular(path, os.fstat(fd).st_mode)  # what was opened, not the name
    except OSError:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at `path`; OSError (NotRegularFile,
    IsADirectoryError, PermissionError, FileNotFoundError, EFBIG) otherwise."""
    fd = _open(path)
    with os.fdopen(fd, "rb", closefd=True) as fh:
        os.set_blocking(fd, True)
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", str(path))
    return data


def check_readable(path: str | Path) -> None:
    """Raise as `read_regular` would, without reading (a config's "readable" check)."""
    os.close(_open(path))
