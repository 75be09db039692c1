"""An operator's broken config, seen through each program's `check-config`.

`certmon-agent check-config --config F` and `certmon-collector check-config --config
F` must exit 78 (EX_CONFIG, the unit's RestartPreventExitStatus) and print one line
per problem: `FILE:LINE: KEY: problem`. Each fixture in tests/data/config-faults/
breaks exactly one rule and carries the exact expected lines in `# expect:` comments
(FILE = the path as given, DIR = the fixture directory), so a fixture and its
message are read together. Files named `agent-*` are agent configs, `collector-*`
collector configs.

The loader itself is tested in tests/test_config.py; this is the programs' contract.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from collector.cli import main as collector_main

DATA = Path(__file__).resolve().parent / "data" / "config-faults"
FIXTURES = sorted(p.name for p in DATA.glob("*.toml"))
PROGRAMS: dict[str, tuple[str, Callable[[Sequence[str] | None], int]]] = {
    "agent": ("certmon-agent", agent_main), "collector": ("certmon-collector", collector_main)}
BIN = Path(sys.executable).parent


def expected_lines(name: str, shown_as: str) -> list[str]:
    raw = (DATA / name).read_bytes().decode("utf-8", errors="replace")
    return [line.removeprefix("# expect: ").replace("FILE", shown_as, 1)
            .replace("DIR", str(DATA)) for line in raw.splitlines()
            if line.startswith("# expect: ")]


@pytest.mark.parametrize("name", FIXTURES)
def test_each_broken_rule_exits_78_with_file_line_key_and_problem(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    prog, main = PROGRAMS[name.split("-", 1)[0]]
    monkeypatch.chdir(DATA)  # the path as an operator would type it
    assert main(["check-config", "--config", name]) == 78
    out, err = capsys.readouterr()
    lines = err.splitlines()
    expected = expected_lines(name, name)
    assert expected, f"{name} has no '# expect:' line"
    assert lines == [f"{prog}: {expected[0]}", *expected[1:]]
    assert out == ""


def test_every_fixture_breaks_exactly_one_rule() -> None:
    rules = [(DATA / n).read_bytes().split(b"\n", 1)[0] for n in FIXTURES]
    assert all(r.startswith(b"# Rule: ") for r in rules)
    assert len(FIXTURES) >= 40
    per_program = {n.split("-", 1)[0] for n in FIXTURES}
    assert per_program == {"agent", "collector"}


@pytest.mark.parametrize("program", ["agent", "collector"])
def test_a_missing_config_file_is_named(program: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    prog, main = PROGRAMS[program]
    missing = tmp_path / f"{program}.toml"
    assert main(["check-config", "--config", str(missing)]) == 78
    assert capsys.readouterr().err == (
        f"{prog}: {missing}: cannot read config file: No such file or directory\n")


@pytest.mark.parametrize("program", ["agent", "collector"])
def test_a_bad_flag_is_named_by_its_flag(program: str, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    prog, main = PROGRAMS[program]
    monkeypatch.chdir(DATA)
    config = "agent-url-scheme.toml" if program == "agent" else "collector-url-scheme.toml"
    # The flag fixes the file's broker URL, and is itself checked by the same rules.
    assert main(["check-config", "--config", config, "--broker", "mqtts://"]) == 78
    assert capsys.readouterr().err == (
        f"{prog}: --broker: mqtt.broker: has no host (e.g. mqtts://broker.example.net:8883)\n")


@pytest.mark.parametrize("program", ["agent", "collector"])
def test_the_installed_command_exits_78_and_a_fixed_file_exits_0(
    program: str, tmp_path: Path
) -> None:
    """The console script, as systemd runs it: exit status and stderr, end to end."""
    prog = PROGRAMS[program][0]
    name = f"{program}-url-scheme.toml"
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    done = subprocess.run([str(BIN / prog), "check-config", "--config", str(DATA / name)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 78, done.stderr
    assert done.stderr.splitlines() == [f"{prog}: {expected_lines(name, str(DATA / name))[0]}"]
    fixed = tmp_path / name
    fixed.write_text((DATA / name).read_text().replace("http://", "mqtts://")
                     .replace("ws://", "mqtts://")
                     .replace("readable.pem", str(DATA / "readable.pem")))
    done = subprocess.run([str(BIN / prog), "check-config", "--config", str(fixed)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert (done.returncode, done.stdout) == (0, f"{fixed}: OK\n"), done.stderr
