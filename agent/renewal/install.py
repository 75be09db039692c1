"""Promoting a proven pair: atomic replacement of the working certificate and key.

Owns the file dance: each new file is written beside its target as a fresh temporary
file (a unique name created O_EXCL|O_NOFOLLOW by `tempfile.mkstemp`, so a second
writer or a planted symlink can never share or redirect it) with the target's mode,
fsynced and `os.replace`d in; the previous bytes are kept as
`<name>.previous` (same mode); the directory is fsynced. The key goes first and the
certificate last, because the agent reconnects when the *certificate* changes. If
any step fails, what was already replaced is put back, so the working pair is
byte-for-byte what it was. Must not: judge the pair (`agent.renewal.proof`) or log
key material.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".previous")


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".renewing", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # the umask must not widen or narrow it
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def install_pair(cert: Path, key: Path, new_cert: bytes, new_key: bytes) -> None:
    """Replace key then cert; raises OSError after restoring the originals."""
    old = {path: (path.read_bytes(), stat.S_IMODE(path.stat().st_mode)) for path in (key, cert)}
    done: list[Path] = []
    try:
        for path, data in ((key, new_key), (cert, new_cert)):
            old_bytes, mode = old[path]
            write_atomic(previous_path(path), old_bytes, mode)
            write_atomic(path, data, mode)
            done.append(path)
    except OSError:
        for path in reversed(done):
            with contextlib.suppress(OSError):
                write_atomic(path, *old[path])
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
