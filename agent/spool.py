"""Store-and-forward: the agent's bounded on-disk queue, and its sequence counter.

Owns the state directory's files: `seq` (the last sequence number used, written
atomically so a reboot never reuses one), `spool/` (one file per signed message not
yet acknowledged by the broker, named by sequence so order is the file order) and
`spool.dropped` (how many messages the size cap threw away). Every status goes
through the spool, delivered or not, so "the broker was down" and "the process
restarted" take the same path. Must not know about MQTT or message contents.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("certmon.agent")


def write_atomic(path: Path, data: bytes) -> None:
    """Write-then-rename, with fsync: after a power cut the file holds either the old
    or the new content, never a torn mix (the device may lose power at any time)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # directory fsync is best effort (not on all fs)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class SequenceCounter:
    """`seq` strictly increasing across restarts: the collector's replay rule relies on
    (boot_id, seq) never repeating for a device."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "seq"
        try:
            self._last = int(self.path.read_text().strip() or "0")
        except FileNotFoundError:
            self._last = 0
        except ValueError:
            # A corrupted counter: jump far ahead rather than risk reusing a number.
            self._last = int.from_bytes(os.urandom(4), "big")

    @property
    def last(self) -> int:
        return self._last

    def at_least(self, last: int) -> None:
        """Never below `last`, a number this agent already used (a forked checker
        carries it: when the counter file cannot be written, the disk is stale)."""
        self._last = max(self._last, last)

    def next(self) -> int:
        value = self._last + 1
        try:
            write_atomic(self.path, f"{value}\n".encode())
        except OSError as exc:
            # Full or read-only state directory: keep reporting live. The worst case
            # is a number reused after a restart, which the collector refuses as a
            # replay: one lost status, never a forged or confused one.
            log.error("cannot persist sequence number %s in %s: %s", value, self.path,
                      exc.strerror or exc)
        self._last = value
        return value


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    seq: int
    topic: str
    payload: bytes
    path: Path


class Spool:
    """Messages waiting for PUBACK, oldest first, capped by count and bytes."""

    def __init__(self, state_dir: Path, *, max_messages: int = 1000,
                 max_bytes: int = 1 << 20) -> None:
        self.dir = state_dir / "spool"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._dropped_path = state_dir / "spool.dropped"

    def _files(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.suffix == ".msg")

    def append(self, seq: int, topic: str, payload: bytes) -> Path:
        path = self.dir / f"{seq:020d}.msg"
        write_atomic(path, topic.encode() + b"\n" + payload)
        self._enforce_cap()
        return path

    def pending(self) -> list[SpooledMessage]:
        out = []
        for path in self._files():
            try:
                raw = path.read_bytes()
            except FileNotFoundError:  # acknowledged meanwhile
                continue
            topic, _, payload = raw.partition(b"\n")
            out.append(SpooledMessage(int(path.stem), topic.decode(), payload, path))
        return out

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    @property
    def depth(self) -> int:
        return len(self._files())

    @property
    def dropped(self) -> int:
        try:
            return int(self._dropped_path.read_text().strip() or "0")
        except (FileNotFoundError, ValueError):
            return 0

    def _enforce_cap(self) -> None:
        sized: list[tuple[Path, int]] = []
        for p in self._files():
            try:
                sized.append((p, p.stat().st_size))
            except FileNotFoundError:  # its PUBACK came meanwhile: already gone
                continue
        files = [p for p, _ in sized]
        sizes = [size for _, size in sized]
        total = sum(sizes)
        drop = 0
        # Oldest first: the newest status is the one that matters most to the fleet.
        while files[drop:] and (len(files) - drop > self.max_messages or total > self.max_bytes):
            if len(files) - drop == 1:
                break  # never drop the message just written
            total -= sizes[drop]
            self.remove(files[drop])
            drop += 1
        if drop:
            write_atomic(self._dropped_path, f"{self.dropped + drop}\n".encode())
