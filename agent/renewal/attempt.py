"""One renewal attempt end to end, and the attempt state kept between attempts.

Owns the order of an attempt (hook in a private 0700 directory → read what it wrote
once → prove those bytes → prove them on the broker, from copies in a second private
directory the hook never saw → install exactly those bytes), one attempt at a time
(an flock on `<state_dir>/renewal.lock` held across the attempt and the state save:
`renew --force` beside `run` cannot install a mixed pair), the state file
`<state_dir>/renewal.json` (last attempt, outcome and reason, consecutive failures,
for which certificate) that `run`, `renew` and the status all read, and the wire
summary of it. Must not: decide when to renew (`agent.renewal.policy`), or log key
material or the hook's environment: only paths, fingerprints and the hook's
redacted stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from certmon import pki, systemd
from certmon import wire as p
from certmon.wire import format_instant, parse_instant

from ..config import AgentConfig, RenewalConfig
from .hook import HookPaths, read_output, run_hook
from .install import install_pair, write_atomic
from .policy import AttemptState, RenewalDecision, RenewalPolicy, decide
from .proof import NewPair, prove_connect, prove_pair

log = logging.getLogger("certmon.agent")
STATE_FILE = "renewal.json"
LOCK_FILE = "renewal.lock"
RENEWED, FAILED = "renewed", "failed"
IN_PROGRESS = "another renewal is in progress"


@dataclass(frozen=True, slots=True)
class AttemptResult:
    is_renewed: bool
    reason: str  # why it failed, or what was installed
    new_sha256: str | None = None


def policy_of(config: RenewalConfig) -> RenewalPolicy:
    return RenewalPolicy(at_lifetime_fraction=config.at_lifetime_fraction,
                         days_before=config.days_before, jitter_fraction=config.jitter_fraction,
                         retry_min_s=config.retry_min_s, retry_max_s=config.retry_max_s)


# --------------------------------------------------------------------------- state


def load_state(state_dir: Path) -> AttemptState:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
        return AttemptState(
            cert_sha256=data.get("cert_sha256"),
            last_attempt_at=parse_instant(data["last_attempt_at"])
            if data.get("last_attempt_at") else None,
            outcome=data.get("outcome"), reason=data.get("reason"),
            failures=int(data.get("failures", 0)))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return AttemptState()  # none yet, or unreadable: start afresh, never crash


def save_state(state_dir: Path, state: AttemptState) -> None:
    data = asdict(state)
    data["last_attempt_at"] = (format_instant(state.last_attempt_at)
                               if state.last_attempt_at else None)
    write_atomic(state_dir / STATE_FILE, json.dumps(data, sort_keys=True).encode(), 0o600)


@contextlib.contextmanager
def renewal_lock(state_dir: Path) -> Iterator[bool]:
    """Held (True) or, when another attempt holds it, not (False); never waits. The
    kernel drops an flock with its process, so a crashed attempt leaves no stale lock."""
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True  # closing the descriptor releases it
    finally:
        os.close(fd)


def recorded(state: AttemptState, cert_sha256: str, now: datetime,
             result: AttemptResult) -> AttemptState:
    """The state after an attempt on the certificate `cert_sha256`."""
    if result.is_renewed:
        # About the new certificate from now on: its renewal starts with a clean slate.
        return AttemptState(result.new_sha256, now, RENEWED, result.reason, 0)
    failures = state.failures + 1 if state.cert_sha256 == cert_sha256 else 1
    return AttemptState(cert_sha256, now, FAILED, result.reason, failures)


def summary(decision: RenewalDecision, state: AttemptState) -> p.RenewalState:
    return p.RenewalState(due_at=decision.due_at, is_due=decision.is_due,
                          next_attempt_at=decision.next_attempt_at,
                          last_attempt_at=state.last_attempt_at, outcome=state.outcome,
                          reason=state.reason[:256] if state.reason else None,
                          failures=state.failures)


def status_part(config: AgentConfig, device_id: str, current: pki.CertFacts, now: datetime,
                *, is_clock_ok: bool) -> p.RenewalState:
    """The status's `renewal` part: what the policy says now, and the last attempt."""
    state = load_state(config.agent.state_dir)
    decision = decide(current, device_id, now, policy_of(config.renewal), state,
                      is_clock_ok=is_clock_ok)
    return summary(decision, state)


# --------------------------------------------------------------------------- attempt


