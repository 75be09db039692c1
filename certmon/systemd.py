"""sd_notify in a few lines of stdlib: readiness, watchdog pings, status text, stopping.

Owns the datagram to $NOTIFY_SOCKET (a path, or an abstract socket when it starts
with '@') and reading the watchdog interval systemd hands us. Outside systemd every
call is a harmless no-op returning False. Must not: depend on libsystemd or
python-systemd, raise (a failed notification must never stop the agent), or decide
when to ping (the service loop does: at half of `watchdog_interval_s()`).
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "ready", "status", "stopping", "watchdog", "watchdog_interval_s"]


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    elif not address.startswith("/"):
        return False  # unset, or a vsock:// address we do not speak
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def ready() -> bool:
    """Start-up finished (Type=notify units are 'active' from here)."""
    return notify("READY=1")


def watchdog() -> bool:
    """Still alive: call at least every `watchdog_interval_s()`; half of it is usual."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """A one-line STATUS= for `systemctl status` (newlines would end the field)."""
    return notify("STATUS=" + " ".join(text.split()))


def stopping() -> bool:
    """Shutdown began."""
    return notify("STOPPING=1")


def watchdog_interval_s() -> float | None:
    """WatchdogSec= in seconds when it is meant for this process, else None."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None  # the variable was inherited from a parent that is the watched one
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None
