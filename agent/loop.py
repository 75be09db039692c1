"""The timing of `certmon-agent run`, shared by the in-process service and the resident
half of the two-process agent (`agent.service`, `agent.resident`).

Owns the loop: a report when due (interval with jitter), or early when the files or
the broker chain changed; a reload on request; the flush of what waits for the
broker after each turn; READY once, then WATCHDOG each turn (sd_notify); and the
sleep until the next report, a file check or a wake-up (connect, signal): no busy
loop, a handful of wake-ups per interval. Must not report, judge or publish itself:
the caller passes those steps in. Imports neither cryptography nor the wire format.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from certmon import systemd

# Files are stat()ed this often between reports, so a renewed certificate is
# reported (and used for the connection) within seconds, not at the next interval.
WATCH_EVERY_S = 15.0


class LoopControl:
    """The three events `run_loop` is driven by, and the two requests signal handlers
    make of them (the in-process service and the resident share them)."""

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload.set()
        self._wake.set()


def run_loop(*, monotonic: Callable[[], float], stop: threading.Event, wake: threading.Event,
             reload: threading.Event, on_reload: Callable[[], None],
             is_changed: Callable[[], bool], report: Callable[[], None],
             next_interval_s: Callable[[], float], flush: Callable[[], None]) -> None:
    """Until `stop` is set."""
    watchdog_s = systemd.watchdog_interval_s()
    next_report = monotonic()
    ready_sent = False
    while not stop.is_set():
        if reload.is_set():
            reload.clear()
            on_reload()
            next_report = monotonic()
        if monotonic() >= next_report or is_changed():
            report()
            next_report = monotonic() + next_interval_s()
        flush()
        if not ready_sent:
            systemd.ready()
            ready_sent = True
        systemd.watchdog()
        timeout = min(next_report - monotonic(), WATCH_EVERY_S)
        if watchdog_s:
            timeout = min(timeout, watchdog_s / 2)
        wake.wait(max(timeout, 0.05))
        wake.clear()
