"""The collector's inbox (collector.backlog) wakes its one worker when what it waits
for has arrived — a batch at a time from the link — and never leaves it asleep with
messages queued, not even when a batch does not fit."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from certmon.mqtt import Incoming
from collector.backlog import Backlog

T0 = datetime(2026, 12, 2, tzinfo=UTC)


def msgs(device: str, n: int) -> list[Incoming]:
    return [Incoming(f"certmon/v2/devices/{device}/status", b"%d" % i, False, 1)
            for i in range(n)]


def took_within(inbox: Backlog, put: threading.Thread, max_n: int = 64) -> tuple[float, int]:
    """Start `put`, take once (waiting up to 5 s): (seconds it took, messages)."""
    start = time.monotonic()
    put.start()
    got = inbox.take(max_n, 5.0, 0.05)
    return time.monotonic() - start, len(got)


def test_a_batch_wakes_a_waiting_worker_at_once() -> None:
    inbox = Backlog(lambda: T0)
    batch = msgs("a", 20) + msgs("b", 20)
    waited, n = took_within(inbox, threading.Timer(0.05, inbox.put_many, (batch,)))
    assert n == 40 and waited < 1.0  # not the 5 s wait
    got = inbox.take(64, 0.1, 0)
    assert got == []  # all 40 were handed out, one per device in turn
    assert all(m.received_at == T0 for m in inbox._held)


def test_a_batch_larger_than_the_room_left_still_reaches_the_worker() -> None:
    inbox = Backlog(lambda: T0, maxlen=30)
    batch = msgs("a", 50)  # 30 fit; the rest waits for the worker to free room
    put = threading.Thread(target=inbox.put_many, args=(batch,), daemon=True)
    waited, n = took_within(inbox, threading.Timer(0.05, put.start))
    assert n == 30 and waited < 1.0, waited
    inbox.done(30)
    put.join(2)
    assert not put.is_alive() and len(inbox) == 20


def test_single_puts_wake_the_worker_only_when_it_waits() -> None:
    inbox = Backlog(lambda: T0)
    for m in msgs("a", 5):
        inbox.put(m)  # nobody waits: no wake-ups owed
    assert len(inbox.take(10, 0.1, 0)) == 5
    waited, n = took_within(inbox, threading.Timer(0.05, inbox.put, (msgs("b", 1)[0],)))
    assert n == 1 and waited < 1.0