def attempt(config: AgentConfig, device_id: str, trust_store: pki.Bundle,
            current: pki.CertFacts | None, now: datetime) -> AttemptResult:
    """Run the hook, prove what it wrote, install it; the working pair is untouched
    unless the result says renewed."""
    tls, renewal = config.tls, config.renewal
    work = Path(tempfile.mkdtemp(prefix=".renewal-", dir=config.agent.state_dir))  # 0700
    try:
        paths = HookPaths(device_id, tls.cert, tls.key, work / "cert.pem", work / "key.pem")
        hook = run_hook(renewal.command, paths, renewal.timeout_s, tick=systemd.watchdog)
        if hook.error is not None:
            return AttemptResult(False, hook.error)
        output = read_output(paths)  # the only read: all below works on these bytes
        if isinstance(output, str):
            return AttemptResult(False, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    proven = prove_pair(output, trust_store=trust_store, current=current,
                        device_id=device_id, now=now)
    if not isinstance(proven, NewPair):
        return AttemptResult(False, proven)
    if config.mqtt.is_tls:
        refused = _prove_on_broker(config, device_id, proven)
        if refused is not None:
            return AttemptResult(False, refused)
    try:
        install_pair(tls.cert, tls.key, proven.cert_pem, proven.key_pem)
    except OSError as exc:
        return AttemptResult(False, f"cannot install the new pair: {exc}")
    facts = proven.facts
    return AttemptResult(True, f"installed {facts.name} serial {facts.serial_hex}, valid "
                         f"until {pki.iso_utc(facts.not_after)}", facts.sha256)


def _prove_on_broker(config: AgentConfig, device_id: str, proven: NewPair) -> str | None:
    # The probe takes file names: copies of the proven bytes, 0600, in a fresh 0700
    # directory of the agent's (not the hook's, which a straggler could still reach).
    probe_dir = Path(tempfile.mkdtemp(prefix=".renewal-probe-", dir=config.agent.state_dir))
    try:
        cert, key = probe_dir / "cert.pem", probe_dir / "key.pem"
        for path, data in ((cert, proven.cert_pem), (key, proven.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        mqtt = config.mqtt
        return prove_connect(mqtt.host, mqtt.port, servername=mqtt.servername, alpn=mqtt.alpn,
                             new_cert=cert, new_key=key, device_id=device_id,
                             timeout_s=config.renewal.connect_timeout_s)
    except OSError as exc:
        return f"cannot prepare the broker proof: {exc.strerror or exc}"
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class RenewalRun:
    """What `renew_if_due` did: the decision, and the attempt when one ran."""

    decision: RenewalDecision
    result: AttemptResult | None
    state: AttemptState
    is_busy: bool = False  # not attempted: another attempt held the lock


def renew_if_due(config: AgentConfig, device_id: str, trust_store: pki.Bundle,
                 current: pki.CertFacts, now: datetime, *, is_clock_ok: bool,
                 force: bool = False) -> RenewalRun:
    """Decide, attempt when due (or forced), record the attempt, log one line. An
    attempt already running elsewhere (the lock) → not attempted, `is_busy`."""
    state_dir = config.agent.state_dir
    state = load_state(state_dir)
    decision = decide(current, device_id, now, policy_of(config.renewal), state,
                      is_clock_ok=is_clock_ok, force=force)
    if not decision.should_attempt:
        return RenewalRun(decision, None, state)
    with renewal_lock(state_dir) as is_held:
        if is_held:
            # Decided from a read before the lock: the other attempt may have just
            # finished. Its state, and a certificate that is no longer `current`, win.
            state = load_state(state_dir)
            decision = decide(current, device_id, now, policy_of(config.renewal), state,
                              is_clock_ok=is_clock_ok, force=force)
            installed = pki.read_bundle(config.tls.cert).certs
            if installed and installed[0].facts.sha256 != current.sha256:
                is_held = False
        if not is_held:
            log.info("renewal skipped: %s", IN_PROGRESS)
            busy = dataclasses.replace(decision, should_attempt=False, reason=IN_PROGRESS)
            return RenewalRun(busy, None, state, is_busy=True)
        if not decision.should_attempt:
            return RenewalRun(decision, None, state)
        result = attempt(config, device_id, trust_store, current, now)
        state = recorded(state, current.sha256, now, result)
        save_state(state_dir, state)
    if result.is_renewed:
        log.info("client certificate renewed: %s", result.reason)
    else:
        log.error("certificate renewal failed (attempt %d): %s", state.failures, result.reason)
    return RenewalRun(decision, result, state)


def renewal_exit_code(run: RenewalRun) -> int:
    """Nagios-style: 0 renewed or not due, 1 due (or forced) but not attempted
    (backing off, a wrong clock, another attempt in progress), 2 failed."""
    if run.result is not None:
        return 0 if run.result.is_renewed else 2
    return 1 if run.decision.is_due or run.is_busy else 0


def renewal_to_json(run: RenewalRun) -> dict[str, object]:
    decision, result = run.decision, run.result
    return {
        "due_at": format_instant(decision.due_at), "is_due": decision.is_due,
        "attempted": result is not None,
        "renewed": result.is_renewed if result is not None else False,
        "reason": result.reason if result is not None else decision.reason,
        "next_attempt_at": format_instant(decision.next_attempt_at)
        if decision.next_attempt_at and result is None else None,
        "failures": run.state.failures,
    }
