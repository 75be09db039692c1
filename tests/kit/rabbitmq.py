"""A private RabbitMQ node with its MQTT plugin, for interop tests: a second broker
implementation next to kit.broker's Mosquitto.

Owns starting and stopping one RabbitMQ node of our own (`RabbitMQ`): node name
`certmon-test-<port>@localhost`, every port free on loopback (AMQP, Erlang
distribution, MQTT over TLS, and a private epmd), its database, logs, config,
definitions and Erlang cookie ($HOME) in a tmp dir. Must not touch the machine's
RabbitMQ (5672, 25672, epmd on 4369, /var/lib/rabbitmq): nothing here uses the
defaults, and only the processes this module started are stopped.

The MQTT listener is the documented shape of a certmon broker: TLS with
`verify_peer` + `fail_if_no_peer_cert` against the fleet root, `mqtt.ssl_cert_login`
(the certificate's CN is the user name, as Mosquitto's `use_identity_as_username`),
no anonymous clients. RabbitMQ still needs each CN as a user: the definitions file
declares them with no password (they can log in only with their certificate) and
full rights on the default vhost; certmon's per-device ACL is not reproduced.

RabbitMQ 3.10 (Debian 12) quirks this module encodes:
- MQTT 3.1.1 only: a v5 CONNECT is closed, which paho reads as "unsupported
  protocol version" (the agent's fallback).
- Its script `/usr/sbin/rabbitmq-server` switches to /var/lib/rabbitmq (and user
  rabbitmq when root); /usr/lib/rabbitmq/bin/rabbitmq-server does not.
- Start-up is the slow part (several seconds); readiness is the MQTT TLS port
  accepting a connection, polled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from kit.broker import BrokerStartError, free_ports

__all__ = ["RabbitMQ", "find_rabbitmq_server"]

_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
START_TIMEOUT_S = 60.0


def find_rabbitmq_server() -> str | None:
    """The node start script that does not change user or directory, or None."""
    if env := os.environ.get("RABBITMQ_SERVER"):
        return env
    if os.access(_SERVER, os.X_OK):
        return str(_SERVER)
    found = shutil.which("rabbitmq-server")
    return found if found and not found.startswith("/usr/sbin") else None


class RabbitMQ:
    """One node; `mqtts_port` is its MQTT-over-TLS listener."""

    def __init__(self, workdir: Path, *, cacertfile: Path, certfile: Path, keyfile: Path,
                 users: Sequence[str], binary: str) -> None:
        self.workdir = workdir
        self.binary = binary
        self.cacertfile, self.certfile, self.keyfile = cacertfile, certfile, keyfile
        self.users = tuple(users)
        self.amqp_port, self.dist_port, self.mqtts_port, self.epmd_port = free_ports(4)
        self.nodename = f"certmon-test-{self.amqp_port}@localhost"
        self.log_dir = workdir / "log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.started_in_s: float | None = None

    def _env(self) -> dict[str, str]:
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        for name in ("mnesia", "log"):
            (self.workdir / name).mkdir(exist_ok=True)
        conf = self.workdir / "rabbitmq.conf"
        conf.write_text(self.conf_text())
        (self.workdir / "definitions.json").write_text(json.dumps(self.definitions()))
        plugins = self.workdir / "enabled_plugins"
        plugins.write_text("[rabbitmq_mqtt].\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update({
            "HOME": str(home),  # the Erlang cookie lives here, not in the service's home
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),  # a private epmd, not the machine's
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(conf),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_PID_FILE": str(self.workdir / "node.pid"),
            "RABBITMQ_LOGS": str(self.log_dir / "node.log"),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),
        })
        return env

    def conf_text(self) -> str:
        return "\n".join([
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
            "mqtt.listeners.tcp = none",
            f"mqtt.listeners.ssl.default = 127.0.0.1:{self.mqtts_port}",
            f"ssl_options.cacertfile = {self.cacertfile}",
            f"ssl_options.certfile = {self.certfile}",
            f"ssl_options.keyfile = {self.keyfile}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "mqtt.ssl_cert_login = true",
            "ssl_cert_login_from = common_name",
            "mqtt.allow_anonymous = false",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            f"load_definitions = {self.workdir / 'definitions.json'}",
            "log.console = false",
            "log.file.level = info",
            "",
        ])

    def definitions(self) -> dict[str, object]:
        return {
            "vhosts": [{"name": "/"}],
            "users": [{"name": u, "password_hash": "", "hashing_algorithm":
                       "rabbit_password_hashing_sha256", "tags": []} for u in self.users],
            "permissions": [{"user": u, "vhost": "/", "configure": ".*", "write": ".*",
                             "read": ".*"} for u in self.users],
        }

    def start(self) -> RabbitMQ:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "advanced.config").write_text("[].\n")
        out = (self.workdir / "server.out").open("ab")
        started = time.monotonic()
        # Its own process group: stop() ends the node, its epmd and helpers together.
        self._proc = subprocess.Popen([self.binary], env=self._env(), cwd=self.workdir,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        out.close()
        deadline = started + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerStartError(f"rabbitmq-server exited {self._proc.returncode}:\n"
                                       f"{self.log_text()[-3000:]}")
            if "Server startup complete" in self.log_text() and self._port_open():
                self.started_in_s = time.monotonic() - started
                return self
            time.sleep(0.2)
        self.stop()
        raise BrokerStartError(f"RabbitMQ not ready in {START_TIMEOUT_S:.0f} s:\n"
                               f"{self.log_text()[-3000:]}")

    def _port_open(self) -> bool:
        import socket

        with contextlib.closing(socket.socket()) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.mqtts_port)) == 0

    def stop(self, timeout_s: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # The node's epmd daemonises out of the group; ours listens on our port only.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"], timeout=5,
                           capture_output=True, env={**os.environ,
                                                     "ERL_EPMD_PORT": str(self.epmd_port)})

    def log_text(self) -> str:
        parts = []
        for path in (self.log_dir / "node.log", self.workdir / "server.out"):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def __enter__(self) -> RabbitMQ:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
