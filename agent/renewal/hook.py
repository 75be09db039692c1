"""Running the renewal hook: the certbot/step-style contract, and nothing else.

Owns the environment the hook sees (CERTMON_DEVICE_ID, CERTMON_CERT, CERTMON_KEY,
CERTMON_NEW_CERT, CERTMON_NEW_KEY), running `command` without a shell under a
timeout, ending it: once the hook exits (or times out) its whole process group is
killed, so a backgrounded child cannot touch its output afterwards; its stderr:
read size-bounded without blocking (a descendant that escaped the group and holds
the pipe cannot hang the agent), any PEM private-key block redacted, truncated; and
reading what it wrote, once, into bytes (bounded, regular files only, no symlinks),
so that what is proven is what is installed. Must not: judge what the hook wrote
(`agent.renewal.proof`), touch the working pair, or log the environment or a key.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

STDERR_MAX_CHARS = 512
STDERR_KEEP_BYTES = 64 * 1024  # read further and discarded, so the hook never blocks on it
OUTPUT_MAX_BYTES = 1024 * 1024  # a certificate chain or a key is a few KiB
TICK_S = 5.0
POLL_S = 0.05  # how soon the hook's exit is seen while a descendant holds stderr open
DRAIN_S = 0.5  # after the kill: the rest of stderr, unless something outside the group holds it
REAP_S = 5.0
_PEM_KEY = re.compile(
    rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S)


@dataclass(frozen=True, slots=True)
class HookPaths:
    device_id: str
    cert: Path
    key: Path
    new_cert: Path  # in the private work directory
    new_key: Path


@dataclass(frozen=True, slots=True)
class HookResult:
    error: str | None  # None: exit 0
    stderr: str  # redacted and truncated

    @property
    def is_ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class HookOutput:
    """The bytes the hook wrote, read once: everything after works on these."""

    cert_pem: bytes
    key_pem: bytes


def hook_env(paths: HookPaths) -> dict[str, str]:
    # The agent's own environment is passed on (PATH, HOME, STEPPATH for `step`):
    # the hook is the operator's program, run as the agent's user.
    return {**os.environ, "CERTMON_DEVICE_ID": paths.device_id,
            "CERTMON_CERT": str(paths.cert), "CERTMON_KEY": str(paths.key),
            "CERTMON_NEW_CERT": str(paths.new_cert), "CERTMON_NEW_KEY": str(paths.new_key)}


def clean_stderr(raw: bytes) -> str:
    text = _PEM_KEY.sub(b"<private key redacted>", raw).decode("utf-8", "replace")
    text = " ".join(text.split())  # one line: it ends up in a status and a log line
    return text if len(text) <= STDERR_MAX_CHARS else text[:STDERR_MAX_CHARS - 1] + "…"


def run_hook(command: Sequence[str], paths: HookPaths, timeout_s: float, *,
             tick: Callable[[], object] = lambda: None, tick_s: float = TICK_S) -> HookResult:
    """Run the hook once; every failure is a HookResult with a one-line error.
    `tick` is called every `tick_s` while it runs: the service's watchdog ping, since a
    hook may take longer than systemd's WatchdogSec."""
    if not command:
        return HookResult("renewal.command is empty", "")
    try:
        proc = subprocess.Popen(  # argv from the config, no shell
            list(command), env=hook_env(paths), cwd=paths.new_cert.parent,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
    except OSError as exc:
        return HookResult(f"cannot run hook {command[0]}: {exc.strerror or exc}", "")
    assert proc.stderr is not None
    with proc.stderr, _StderrReader(proc.stderr.fileno()) as err:
        timed_out = not _wait_exited(proc.pid, time.monotonic() + timeout_s, err, tick, tick_s)
        # Always, not only on timeout: after exit 0 a backgrounded child must not be
        # left to rewrite the output between its reading and the install. The exited
        # leader is still unreaped here, so its pid (the group id) cannot be reused.
        _kill_group(proc.pid)
        try:
            proc.wait(timeout=REAP_S)
        except subprocess.TimeoutExpired:
            return HookResult(f"hook {command[0]} did not end after SIGKILL", "")
        err.drain(time.monotonic() + DRAIN_S)
        stderr = clean_stderr(err.data)
    if timed_out:
        return HookResult(f"hook {command[0]} timed out after {timeout_s:g} s", stderr)
    if proc.returncode != 0:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited {proc.returncode}")
        tail = f": {stderr}" if stderr else ""
        return HookResult(f"hook {command[0]} {how}{tail}", stderr)
    return HookResult(None, stderr)


def read_output(paths: HookPaths) -> HookOutput | str:
    """Both files the hook wrote, each read once, or why not (a one-line reason)."""
    cert = _read_once(paths.new_cert, "certificate", "CERTMON_NEW_CERT")
    if isinstance(cert, str):
        return cert
    key = _read_once(paths.new_key, "key", "CERTMON_NEW_KEY")
    if isinstance(key, str):
        return key
    return HookOutput(cert, key)


def _read_once(path: Path, what: str, variable: str) -> bytes | str:
    # O_NOFOLLOW: a symlink could point at any file the agent can read; O_NONBLOCK:
    # opening a FIFO must not wait for a writer. Then fstat on what was opened.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"the hook exited 0 but wrote no {what} to {variable}"
    except OSError as exc:
        return f"cannot read the new {what} ({variable}): {exc.strerror or exc}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return f"the new {what} ({variable}) is not a regular file"
        if info.st_size > OUTPUT_MAX_BYTES:
            return f"the new {what} ({variable}) is larger than {OUTPUT_MAX_BYTES} bytes"
        chunks, size = [], 0
        while size <= OUTPUT_MAX_BYTES:
            chunk = os.read(fd, OUTPUT_MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        return f"cannot read the new {what} ({variable}): {exc.strerror or exc}"
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > OUTPUT_MAX_BYTES:
        return f"the new {what} ({variable}) is larger than {OUTPUT_MAX_BYTES} bytes"
    if not data:
        return f"the hook exited 0 but wrote no {what} to {variable}"
    return data


class _StderrReader:
    """Non-blocking, bounded reading of the hook's stderr pipe."""

    def __init__(self, fd: int) -> None:
        self.fd, self.data, self.eof = fd, b"", False
        os.set_blocking(fd, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(fd, selectors.EVENT_READ)

    def __enter__(self) -> _StderrReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._selector.close()

    def read_for(self, seconds: float) -> None:
        """Read what arrives within `seconds` (returns at once on EOF)."""
        if self.eof:
            time.sleep(max(seconds, 0))
            return
        if not self._selector.select(max(seconds, 0)):
            return
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
                self._selector.unregister(self.fd)
                return
            if len(self.data) < STDERR_KEEP_BYTES:
                self.data += chunk[:STDERR_KEEP_BYTES - len(self.data)]

    def drain(self, deadline: float) -> None:
        while not self.eof and (left := deadline - time.monotonic()) > 0:
            self.read_for(min(left, POLL_S))


def _wait_exited(pid: int, deadline: float, err: _StderrReader,
                 tick: Callable[[], object], tick_s: float) -> bool:
    """True once the hook has exited (left unreaped), False at the deadline."""
    next_tick = time.monotonic() + tick_s
    while True:
        # WNOWAIT: seen exited but not reaped, so the group id stays this process's.
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        now = time.monotonic()
        if now >= next_tick:
            tick()
            next_tick = now + tick_s
        if now >= deadline:
            return False
        err.read_for(min(POLL_S, deadline - now, next_tick - now))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)  # the hook's own process group only
