"""A real Alertmanager for tests: Debian's prometheus-alertmanager on a free loopback port.

Owns: starting, stopping, killing, pausing and restarting an `alertmanager` process with its
own config and `--storage.path` in a tmp dir and clustering off
(`--cluster.listen-address=`), readiness by polling `/-/ready`, and reading what it
holds (`GET /api/v2/alerts`).

Must not: touch a system Alertmanager (9093 is never bound: ports come from
`free_port`), send notifications anywhere (the one receiver has no integration), or
sleep a fixed time where a condition can be polled.

Alertmanager keeps alerts in memory only (its storage holds silences and the
notification log), so every restart starts with no alerts: `restart(empty=True)`
also gives it a fresh storage directory, as a reinstalled or rescheduled one gets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kit.broker import free_port

__all__ = ["Alertmanager", "find_alertmanager", "label_set"]

_CANDIDATES = ("/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager")

# One route to a receiver without integrations: alerts are held and grouped, nothing
# is sent anywhere.
_CONFIG = """\
route:
  receiver: "null"
  group_wait: 1h
receivers:
  - name: "null"
"""


def find_alertmanager() -> str | None:
    for name in ("prometheus-alertmanager", "alertmanager"):
        if found := shutil.which(name):
            return found
    return next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)


class Alertmanager:
    """One process on 127.0.0.1:`port`; the port survives restarts (the sink's URL)."""

    def __init__(self, binary: str, tmp: Path, *, start_timeout_s: float = 20.0) -> None:
        self.binary = binary
        self.dir = tmp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.start_timeout_s = start_timeout_s
        self.conf_path = self.dir / "alertmanager.yml"
        self.conf_path.write_text(_CONFIG)
        self.log_path = self.dir / "alertmanager.log"
        self._generation = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alerts_url(self) -> str:
        """What `[alerts] webhook_urls` names."""
        return f"{self.base_url}/api/v2/alerts"

    @property
    def storage(self) -> Path:
        return self.dir / f"data-{self._generation}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Alertmanager:
        if self.running:
            return self
        self.storage.mkdir(exist_ok=True)
        argv = [self.binary, f"--config.file={self.conf_path}",
                f"--storage.path={self.storage}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=", "--log.level=warn"]
        with self.log_path.open("ab") as log:
            log.write(f"--- starting {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=log)
        deadline = time.monotonic() + self.start_timeout_s
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"alertmanager did not become ready on {self.base_url}"
                                   f"\n--- log ---\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/-/ready", timeout=1) as resp:
                return resp.status == 200  # type: ignore[no-any-return]
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP: a hung receiver. The kernel still accepts connections into the
        backlog, nothing answers; its memory (the alerts) is kept."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused one could not handle SIGTERM
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def restart(self, *, empty: bool = True) -> Alertmanager:
        """Stop and start on the same port; `empty`: with a new storage directory."""
        self.stop()
        if empty:
            self._generation += 1
        return self.start()

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """`GET /api/v2/alerts`: the alerts it holds whose endsAt has not passed."""
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        url = f"{self.alerts_url}?{query}" if query else self.alerts_url
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)  # type: ignore[no-any-return]

    def label_sets(self) -> set[tuple[tuple[str, str], ...]]:
        return {label_set(a["labels"]) for a in self.alerts()}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Alertmanager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def label_set(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))
