"""The CLI skeleton the three programs share (certmon.cli): exit codes of errors, one
line instead of a traceback, -v for the traceback, flags that override only what they
name; run through each program's own main()."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import pytest

from certmon import cli
from certmon.errors import ConfigError, TransportError
from certmon.pki import Policy
from collector.cli import main as collector_main
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
