"""README.md's commands, run as a newcomer runs them, so a command that stops working
fails CI: every ```sh block of README.md (and of docs/deploy.md, the Deploy
walkthrough, once it exists), in order, against a demo PKI and a Mosquitto of the
test's own.

The marker convention (README.md, "Development", says it too): an HTML comment on the
line before a block, `<!-- readme-test: DIRECTIVE; DIRECTIVE … -->`, with
- `loopback`: the block names real hosts and system paths; `NAME.example:PORT` becomes
  the listener of the test's broker that port names (`LISTENERS`: it runs certmon's
  shipped configuration, packaging/mosquitto/), `127.0.0.1:9310` a free port, and
  `/etc/certmon/…`, `/var/lib/certmon-…` the same paths under the demo directory;
- `repo`: run in the checkout (default: the demo directory, which holds ca.pem,
  device.crt, device.key, broker-ca.pem, collector.crt, collector.key, fleet-root.pem);
- `skip COMMAND: reason`: commands starting with COMMAND are not run here, and the
  reason says where they are tested;
- `quiet`: the block's commands write files and may print nothing (openssl issuing a
  certificate); they must still exit 0 without a traceback.
An unmarked block runs verbatim; one naming a `.example` host or an /etc/certmon path
fails, so a new block that needs real hosts must be marked. `[--json]` runs a command
with and without the option, `[--json | --prometheus]` once per choice. A `… run`
(certmon-agent, certmon-collector) is a service: started in the background, waited
for until it did its first job (the collector: connected to its broker; an agent: its
first status in the collector's store), and stopped with SIGTERM, which must exit 0,
before the same program's next command or at the end. A check (`certmon-agent check`,
`certmon-collector report`, `certmon-scan`) must give a verdict (exit 0, 1 or 2, not 3
"could not look"); every other command exits 0; none prints a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import MosquittoFactory, missing
from kit.broker import free_port, wait_until
from kit.brokerconf import BrokerFiles, documented_broker
from kit.pki import Issued, PKIFactory, write_bundle

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "README.md", REPO / "docs" / "deploy.md")
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEVICE_ID = "gw-0001"
# A `NAME.example:PORT` of the README → the documented broker's listener on that port:
# 8883 the devices', 8884 the operations one (packaging/mosquitto/certmon.conf).
LISTENERS = {8883: 0, 8884: 1}
CHECKS = {("certmon-agent", "check"), ("certmon-collector", "report"), ("certmon-scan",)}
_MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
_OPTIONAL = re.compile(r"\[(--[^\]]*)\]")
_HOST = re.compile(r"\b[a-z0-9-]+\.example(?::(\d+))?")


@dataclass(frozen=True)
class Block:
    where: str  # "README.md:47"
    text: str
    directives: tuple[str, ...]

    @property
    def skips(self) -> dict[str, str]:
        pairs = (d[5:].partition(":") for d in self.directives if d.startswith("skip "))
        return {prefix.strip(): reason.strip() for prefix, _, reason in pairs}

    def commands(self) -> list[str]:
        joined = re.sub(r"\\\n\s*", " ", self.text)
        return [v for line in joined.splitlines() if shlex.split(line, comments=True)
                for v in variants(" ".join(shlex.split(line, comments=True)))]


def blocks(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            end = lines.index("```", i + 1)
            marker = _MARKER.match(lines[i - 1].strip()) if i else None
            directives = tuple(d.strip() for d in marker.group(1).split(";")) if marker else ()
            out.append(Block(f"{doc.name}:{i + 1}", "\n".join(lines[i + 1:end]), directives))
            i = end
        i += 1
    return out


def variants(command: str) -> list[str]:
    """`x [--json]` → x, x --json; `x [--json | --prometheus]` → x, x --json, x --prometheus."""
    match = _OPTIONAL.search(command)
    if match is None:
        return [command]
    head, tail = command[:match.start()].rstrip(), command[match.end():]
    choices = ["", *(c.strip() for c in match.group(1).split("|"))]
    return [v for c in choices for v in variants(" ".join(p for p in (head, c, tail.strip()) if p))]


@dataclass
class Demo:
    """The demo directory, the broker's listener ports and the collector's web port."""

    work: Path
    ports: list[int]
    web_port: int
    env: dict[str, str]
    services: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    transcript: list[str] = field(default_factory=list)

    def loopback(self, command: str) -> str:
        def host(m: re.Match[str]) -> str:
            port = int(m.group(1) or 8883)
            assert port in LISTENERS, f"README names {m.group(0)}: add its port to LISTENERS"
            return f"127.0.0.1:{self.ports[LISTENERS[port]]}"
        command = _HOST.sub(host, command).replace("127.0.0.1:9310", f"127.0.0.1:{self.web_port}")
        for prefix in ("/etc/certmon/", "/var/lib/certmon-"):
            command = command.replace(prefix, f"{self.work}{prefix}")
        return command

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.work}/var/lib/certmon-collector/certmon.db"


def build_demo(work: Path, factory: PKIFactory, mosquitto: MosquittoFactory) -> Demo:
    root = factory.root("readme Fleet Root")
    devices = factory.intermediate(root, "readme devices")
    operations = factory.root("readme Operations CA")  # issues no device's certificate
    broker_ca = factory.root("readme Broker CA")
    server = factory.leaf(broker_ca, "localhost", usage="server", sans=("localhost", "127.0.0.1"))
    etc = work / "etc" / "certmon"
    device = factory.leaf(devices, DEVICE_ID)
    for where in (work, etc):  # the relative names and the /etc/certmon ones: same files
        write_bundle(where / "ca.pem", [root, broker_ca])
        _write_as(device, where, "device")
    _write_as(factory.leaf(operations, "collector"), work, "collector")
    write_bundle(work / "broker-ca.pem", [broker_ca])
    server_cert, server_key = server.write(work / "broker-tls")
    documented = documented_broker(work / "broker-conf", BrokerFiles(
        fleet_ca=write_bundle(work / "fleet-root.pem", [root]),
        operations_ca=write_bundle(work / "broker-tls" / "operations-ca.pem", [operations]),
        certfile=server_cert, keyfile=server_key))
    broker = mosquitto(documented.listeners, extra_conf=documented.global_conf)
    ports = [lst.port for lst in broker.listeners]
    (etc / "agent.toml").write_text(f"""\
