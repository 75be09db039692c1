"""The CLI skeleton the three programs share (certmon.cli): exit codes of errors, one
line instead of a traceback, -v for the traceback, flags that override only what they
name; run through each program's own main()."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kit.broker import Listener, Mosquitto, free_port
from kit.pki import PKIFactory, write_bundle

from agent import cli as agent_cli
from agent.cli import main as agent_main
from certmon import cli
from certmon.errors import ConfigError, TransportError
from certmon.pki import Policy
from collector import cli as collector_cli
from collector.cli import main as collector_main
from scanner import cli as scan_cli
from scanner.cli import main as scan_main


def parser() -> argparse.ArgumentParser:
    p = cli.new_parser("certmon-x")
    cli.add_verbose(p)
    return p


def fail(exc: Exception) -> int:
    raise exc


def test_a_config_error_exits_78_with_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    problems = "a.toml:3: mqtt.broker: bad\na.toml:9: tls.key: missing"
    assert cli.run("certmon-x", parser(), [], lambda _: fail(ConfigError(problems))) == 78
    assert capsys.readouterr().err.splitlines() == ["certmon-x: a.toml:3: mqtt.broker: bad",
                                                    "a.toml:9: tls.key: missing"]


def test_a_certmon_error_is_one_line_and_the_commands_code_unless_verbose(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def boom(_: argparse.Namespace) -> int:
        raise TransportError("broker.example:8883: connection refused")

    assert cli.run("certmon-x", parser(), [], boom, failure_code=lambda _: 3) == 3
    assert capsys.readouterr().err == "certmon-x: broker.example:8883: connection refused\n"
    assert cli.run("certmon-x", parser(), ["-v"], boom) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "in boom" in err
    assert err.endswith("certmon-x: broker.example:8883: connection refused\n")


def test_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(ZeroDivisionError):
        cli.run("certmon-x", parser(), [], lambda _: 1 // 0)


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from certmon import __version__

    for main in (collector_main, scan_main):
        with pytest.raises(SystemExit) as done:
            main(["--version"])
        assert done.value.code == 0
        assert capsys.readouterr().out == f"certmon {__version__}\n"


def test_a_store_that_cannot_be_read_makes_report_unknown_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Real SQLite: a database file that is not one. `report` is a Nagios check: UNKNOWN.
    db = tmp_path / "not-a.db"
    db.write_bytes(b"this is not an SQLite database, it is text" * 100)
    assert collector_main(["report", "--db", f"sqlite:///{db}"]) == 3
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("certmon-collector: ") and "Traceback" not in line


def test_thresholds_replace_only_what_a_flag_names() -> None:
    configured = Policy(warn_days=40, crit_days=9, warn_fraction=0.2, min_rsa_bits=4096,
                        min_ec_bits=384)
    p = parser()
    cli.add_threshold_flags(p)
    assert cli.with_thresholds(configured, p.parse_args([])) == configured
    assert cli.with_thresholds(configured, p.parse_args(["--warn-days", "10"])) == Policy(
        warn_days=10, crit_days=9, warn_fraction=0.2, min_rsa_bits=4096, min_ec_bits=384)


def test_stop_signals_call_stop() -> None:
    stopped: list[int] = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        cli.on_stop_signals(lambda: stopped.append(1))
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    assert stopped == [1, 1]


# --- what a newcomer provokes: usage, --help, a store that is not there ---------------

PROGRAMS = {"certmon-agent": agent_main, "certmon-collector": collector_main,
            "certmon-scan": scan_main}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_a_usage_error_is_unknown_in_every_program(
    program: str, capsys: pytest.CaptureFixture[str],
) -> None:
    # argparse's own 2 would read as CRITICAL to Nagios; every program says 3.
    argv = ["--no-such-flag"] if program == "certmon-scan" else ["report" if program ==
            "certmon-collector" else "check", "--no-such-flag"]
    with pytest.raises(SystemExit) as done:
        PROGRAMS[program](argv)
    assert done.value.code == 3
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for build in (agent_cli.build_parser, collector_cli.build_parser, scan_cli.build_parser):
        top = build()
        found.append((top.prog, top))
        for action in top._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.extend((p.prog, p) for p in action.choices.values())
    return found


def test_every_help_ends_with_two_or_three_examples_that_parse() -> None:
    parsers = _parsers()
    assert len(parsers) == 1 + 6 + 1 + 3 + 1  # agent + 6 commands, collector + 3, scan
    for prog, parser in parsers:
        text = parser.format_help().rstrip("\n").splitlines()
        start = text.index("examples:")
        examples = [line.strip() for line in text[start + 1:]]
        assert 2 <= len(examples) <= 3, (prog, examples)
        program = prog.split()[0]
        top = next(p for name, p in parsers if name == program)
        for example in examples:
            argv = shlex.split(example, comments=True)
            assert " ".join(argv[:len(prog.split())]) == prog or prog == program, example
            top.parse_args(argv[1:])  # a renamed or removed flag exits 3 here


def test_report_on_a_store_that_is_not_there_says_so_in_one_line_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    missing_db = tmp_path / "path" / "that" / "does" / "not" / "exist.db"
    expected = {
        f"sqlite:///{missing_db}": f"no certmon database at {missing_db}: it does not exist "
                                   "(check --db; `certmon-collector run` creates it on its "
                                   "first start)",
        str(missing_db): f"--db '{missing_db}' is not a store URL: for that file write "
                         f"sqlite:///{str(missing_db).lstrip('/')} (or postgresql://…",
        f"mysql://{tmp_path}": "unsupported store URL scheme 'mysql'",
        f"sqlite:///{tmp_path}": f"no certmon database at {tmp_path}: it is a directory",
    }
    for url, message in expected.items():
        assert collector_main(["report", "--db", url]) == 3, url
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"certmon-collector: {message}"), line
    assert not (tmp_path / "path").exists()  # connecting would have created it


def test_report_on_an_empty_or_locked_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from collector.store import open_store

    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert collector_main(["report", "--db", f"sqlite:///{empty}"]) == 3
    assert capsys.readouterr().err == (
        f"certmon-collector: sqlite:///{empty} is not a certmon database (no devices table): "
        "point --db at the collector's store; `certmon-collector run` creates the tables on "
        "its first start\n")
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    store = open_store(url)
    store.migrate()
    store.close()
    assert collector_main(["report", "--db", url, "--json"]) == 3
    done = capsys.readouterr()
    assert done.out == "" and done.err.startswith(
        f"certmon-collector: {url} holds no devices yet: no agent status has been stored")
    # Real SQLite, another connection holding the database's exclusive lock.
    holder = sqlite3.connect(tmp_path / "fresh.db", isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        assert collector_main(["report", "--db", url]) == 3
        assert time.monotonic() - started < collector_cli.REPORT_BUSY_TIMEOUT_S + 5
    finally:
        holder.close()
    assert capsys.readouterr().err == (
        f"certmon-collector: {url}: the database is locked by another process (waited 3 s); "
        "try again, or look for a process holding a transaction open (a sqlite3 shell?)\n")


def test_a_library_error_of_several_lines_is_printed_as_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def boom(_: argparse.Namespace) -> int:
        raise TransportError('connection to server at "127.0.0.1", port 1 failed: refused\n'
                             "\tIs the server running on that host?")

    assert cli.run("certmon-x", parser(), [], boom) == 1
    assert capsys.readouterr().err == ('certmon-x: connection to server at "127.0.0.1", port 1 '
                                       "failed: refused Is the server running on that host?\n")


def _as_nobody(fn: Callable[[], int]) -> tuple[int, str]:
    """Run `fn` where file permissions bite: as ourselves when we are not root, else in a
    forked child that dropped to `nobody` (root reads everything). (exit code, stderr+stdout).
    `fn` runs once here first: the child cannot import what it still lacks, since the
    interpreter's own files may be out of nobody's reach (a pyenv under /root)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fn()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.dup2(write, 1)
            os.dup2(write, 2)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            code = fn()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            traceback.print_exc()
            os._exit(99)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        output = pipe.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), output


