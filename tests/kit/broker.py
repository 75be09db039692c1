"""A real Mosquitto for tests and benchmarks: free loopback ports, config in a tmp dir.

Owns: starting, restarting and killing mosquitto processes (`Mosquitto`, `Listener`),
free loopback ports and `wait_until`, the one way the kit and the tests wait for
something. certmon's own broker configuration is kit.brokerconf's (it renders the
shipped packaging/mosquitto/ files into `Listener`s this module runs).

Must not: touch the system broker (1883/8883 are never bound), issue certificates
(kit.pki does), or sleep a fixed time where a condition can be polled.

Real peers over mocks: the MQTT and TLS behaviour certmon depends on (ACLs,
`use_identity_as_username`, the chain a broker presents, restarts) is exactly what a
mock would get wrong.

Mosquitto quirks (2.0.11) this module encodes:
- Run as root it drops privileges to user "mosquitto", which then cannot read our
  0600 key files; `user <current user>` keeps it as us.
- `cafile/certfile/keyfile/require_certificate/use_identity_as_username/ciphers` are
  per listener whatever `per_listener_settings` says. With `per_listener_settings
  false` (the default here) `allow_anonymous` and `acl_file` are global: one ACL file
  covers every listener, and its leading `topic` lines are what anonymous clients get.
  A broker any of whose listeners carries its own `allow_anonymous` or a documented
  `section` (certmon's own configuration, kit.brokerconf) runs with
  `per_listener_settings true`; a listener that then says nothing about anonymous
  clients refuses them (Mosquitto 2's default), and one without `acl_file` lets its
  clients do anything.
- OpenSSL's security level refuses to *load* a SHA-1-signed or RSA-1024 certificate
  ("ca md too weak", "ee key too small") and mosquitto exits; a listener serving one
  needs `ciphers="DEFAULT:@SECLEVEL=0"` (the cipher string sets the whole context's
  level, so TLS 1.3 then works too). A cert/key mismatch also stops it from starting
  ("key values mismatch"), so `wrong_key` cannot be served at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "BrokerStartError",
    "Listener",
    "Mosquitto",
    "find_mosquitto",
    "free_port",
    "free_ports",
    "wait_until",
]

_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
SYSTEM_PORTS = frozenset({1883, 8883})  # a system broker may own these; never bind them


class BrokerStartError(RuntimeError):
    """Mosquitto did not become ready; the message carries its log."""


def find_mosquitto() -> str | None:
    """The mosquitto binary: $MOSQUITTO, then PATH, then sbin dirs PATH often lacks."""
    if env := os.environ.get("MOSQUITTO"):
        return env
    if found := shutil.which("mosquitto"):
        return found
    for directory in _SEARCH_DIRS:
        candidate = Path(directory) / "mosquitto"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    """A loopback port that was free a moment ago (bind port 0, read it, close)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: all sockets stay bound until every port
    is known, so the kernel cannot hand out the same port twice."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            if port not in SYSTEM_PORTS:
                ports.append(port)
        return ports