[mqtt]
broker = "mqtts://127.0.0.1:{ports[0]}"

[tls]
ca_bundle = "{etc}/ca.pem"
cert = "{etc}/device.crt"
key = "{etc}/device.key"

[agent]
state_dir = "{work}/var/lib/certmon-agent"
""")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return Demo(work, ports, free_port(), env)


def _write_as(issued: Issued, directory: Path, name: str) -> None:
    cert, key = issued.write(directory, chain=True)
    cert.rename(directory / f"{name}.crt")
    key.rename(directory / f"{name}.key")


# --------------------------------------------------------------------------- services


def collector_ready(demo: Demo) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{demo.web_port}/api/health",
                                    timeout=2) as resp:
            return bool(json.load(resp).get("broker_connected"))
    except OSError:
        return False


def agent_ready(demo: Demo) -> bool:
    from collector.store import StoreError, open_store

    if not Path(demo.db_url[len("sqlite://"):]).exists():
        return False
    try:
        store = open_store(demo.db_url)
    except StoreError:
        return False
    try:
        return store.device(DEVICE_ID) is not None
    except StoreError:
        return False
    finally:
        store.close()


READY: dict[str, Callable[[Demo], bool]] = {
    "certmon-collector": collector_ready, "certmon-agent": agent_ready}


def start_service(demo: Demo, argv: list[str], written: str) -> None:
    proc = subprocess.Popen(argv, cwd=demo.work, env=demo.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    demo.services[argv[0]] = proc
    ready = READY[argv[0]]
    wait_until(lambda: proc.poll() is not None or ready(demo), timeout_s=20, step_s=0.1)
    assert proc.poll() is None and ready(demo), (
        f"{written}: service `{shlex.join(argv)}` not ready: {_stop(proc)}")
    demo.transcript.append(f"{written}\n    started as a service; ready")


def stop_service(demo: Demo, program: str) -> None:
    proc = demo.services.pop(program)
    rc_out = _stop(proc)
    demo.transcript.append(f"    {program} stopped by SIGTERM: {rc_out.splitlines()[0]}")
    assert proc.returncode == 0, rc_out


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return f"exit {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"


# --------------------------------------------------------------------------- the test


def readme_commands() -> Iterator[tuple[Block, str]]:
    for doc in DOCS:
        if doc.exists():
            for block in blocks(doc):
                for command in block.commands():
                    yield block, command


def test_markers_are_consistent() -> None:
    found = list(readme_commands())
    assert len(found) >= 12, "README lost its command blocks?"
    by_block: dict[str, list[str]] = {}
    for block, command in found:
        by_block.setdefault(block.where, []).append(command)
        known = {"loopback", "repo", "quiet"}
        bad = [d for d in block.directives if d not in known and not d.startswith("skip ")]
        assert not bad, f"{block.where}: unknown readme-test directive {bad}"
        assert "…" not in command, f"{block.where}: `{command}` is not runnable as written"
        if "loopback" not in block.directives:
            assert not _HOST.search(command) and "/etc/certmon" not in command, (
                f"{block.where}: `{command}` needs real hosts: mark the block loopback")
    for block, _ in found:
        for prefix in block.skips:
            assert any(c.startswith(prefix) for c in by_block[block.where]), (
                f"{block.where}: skip {prefix!r} matches no command (a stale marker)")
    assert variants("a [--json | --prometheus] b") == ["a b", "a --json b", "a --prometheus b"]


def test_every_readme_command_works(tmp_path: Path, pki_now: object,
                                    mosquitto_factory: MosquittoFactory) -> None:
    if not SYSTEM_BUNDLE.exists():
        missing(f"{SYSTEM_BUNDLE} (the README's first command reads it; Debian: ca-certificates)")
    if not (REPO / ".venv" / "bin" / "python").exists():
        missing("the checkout's .venv (the README's Development commands use it; make test makes it)")
    demo = build_demo(tmp_path / "demo", PKIFactory(pki_now), mosquitto_factory)  # type: ignore[arg-type]
    try:
        for block, command in readme_commands():
            run_one(demo, block, command)
        for program in list(demo.services):
            stop_service(demo, program)
    finally:
        for proc in demo.services.values():
            _stop(proc)
        transcript = "\n".join(demo.transcript)
        (tmp_path / "readme-transcript.txt").write_text(transcript + "\n")
        print(transcript)


def run_one(demo: Demo, block: Block, command: str) -> None:
    skip = next((r for p, r in block.skips.items() if command.startswith(p)), None)
    if skip is not None:
        demo.transcript.append(f"{block.where}: {command}\n    not run here: {skip}")
        return
    written = command  # the transcript shows the README's words
    if "loopback" in block.directives:
        command = demo.loopback(command)
    argv = shlex.split(command)
    if argv[0] in demo.services:
        stop_service(demo, argv[0])
    if argv[0] in READY and argv[1:2] == ["run"]:
        start_service(demo, argv, f"{block.where}: {written}")
        return
    cwd = REPO if "repo" in block.directives else demo.work
    started = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, env=demo.env, capture_output=True, text=True,
                          timeout=120)
    first = (done.stdout.strip().splitlines() or [""])[0][:150]
    demo.transcript.append(f"{block.where}: {written}\n    exit {done.returncode} "
                           f"({time.monotonic() - started:.1f} s): {first}")
    shown = f"{block.where}: `{command}` exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, shown
    assert done.stdout.strip() or "quiet" in block.directives, shown
    is_check = any(tuple(argv[:len(c)]) == c for c in CHECKS)
    assert done.returncode in ({0, 1, 2} if is_check else {0}), shown
