"""The renewal policy, hook contract and file swap, without a broker: each
`[renewal]` key by its effect, the jitter's determinism, backoff, the clock rule."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import RenewalConfig
from agent.renewal.attempt import (
    AttemptResult,
    load_state,
    policy_of,
    recorded,
    renewal_lock,
    save_state,
)
from agent.renewal.hook import (
    OUTPUT_MAX_BYTES,
    HookOutput,
    HookPaths,
    clean_stderr,
    read_output,
    run_hook,
)
from agent.renewal.install import install_pair, previous_path
from agent.renewal.policy import (
    AttemptState,
    RenewalPolicy,
    decide,
    jitter_share,
    renewal_point,
)
from certmon.config import loads
from certmon.errors import ConfigError
from certmon.pki import CertFacts

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def facts(days: float = 90, serial: str = "0a1b", sha: str = "a" * 64) -> CertFacts:
    return CertFacts(subject="CN=gw-1", issuer="CN=ca", serial_hex=serial, sha256=sha,
                     not_before=T0, not_after=T0 + timedelta(days=days), key_type="EC",
                     key_bits=256, signature_algorithm="ecdsa-with-SHA256",
                     signature_hash="sha256", is_ca=False, is_self_issued=False, ski=None,
                     aki=None, sans=(), common_name="gw-1")


NO_JITTER = RenewalPolicy(jitter_fraction=0)


def test_default_renews_at_two_thirds_of_the_lifetime() -> None:
    assert renewal_point(facts(90), "gw-1", NO_JITTER) == T0 + timedelta(days=60)
    assert policy_of(RenewalConfig()).at_lifetime_fraction == pytest.approx(2 / 3)


def test_days_before_alone_and_the_earlier_point_wins() -> None:
    only_days = RenewalPolicy(at_lifetime_fraction=0, days_before=10, jitter_fraction=0)
    assert renewal_point(facts(90), "gw-1", only_days) == T0 + timedelta(days=80)
    both = RenewalPolicy(at_lifetime_fraction=0.9, days_before=30, jitter_fraction=0)
    assert renewal_point(facts(90), "gw-1", both) == T0 + timedelta(days=60)  # 30 d before
    both = RenewalPolicy(at_lifetime_fraction=0.5, days_before=30, jitter_fraction=0)
    assert renewal_point(facts(90), "gw-1", both) == T0 + timedelta(days=45)  # half-life


def test_jitter_is_fixed_per_device_and_serial_and_only_earlier() -> None:
    policy = RenewalPolicy(jitter_fraction=0.1)
    base = T0 + timedelta(days=60)
    a = renewal_point(facts(90), "gw-1", policy)
    assert a == renewal_point(facts(90), "gw-1", policy)  # reproducible
    assert base - timedelta(days=9) <= a <= base
    points = {renewal_point(facts(90), f"gw-{i}", policy) for i in range(50)}
    assert len(points) == 50  # a fleet spreads out
    assert min(points) < base - timedelta(days=6) and max(points) > base - timedelta(days=3)
    assert renewal_point(facts(90, serial="ffee"), "gw-1", policy) != a  # a new cert: anew
    assert jitter_share("gw-1", "0A1B") == jitter_share("gw-1", "0a1b")


def test_decision_not_due_then_due() -> None:
    cert = facts(90)
    early = decide(cert, "gw-1", T0 + timedelta(days=59), NO_JITTER, AttemptState(),
                   is_clock_ok=True)
    assert (early.is_due, early.should_attempt, early.next_attempt_at) == (
        False, False, T0 + timedelta(days=60))
    due = decide(cert, "gw-1", T0 + timedelta(days=61), NO_JITTER, AttemptState(),
                 is_clock_ok=True)
    assert (due.is_due, due.should_attempt, due.reason) == (True, True, "due")
    forced = decide(cert, "gw-1", T0, NO_JITTER, AttemptState(), is_clock_ok=True, force=True)
    assert forced.should_attempt and not forced.is_due


def test_never_while_the_clock_is_known_wrong_even_forced() -> None:
    for force in (False, True):
        d = decide(facts(90), "gw-1", T0 + timedelta(days=70), NO_JITTER, AttemptState(),
                   is_clock_ok=False, force=force)
        assert d.is_due and not d.should_attempt and d.next_attempt_at is None
        assert "clock" in d.reason


def test_backoff_doubles_from_retry_min_to_retry_max() -> None:
    config = loads(RenewalConfig, "retry_min_s = 60\nretry_max_s = 200\n")
    policy = policy_of(config)
    cert, now = facts(90), T0 + timedelta(days=70)
    waits = []
    for failures in (1, 2, 3, 4):
        state = AttemptState(cert.sha256, now, "failed", "x", failures)
        d = decide(cert, "gw-1", now, policy, state, is_clock_ok=True)
        assert not d.should_attempt and d.next_attempt_at is not None
        waits.append((d.next_attempt_at - now).total_seconds())
        assert decide(cert, "gw-1", d.next_attempt_at, policy, state,
                      is_clock_ok=True).should_attempt
    assert waits == [60, 120, 200, 200]
    # Failures of a previous certificate do not hold back the current one.
    old = AttemptState("b" * 64, now, "failed", "x", 5)
    assert decide(cert, "gw-1", now, policy, old, is_clock_ok=True).should_attempt


def test_state_round_trips_and_counts_consecutive_failures(tmp_path: Path) -> None:
    assert load_state(tmp_path) == AttemptState()
    s1 = recorded(AttemptState(), "a" * 64, T0, AttemptResult(False, "hook exited 1"))
    s2 = recorded(s1, "a" * 64, T0 + timedelta(minutes=5), AttemptResult(False, "again"))
    assert (s2.failures, s2.outcome, s2.reason) == (2, "failed", "again")
    save_state(tmp_path, s2)
    assert load_state(tmp_path) == s2
    ok = recorded(s2, "a" * 64, T0, AttemptResult(True, "installed", "c" * 64))
    assert (ok.cert_sha256, ok.failures, ok.outcome) == ("c" * 64, 0, "renewed")
    (tmp_path / "renewal.json").write_text("{not json")
    assert load_state(tmp_path) == AttemptState()


@pytest.mark.parametrize(("toml", "problem"), [
    ("enabled = true\n", "renewal.command: is required when renewal is enabled"),
    ("at_lifetime_fraction = 0\n", "both 0"),
    ("retry_min_s = 500\nretry_max_s = 100\n", "must not exceed retry_max_s (100)"),
    ("command = [\"\"]\n", "must not be empty"),
])
def test_config_rules(toml: str, problem: str) -> None:
    from agent.config import AgentConfig

    base = ('[mqtt]\nbroker = "mqtts://b"\n[tls]\nca_bundle = "c"\ncert = "c"\nkey = "k"\n'
            "[renewal]\n")
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        loads(AgentConfig, base + toml, check_files=False)


# --------------------------------------------------------------------------- hook


def hook_paths(tmp_path: Path) -> HookPaths:
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    return HookPaths("gw-1", tmp_path / "c.pem", tmp_path / "k.pem", work / "cert.pem",
                     work / "key.pem")


def test_hook_sees_the_contract_environment_and_no_shell(tmp_path: Path) -> None:
    paths = hook_paths(tmp_path)
    script = ("import os; open(os.environ['CERTMON_NEW_CERT'], 'w').write("
              "'|'.join(os.environ[k] for k in ('CERTMON_DEVICE_ID', 'CERTMON_CERT', "
              "'CERTMON_KEY', 'CERTMON_NEW_CERT', 'CERTMON_NEW_KEY')))")
    result = run_hook([sys.executable, "-c", script, "$HOME;", "|", "true"], paths, 10)
    assert result.is_ok, result.error
    assert paths.new_cert.read_text().split("|") == [
        "gw-1", str(paths.cert), str(paths.key), str(paths.new_cert), str(paths.new_key)]


def test_hook_failures_are_one_line_reasons(tmp_path: Path) -> None:
    paths = hook_paths(tmp_path)
    r = run_hook([sys.executable, "-c", "import sys; sys.stderr.write('no\\nway'); "
                  "sys.exit(3)"], paths, 10)
    assert r.error == f"hook {sys.executable} exited 3: no way"
    r = run_hook([str(tmp_path / "missing-hook")], paths, 10)
    assert r.error is not None and r.error.startswith("cannot run hook") and \
        "No such file" in r.error
    r = run_hook([sys.executable, "-c", "import time; time.sleep(30)"], paths, 0.5)
    assert r.error == f"hook {sys.executable} timed out after 0.5 s"
    assert run_hook([], paths, 1).error == "renewal.command is empty"


def test_a_long_hook_keeps_the_watchdog_fed(tmp_path: Path) -> None:
    ticks: list[int] = []
    r = run_hook([sys.executable, "-c", "import time; time.sleep(0.6)"], hook_paths(tmp_path),
                 10, tick=lambda: ticks.append(1), tick_s=0.1)
    assert r.is_ok and len(ticks) >= 3


def test_stderr_is_truncated_and_private_keys_redacted() -> None:
    raw = (b"ok\n-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----\n"
           + b"x" * 2000)
    text = clean_stderr(raw)
    assert "MIGHAgEAMBMG" not in text and "<private key redacted>" in text
    assert len(text) == 512 and "\n" not in text


# --------------------------------------------------------------------------- install


def test_install_keeps_modes_and_the_previous_pair(tmp_path: Path) -> None:
    cert, key = tmp_path / "device.crt", tmp_path / "device.key"
    cert.write_bytes(b"old cert")
    key.write_bytes(b"old key")
    os.chmod(cert, 0o644)
    os.chmod(key, 0o600)
    install_pair(cert, key, b"new cert", b"new key")
    assert (cert.read_bytes(), key.read_bytes()) == (b"new cert", b"new key")
    assert previous_path(cert).read_bytes() == b"old cert"
    assert previous_path(key).read_bytes() == b"old key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(previous_path(key).stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "device.crt", "device.crt.previous", "device.key", "device.key.previous"]


def test_a_failed_install_restores_the_working_pair(tmp_path: Path) -> None:
    cert, key = tmp_path / "device.crt", tmp_path / "device.key"
    cert.write_bytes(b"old cert")
    key.write_bytes(b"old key")
    os.chmod(key, 0o600)
    # The key is replaced first; keeping the certificate's previous copy then fails
    # (a directory in the way), so the key must be put back.
    previous_path(cert).mkdir()
    with pytest.raises(OSError):
        install_pair(cert, key, b"new cert", b"new key")
    assert (cert.read_bytes(), key.read_bytes()) == (b"old cert", b"old key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.parametrize(("toml", "days_after_not_before"), [
    ("", 60.0),  # the default: 2/3 of 90 days (jitter off below)
    ("at_lifetime_fraction = 0.5\n", 45.0),
    ("at_lifetime_fraction = 0\ndays_before = 10\n", 80.0),
    ("at_lifetime_fraction = 0.9\ndays_before = 20\n", 70.0),  # the earlier point wins
])
def test_each_when_key_moves_the_renewal_point(toml: str, days_after_not_before: float) -> None:
    policy = policy_of(loads(RenewalConfig, "jitter_fraction = 0\n" + toml))
    assert renewal_point(facts(90), "gw-1", policy) == T0 + timedelta(days=days_after_not_before)


def test_jitter_fraction_key_bounds_the_spread() -> None:
    wide = policy_of(loads(RenewalConfig, "jitter_fraction = 0.5\n"))
    points = [renewal_point(facts(90), f"gw-{i}", wide) for i in range(200)]
    assert min(points) < T0 + timedelta(days=20) and max(points) <= T0 + timedelta(days=60)
    assert all(p >= T0 + timedelta(days=15) for p in points)  # 60 - 0.5 * 90


def _is_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_a_backgrounded_child_is_killed_when_the_hook_exits_0(tmp_path: Path) -> None:
    paths = hook_paths(tmp_path)
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(30)'], stderr=subprocess.DEVNULL); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))")
    result = run_hook([sys.executable, "-c", script], paths, 10)
    assert result.is_ok, result.error
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not _is_gone(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _is_gone(child)  # in the hook's group: killed with it, at once


def test_a_descendant_that_escaped_the_group_holding_stderr_does_not_hang(
    tmp_path: Path
) -> None:
    paths = hook_paths(tmp_path)
    pid_file = tmp_path / "child.pid"
    # setsid: out of the group kill's reach; it inherits stderr and keeps it open.
    script = ("import subprocess, sys; sys.stderr.write('hook says hi'); sys.stderr.flush(); "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(20)'], "
              f"start_new_session=True); open({str(pid_file)!r}, 'w').write(str(p.pid))")
    started = time.monotonic()
    try:
        result = run_hook([sys.executable, "-c", script], paths, 10)
        assert time.monotonic() - started < 3
        assert result.is_ok and result.stderr == "hook says hi"
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the test's own straggler


def test_stderr_is_read_bounded_and_never_blocks_the_hook(tmp_path: Path) -> None:
    script = "import sys; sys.stderr.write('x' * 5_000_000); sys.exit(4)"
    r = run_hook([sys.executable, "-c", script], hook_paths(tmp_path), 10)
    assert r.error is not None and r.error.startswith(f"hook {sys.executable} exited 4: xxx")
    assert len(r.stderr) == 512


def test_hook_output_is_read_once_regular_files_only_and_bounded(tmp_path: Path) -> None:
    paths = hook_paths(tmp_path)
    assert read_output(paths) == "the hook exited 0 but wrote no certificate to CERTMON_NEW_CERT"
    paths.new_cert.write_bytes(b"cert")
    assert read_output(paths) == "the hook exited 0 but wrote no key to CERTMON_NEW_KEY"
    paths.new_key.write_bytes(b"")
    assert read_output(paths) == "the hook exited 0 but wrote no key to CERTMON_NEW_KEY"
    secret = tmp_path / "secret"
    secret.write_bytes(b"not the hook's")
    paths.new_key.unlink()
    paths.new_key.symlink_to(secret)
    why = read_output(paths)
    assert isinstance(why, str) and "cannot read the new key (CERTMON_NEW_KEY)" in why
    paths.new_key.unlink()
    os.mkfifo(paths.new_key)  # a FIFO: refused, without waiting for a writer
    assert read_output(paths) == "the new key (CERTMON_NEW_KEY) is not a regular file"
    paths.new_key.unlink()
    paths.new_key.write_bytes(b"k" * (OUTPUT_MAX_BYTES + 1))
    assert read_output(paths) == (
        f"the new key (CERTMON_NEW_KEY) is larger than {OUTPUT_MAX_BYTES} bytes")
    paths.new_key.write_bytes(b"key")
    assert read_output(paths) == HookOutput(b"cert", b"key")


def test_install_temp_files_are_unique_and_follow_no_planted_symlink(tmp_path: Path) -> None:
    cert, key = tmp_path / "device.crt", tmp_path / "device.key"
    cert.write_bytes(b"old cert")
    key.write_bytes(b"old key")
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    for name in (".device.crt.renewing", ".device.key.renewing"):  # the old fixed names
        (tmp_path / name).symlink_to(victim)
    install_pair(cert, key, b"new cert", b"new key")
    assert (cert.read_bytes(), key.read_bytes()) == (b"new cert", b"new key")
    assert victim.read_bytes() == b"untouched"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".renewing")
                and not p.is_symlink()]


def test_the_renewal_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    with renewal_lock(tmp_path) as first:
        assert first
        with renewal_lock(tmp_path) as second:
            assert not second  # another descriptor: as another process would see it
    with renewal_lock(tmp_path) as again:
        assert again
    assert stat.S_IMODE((tmp_path / "renewal.lock").stat().st_mode) == 0o600
