"""One renewal attempt end to end, and the attempt state kept between attempts.

Owns the order of an attempt (hook in a private 0700 directory → prove the pair →
prove it on the broker → install), the state file `<state_dir>/renewal.json` (last
attempt, outcome and reason, consecutive failures, for which certificate) that
`run`, `renew` and the status all read, and the wire summary of it. Must not: decide
when to renew (`agent.renewal.policy`), or log key material or the hook's
environment: only paths, fingerprints and the hook's redacted stderr.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from certmon import pki, systemd
from certmon import wire as p
from certmon.wire import format_instant, parse_instant

from ..config import AgentConfig, RenewalConfig
from .hook import HookPaths, run_hook
from .install import install_pair
from .policy import CLOCK_WRONG, AttemptState, RenewalDecision, RenewalPolicy, decide
from .proof import NewPair, prove_connect, prove_pair

log = logging.getLogger("certmon.agent")
STATE_FILE = "renewal.json"
RENEWED, FAILED = "renewed", "failed"


@dataclass(frozen=True, slots=True)
class AttemptResult:
    is_renewed: bool
    reason: str  # why it failed, or what was installed
    new_sha256: str | None = None


def policy_of(config: RenewalConfig) -> RenewalPolicy:
    return RenewalPolicy(at_lifetime_fraction=config.at_lifetime_fraction,
                         days_before=config.days_before, jitter_fraction=config.jitter_fraction,
                         retry_min_s=config.retry_min_s, retry_max_s=config.retry_max_s)


def is_clock_ok(findings: tuple[pki.Finding, ...] | list[pki.Finding]) -> bool:
    return not any(f.code in CLOCK_WRONG for f in findings)


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
    tmp = state_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(data, sort_keys=True))
    tmp.replace(state_dir / STATE_FILE)


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
        proven = prove_pair(paths.new_cert, paths.new_key, trust_store=trust_store,
                            current=current, device_id=device_id, now=now)
        if not isinstance(proven, NewPair):
            return AttemptResult(False, proven)
        mqtt = config.mqtt
        if mqtt.is_tls:
            refused = prove_connect(mqtt.host, mqtt.port, servername=mqtt.servername,
                                    alpn=mqtt.alpn, new_cert=paths.new_cert,
                                    new_key=paths.new_key, device_id=device_id,
                                    timeout_s=renewal.connect_timeout_s)
            if refused is not None:
                return AttemptResult(False, refused)
        try:
            install_pair(tls.cert, tls.key, paths.new_cert.read_bytes(),
                         paths.new_key.read_bytes())
        except OSError as exc:
            return AttemptResult(False, f"cannot install the new pair: {exc}")
        facts = proven.facts
        return AttemptResult(True, f"installed {facts.name} serial {facts.serial_hex}, valid "
                             f"until {pki.iso_utc(facts.not_after)}", facts.sha256)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class RenewalRun:
    """What `renew_if_due` did: the decision, and the attempt when one ran."""

    decision: RenewalDecision
    result: AttemptResult | None
    state: AttemptState


def renew_if_due(config: AgentConfig, device_id: str, trust_store: pki.Bundle,
                 current: pki.CertFacts, now: datetime, *, is_clock_ok: bool,
                 force: bool = False) -> RenewalRun:
    """Decide, attempt when due (or forced), record the attempt, log one line."""
    state_dir = config.agent.state_dir
    state = load_state(state_dir)
    decision = decide(current, device_id, now, policy_of(config.renewal), state,
                      is_clock_ok=is_clock_ok, force=force)
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
    """Nagios-style: 0 renewed or not due, 1 due but not attempted, 2 failed."""
    if run.result is not None:
        return 0 if run.result.is_renewed else 2
    return 1 if run.decision.is_due else 0


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
