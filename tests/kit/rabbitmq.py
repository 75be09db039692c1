"""Private RabbitMQ nodes with their MQTT plugin, for interop tests: a second broker
implementation next to kit.broker's Mosquitto.

Owns starting and stopping RabbitMQ nodes of our own: one node (`RabbitMQ`), or a
cluster of them (`RabbitMQCluster`: the first node the seed, the others joined to it
with `rabbitmqctl join_cluster`). Each node has its node name
`certmon-test-<port>@localhost`, every port free on loopback (AMQP, Erlang
distribution, MQTT over TLS), its database, logs, config, definitions and $HOME (the
Erlang cookie) in a tmp dir; the nodes of a cluster share one per-test cookie and one
private epmd (a node finds its peers' distribution ports there). Must not touch the
machine's RabbitMQ (5672, 25672, epmd on 4369, /var/lib/rabbitmq): nothing here uses
the defaults, and only the processes this module started are stopped.

The MQTT listener is the documented shape of a certmon broker: TLS with
`verify_peer` + `fail_if_no_peer_cert` against the fleet root, `mqtt.ssl_cert_login`
(the certificate's CN is the user name, as Mosquitto's `use_identity_as_username`),
no anonymous clients. RabbitMQ still needs each CN as a user: the definitions file
declares them with no password (they can log in only with their certificate) and
full rights on the default vhost; certmon's per-device ACL is not reproduced. Users
live in the cluster-wide database, so a cluster defines them on its seed only. TLS
and certificate login are per node: each node's rabbitmq.conf carries them.

RabbitMQ 3.10 (Debian 12) quirks this module encodes:
- MQTT 3.1.1 only: a v5 CONNECT is closed, which paho reads as "unsupported
  protocol version" (the agent's fallback).
- Its script `/usr/sbin/rabbitmq-server` switches to /var/lib/rabbitmq (and user
  rabbitmq when root); /usr/lib/rabbitmq/bin/rabbitmq-server does not (nor does
  its rabbitmqctl there).
- Start-up is the slow part (several seconds: the MQTT plugin waits 3-6 s for
  cluster peers before electing its client-id tracker's Raft leader); readiness is
  "Server startup complete" in the log and the MQTT TLS port accepting a
  connection, polled. The nodes of a cluster boot side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from kit.broker import BrokerStartError, free_ports

__all__ = ["RabbitMQ", "RabbitMQCluster", "find_rabbitmq_server"]

_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
START_TIMEOUT_S = 60.0
CTL_TIMEOUT_S = 60.0


def find_rabbitmq_server() -> str | None:
    """The node start script that does not change user or directory, or None."""
    if env := os.environ.get("RABBITMQ_SERVER"):
        return env
    if os.access(_SERVER, os.X_OK):
        return str(_SERVER)
    found = shutil.which("rabbitmq-server")
    return found if found and not found.startswith("/usr/sbin") else None


class RabbitMQ:
    """One node; `mqtts_port` is its MQTT-over-TLS listener. `ports` (AMQP,
    distribution, MQTT TLS, epmd) and `cookie` are given by a cluster; a lone node
    picks its own and owns its epmd."""

    def __init__(self, workdir: Path, *, cacertfile: Path, certfile: Path, keyfile: Path,
                 users: Sequence[str], binary: str, ports: Sequence[int] | None = None,
                 cookie: str | None = None) -> None:
        self.workdir = workdir
        self.binary = binary
        self.cacertfile, self.certfile, self.keyfile = cacertfile, certfile, keyfile
        self.users = tuple(users)
        self._owns_epmd = ports is None
        self.amqp_port, self.dist_port, self.mqtts_port, self.epmd_port = (
            ports if ports is not None else free_ports(4))
        self.cookie = cookie or secrets.token_hex(20)
        self.nodename = f"certmon-test-{self.amqp_port}@localhost"
        self.log_dir = workdir / "log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_mono: float | None = None
        self.started_in_s: float | None = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update({
            "HOME": str(self.workdir / "home"),  # the Erlang cookie lives here
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),  # a private epmd, not the machine's
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.workdir / "node.pid"),
            "RABBITMQ_LOGS": str(self.log_dir / "node.log"),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),
        })
        return env

    def _write_files(self) -> None:
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        for name in ("mnesia", "log"):
            (self.workdir / name).mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)  # Erlang refuses a cookie file others may read
        (self.workdir / "rabbitmq.conf").write_text(self.conf_text())
        (self.workdir / "definitions.json").write_text(json.dumps(self.definitions()))
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "advanced.config").write_text("[].\n")

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

    # ------------------------------------------------------------ lifecycle

    def launch(self) -> None:
        """Start the node's process; `wait_ready` waits for it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_files()
        out = (self.workdir / "server.out").open("ab")
        self._started_mono = time.monotonic()
        # Its own process group: stop() ends the node and its helpers together.
        self._proc = subprocess.Popen([self.binary], env=self._env(), cwd=self.workdir,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        out.close()

    def wait_ready(self) -> RabbitMQ:
        assert self._proc is not None and self._started_mono is not None, "not launched"
        deadline = self._started_mono + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerStartError(f"rabbitmq-server exited {self._proc.returncode}:\n"
                                       f"{self.log_text()[-3000:]}")
            if "Server startup complete" in self.log_text() and self.port_open():
                self.started_in_s = time.monotonic() - self._started_mono
                return self
            time.sleep(0.2)
        self.stop()
        raise BrokerStartError(f"RabbitMQ not ready in {START_TIMEOUT_S:.0f} s:\n"
                               f"{self.log_text()[-3000:]}")

    def start(self) -> RabbitMQ:
        self.launch()
        return self.wait_ready()

    def ctl(self, *args: str, timeout_s: float = CTL_TIMEOUT_S) -> str:
        """`rabbitmqctl -n <this node> args…` (stdout); BrokerStartError on failure."""
        rabbitmqctl = str(Path(self.binary).with_name("rabbitmqctl"))
        try:
            done = subprocess.run([rabbitmqctl, "-n", self.nodename, *args], env=self._env(),
                                  cwd=self.workdir, capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BrokerStartError(f"rabbitmqctl {' '.join(args)}: no answer in "
                                   f"{timeout_s:.0f} s") from exc
        if done.returncode != 0:
            raise BrokerStartError(f"rabbitmqctl {' '.join(args)} exited {done.returncode}:\n"
                                   f"{done.stdout}{done.stderr}\n{self.log_text()[-2000:]}")
        return done.stdout

    def join_cluster(self, seed: RabbitMQ) -> None:
        """Make this running node a member of `seed`'s cluster (the documented steps:
        stop the app, reset, join, start it again), then wait for its MQTT port."""
        self.ctl("stop_app")
        self.ctl("reset")
        self.ctl("join_cluster", seed.nodename)
        self.ctl("start_app")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.port_open():
            if time.monotonic() > deadline:
                raise BrokerStartError(f"{self.nodename}: MQTT port closed after joining:\n"
                                       f"{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def port_open(self) -> bool:
        with contextlib.closing(socket.socket()) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.mqtts_port)) == 0

    def stop(self, timeout_s: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._owns_epmd:
            kill_epmd(self.epmd_port)

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


def kill_epmd(port: int) -> None:
    """Stop the epmd on our private `port` (it daemonises out of the node's process
    group); the machine's epmd on 4369 is never asked."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["epmd", "-port", str(port), "-kill"], timeout=5, capture_output=True,
                       env={**os.environ, "ERL_EPMD_PORT": str(port)})


class RabbitMQCluster:
    """`count` nodes, one cookie and one private epmd: all boot side by side, then
    each node after the first joins the first (`rabbitmqctl join_cluster`).
    `started_in_s`: from the first launch to the last join."""

    def __init__(self, workdir: Path, *, count: int = 2, cacertfile: Path, certfile: Path,
                 keyfile: Path, users: Sequence[str], binary: str) -> None:
        ports = free_ports(3 * count + 1)
        self.epmd_port = ports[-1]
        cookie = secrets.token_hex(20)
        # Users only on the seed: the others' databases are reset when they join and
        # take the cluster's, so a login on any node proves the users are shared.
        self.nodes = tuple(
            RabbitMQ(workdir / f"node-{i}", cacertfile=cacertfile, certfile=certfile,
                     keyfile=keyfile, users=users if i == 0 else (), binary=binary,
                     cookie=cookie, ports=(*ports[3 * i:3 * i + 3], self.epmd_port))
            for i in range(count))
        self.started_in_s: float | None = None

    def start(self) -> RabbitMQCluster:
        started = time.monotonic()
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                node.wait_ready()
            for node in self.nodes[1:]:
                node.join_cluster(self.nodes[0])
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - started
        return self

    def running_nodes(self) -> list[str]:
        """The running members as the seed's `cluster_status` lists them."""
        status = json.loads(self.nodes[0].ctl("cluster_status", "--formatter", "json"))
        return sorted(status["running_nodes"])

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        kill_epmd(self.epmd_port)

    def log_text(self) -> str:
        return "\n".join(f"--- {n.nodename}\n{n.log_text()[-3000:]}" for n in self.nodes)

    def __enter__(self) -> RabbitMQCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
