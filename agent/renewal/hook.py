"""Running the renewal hook: the certbot/step-style contract, and nothing else.

Owns the private 0700 work directory, the environment the hook sees
(CERTMON_DEVICE_ID, CERTMON_CERT, CERTMON_KEY, CERTMON_NEW_CERT, CERTMON_NEW_KEY),
running `command` without a shell under a timeout (the whole process group is
killed, so a hook's own children do not linger), and its stderr: captured, with any
PEM private-key block redacted, truncated. Must not: judge what the hook wrote
(`agent.renewal.proof`), touch the working pair, or log the environment or a key.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

STDERR_MAX_CHARS = 512
TICK_S = 5.0
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
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _out, err = proc.communicate(timeout=max(min(tick_s, deadline - time.monotonic()), 0))
            break
        except subprocess.TimeoutExpired:
            tick()
            if time.monotonic() >= deadline:
                _kill_group(proc)
                _out, err = proc.communicate()
                return HookResult(f"hook {command[0]} timed out after {timeout_s:g} s",
                                  clean_stderr(err))
    stderr = clean_stderr(err)
    if proc.returncode != 0:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited {proc.returncode}")
        tail = f": {stderr}" if stderr else ""
        return HookResult(f"hook {command[0]} {how}{tail}", stderr)
    return HookResult(None, stderr)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the hook's own process group only