@dataclass(frozen=True)
class Listener:
    """One mosquitto listener on 127.0.0.1; `port=0` picks a free port at construction."""

    port: int = 0
    tls: bool = False
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    require_certificate: bool = False
    use_identity_as_username: bool = False
    protocol: Literal["mqtt", "websockets"] = "mqtt"
    # e.g. "DEFAULT:@SECLEVEL=0" to serve deliberately weak scenario certificates.
    ciphers: str | None = None
    tls_version: str | None = None  # "tlsv1.2" pins it; None lets OpenSSL negotiate
    extra: str = ""  # raw lines appended inside this listener's block
    # This listener's own anonymous rule; setting it runs the broker with
    # per_listener_settings true (see the module docstring).
    allow_anonymous: bool | None = None
    # A documented listener's lines after its `listener` line (kit.brokerconf renders
    # them from packaging/mosquitto/certmon.conf), written instead of the ones the
    # fields above describe; `tls` then only tells the readiness check to handshake.
    section: str | None = None

    @property
    def has_own_settings(self) -> bool:
        """Whether this listener needs `per_listener_settings true`."""
        return self.allow_anonymous is not None or self.section is not None

    def conf(self) -> str:
        lines = [f"listener {self.port} 127.0.0.1"]
        if self.section is not None:
            return "\n".join([*lines, self.section.strip()])
        lines.append(f"protocol {self.protocol}")
        if self.allow_anonymous is not None:
            lines.append(f"allow_anonymous {str(self.allow_anonymous).lower()}")
        if self.tls:
            if not (self.certfile and self.keyfile):
                raise ValueError(f"TLS listener on {self.port} needs certfile and keyfile")
            lines += [f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
            if self.cafile:
                lines.append(f"cafile {self.cafile}")
            lines.append(f"require_certificate {str(self.require_certificate).lower()}")
            if self.use_identity_as_username:
                lines.append("use_identity_as_username true")
            if self.ciphers:
                lines.append(f"ciphers {self.ciphers}")
            if self.tls_version:
                lines.append(f"tls_version {self.tls_version}")
        if self.extra:
            lines.append(self.extra.strip())
        return "\n".join(lines)


class Mosquitto:
    """One mosquitto process; ports are fixed at construction so `restart()` keeps them.

    Use as a context manager, or call `start()`/`stop()`. `log_text()` returns the
    broker's stderr (its log destination) so failing tests can show it.
    """

    def __init__(
        self,
        workdir: Path,
        listeners: Sequence[Listener],
        *,
        acl: str | None = None,
        allow_anonymous: bool | None = None,
        extra_conf: str = "",
        binary: str | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        binary = binary or find_mosquitto()
        if binary is None:
            raise FileNotFoundError("mosquitto binary not found (PATH, /usr/sbin, $MOSQUITTO)")
        if not listeners:
            raise ValueError("at least one listener")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Listeners given port 0 get a free port now and keep it across restarts.
        self._auto = [i for i, lst in enumerate(listeners) if not lst.port]
        self.listeners = list(listeners)
        self._assign_ports()
        self._started_once = False
        for lst in self.listeners:
            if lst.port in SYSTEM_PORTS:
                raise ValueError(f"port {lst.port} belongs to the system broker")
        self.per_listener_settings = any(lst.has_own_settings for lst in self.listeners)
        if self.per_listener_settings and (acl is not None or allow_anonymous is not None):
            # Mosquitto would apply global ones to no listener at all: say so here.
            raise ValueError("listeners carry their own settings (per_listener_settings "
                             "true): give acl and allow_anonymous per listener")
        self.acl = acl
        # Global mode: anonymous clients allowed unless told otherwise (plain test brokers).
        self.allow_anonymous = True if allow_anonymous is None else allow_anonymous
        self.extra_conf = extra_conf
        self.start_timeout_s = start_timeout_s
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.acl_path = workdir / "acl" if acl is not None else None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- configuration -------------------------------------------------------------
    @property
    def ports(self) -> list[int]:
        return [lst.port for lst in self.listeners]

    @property
    def port(self) -> int:
        """The first listener's port (the common one-listener case)."""
        return self.listeners[0].port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def conf_text(self) -> str:
        lines = [
            "# written by tests/kit/broker.py",
            f"user {getpass.getuser()}",  # as root it would otherwise become "mosquitto"
            f"per_listener_settings {str(self.per_listener_settings).lower()}",
            "persistence false",
            "log_dest stderr",
            "log_type all",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
            "set_tcp_nodelay true",
        ]
        if not self.per_listener_settings:
            lines.append(f"allow_anonymous {str(self.allow_anonymous).lower()}")
        if self.acl_path is not None:
            lines.append(f"acl_file {self.acl_path}")
        if self.extra_conf:
            lines.append(self.extra_conf.strip())
        blocks = ["\n".join(lines)] + [lst.conf() for lst in self.listeners]
        return "\n\n".join(blocks) + "\n"

    # -- lifecycle -----------------------------------------------------------------
    def _assign_ports(self) -> None:
        for i, port in zip(self._auto, free_ports(len(self._auto)), strict=True):
            self.listeners[i] = dataclasses.replace(self.listeners[i], port=port)

    def start(self) -> Mosquitto:
        """Start and wait until every listener serves. A first start that loses a
        port race (another process bound it between our probe and mosquitto's bind)
        retries with fresh ports; later starts keep the ports they have."""
        for attempt in range(3):
            try:
                return self._start()
            except BrokerStartError as exc:
                lost_race = "Address already in use" in str(exc) and self._auto
                if self._started_once or not lost_race or attempt == 2:
                    raise
                self._assign_ports()
        raise AssertionError("unreachable")

    def _start(self) -> Mosquitto:
        if self.running:
            return self
        self.conf_path.write_text(self.conf_text())
        if self.acl_path is not None and self.acl is not None:
            self.acl_path.write_text(self.acl)
        with self.log_path.open("ab") as log:
            log.write(f"--- starting {self.binary} -c {self.conf_path}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        self._started_once = True
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM and wait: a clean shutdown (clients see the connection close)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a goodbye (power loss, OOM killer)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._proc = None

    def restart(self) -> Mosquitto:
        """Stop and start again on the same ports (mosquitto sets SO_REUSEADDR)."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- readiness -----------------------------------------------------------------
    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        pending = list(self.listeners)
        while pending:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrokerStartError(
                    f"mosquitto exited with {self._proc.returncode} before it was ready\n"
                    f"--- config ---\n{self.conf_text()}--- log ---\n{self.log_text()}"
                )
            if _is_ready(pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"mosquitto not ready on 127.0.0.1:{pending[0].port} after "
                    f"{self.start_timeout_s}s\n--- config ---\n{self.conf_text()}"
                    f"--- log ---\n{self.log_text()}"
                )
            time.sleep(0.02)


def _is_ready(listener: Listener) -> bool:
    """TCP accepts, and for TLS a handshake completes (verification off: readiness
    only). The kernel accepts into the backlog before mosquitto's loop runs, so for
    TLS it is the handshake that proves mosquitto is serving."""
    try:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=1.0) as sock:
            if not listener.tls:
                return True
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # weak scenario certs are still "up"
            try:
                with ctx.wrap_socket(sock, server_hostname="localhost"):
                    return True
            except ssl.SSLError as exc:
                # TLS 1.2 + require_certificate: the server's alert proves it is up.
                return "alert" in str(exc).lower()
    except OSError:
        return False


def wait_until(predicate: Callable[[], object], timeout_s: float, step_s: float = 0.01) -> bool:
    """Poll `predicate` until it is truthy or `timeout_s` passes; never a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step_s)
