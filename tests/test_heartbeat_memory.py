"""The collector's memory of full statuses that heartbeats name is bounded
(collector.heartbeats): a fleet larger than it costs a store read per heartbeat of a
forgotten device, never unbounded memory, and an older status never replaces a newer."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from collector.heartbeats import FullStatus, FullStatuses

T0 = datetime(2026, 12, 2, tzinfo=UTC)


class _Status:
    def __init__(self, boot_id: str, seq: int) -> None:
        self.boot_id, self.seq = boot_id, seq


def full(digest: str, seq: int, boot_id: str = "b") -> FullStatus:
    status: Any = _Status(boot_id, seq)  # only boot_id and seq are read
    record: Any = None
    return FullStatus(digest, status, record)


def test_the_least_recently_reporting_devices_are_forgotten_first() -> None:
    memory = FullStatuses(kept=2)
    memory.saw("a", full("a1", 1))
    memory.saw("b", full("b1", 1))
    memory.saw("a", full("a2", 2))  # a reported again: b is now the oldest
    memory.saw("c", full("c1", 1))
    assert len(memory) == 2
    assert memory.find("b", "b1") is None  # forgotten: the ingest reads the store
    assert memory.find("a", "a2") is not None and memory.find("a", "a1") is not None
    assert memory.find("c", "c1") is not None


def test_an_older_status_does_not_replace_a_newer_one() -> None:
    memory = FullStatuses()
    memory.saw("a", full("new", 5))
    memory.saw("a", full("old", 4))  # reordered in a share group
    assert memory.find("a", "new") is not None and memory.find("a", "old") is None
    memory.saw("a", full("reboot", 1, boot_id="b2"))  # a new boot starts again at 1
    assert memory.find("a", "reboot") is not None and memory.find("a", "new") is not None
    memory.loaded("a", full("stored", 9))  # the stored one, named by a heartbeat
    assert memory.find("a", "stored") is not None and memory.find("a", "reboot") is None


def test_a_device_that_sends_mostly_heartbeats_stays_remembered() -> None:
    memory = FullStatuses(kept=2)
    memory.saw("beater", full("b1", 1))
    memory.saw("other", full("o1", 1))
    assert memory.find("beater", "b1") is not None  # its heartbeat named it
    memory.saw("third", full("t1", 1))
    assert memory.find("beater", "b1") is not None and memory.find("other", "o1") is None