def test_permission_denied_is_one_line_naming_the_file_and_what_to_do(tmp_path: Path) -> None:
    secret = tmp_path / "locked"
    secret.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o755)
    (secret / "ca.pem").write_text("not read")
    (secret / "certmon.db").write_text("not read")
    code, out = _as_nobody(lambda: agent_main(["check", "--ca-bundle", str(secret / "ca.pem")]))
    assert code == 3, out
    assert (f"{secret / 'ca.pem'}: cannot read: Permission denied (run as a user that may read "
            "it, e.g. root or the file's group)") in out
    code, out = _as_nobody(lambda: collector_main(["report", "--db",
                                                   f"sqlite:///{secret / 'certmon.db'}"]))
    assert code == 3 and "Traceback" not in out, out
    assert out == (f"certmon-collector: {secret / 'certmon.db'}: permission denied (SQLite "
                   "needs to write the file and its directory even to read in WAL mode; run "
                   "the report as the collector's user)\n")


def test_once_says_why_the_broker_did_not_answer(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
) -> None:
    """paho says only "connect failed"; `once` probes the broker and names the cause:
    nothing listening, or a plain-MQTT port given as mqtts://."""
    factory = PKIFactory(datetime.now(UTC))
    root = factory.root("Once Root")
    cert, key = factory.leaf(root, "gw-once").write(tmp_path)
    bundle = write_bundle(tmp_path / "ca.pem", [root])
    plain = mosquitto_factory([Listener()]).ports[0]
    refused = free_port()
    for port, cause in ((refused, f"TCP connect to 127.0.0.1 port {refused}: Connection refused"),
                        (plain, f"127.0.0.1:{plain} does not speak TLS: it answers MQTT without "
                                "TLS (CONNACK 0 to a plain CONNECT); use mqtt:// for it")):
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "once", "--broker", f"mqtts://127.0.0.1:{port}",
             "--ca-bundle", str(bundle), "--cert", str(cert), "--key", str(key),
             "--state-dir", str(tmp_path / "state"), "--timeout-s", "1"],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("certmon-agent: ")]
        assert cause in line and "stays spooled in" in line, line
