"""Assembling status v1 from what the agent found: pure, no I/O.

Owns the mapping from the agent's facts (DeviceCheck, clock verdict, the broker
chain seen, the agent's own counters) to certmon.protocol's wire dataclasses, the
heartbeat and the rule of when one may stand for a status (`status_essence`), and
the judgement of the broker chain against the device's trust store. Must not read
files, clocks or sockets, and must not sign (the service does that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from cryptography import x509

from certmon import __version__, pki
from certmon import wire as p
from certmon.chain import chain_findings, earliest_expiry, verify_chain

from .clocksync import ClockVerdict
from .report import (
    DeviceCheck,
    best_true_now,
    cas_on_chain,
    explained_by_clock,
    judged_by_use,
    split_trust_store,
    without_explained,
)

# A status must stay small (< 2 KB as JWS): the most important findings go first
# and the list is capped.
MAX_FINDINGS = 16


@dataclass(frozen=True, slots=True)
class BrokerObservation:
    """The broker chain as the agent's own session saw it, judged with its trust store."""

    host: str
    port: int
    tls_version: str | None
    chain: tuple[pki.CertFacts, ...]
    valid_now: bool | None
    valid_at_warn: bool | None
    error: str | None
    seen_at: datetime
    findings: tuple[pki.Finding, ...]
    # SHA-256 of the trust-store CAs the broker chain goes through (validated path, or
    # linked by signature when it does not validate): the "by use" rule's input.
    uses_cas: frozenset[str] = frozenset()


def observe_broker(
    host: str, port: int, tls_version: str | None, presented_der: Sequence[bytes],
    trust_store: pki.Bundle, now: datetime, policy: pki.Policy, *, error: str | None = None,
    clock: ClockVerdict | None = None,
) -> BrokerObservation:
    """Judge the chain the broker presented (leaf first), as the device would trust it.

    With a clock verdict, a broker certificate that is not yet valid only because the
    device's clock is behind is judged at the best estimate of the true time, and the
    clock findings (not this function) report the problem."""
    loaded: list[pki.LoadedCert] = []
    for der in presented_der:
        loaded.extend(pki.parse_bundle(der, f"tls:{host}:{port}").certs)
    certs: list[x509.Certificate] = [c.cert for c in loaded]
    facts = tuple(pki.facts_from_cert(c, source=f"tls:{host}:{port}", index=i)
                  for i, c in enumerate(certs))
    if not certs:
        return BrokerObservation(host, port, tls_version, (), None, None,
                                 error or "no broker certificate captured", now, ())
    anchors, store_intermediates = split_trust_store(trust_store)
    roots = [c.cert for c in anchors]
    intermediates = certs[1:] + [c.cert for c in store_intermediates]
    explained = explained_by_clock(clock, facts, now) if clock else set()
    judged_at = now
    if clock is not None and explained:
        judged_at = best_true_now(clock, now, max(f.not_before for f in facts))
    now_r = verify_chain(certs[0], intermediates, roots, judged_at, purpose="server")
    later = verify_chain(certs[0], intermediates, roots, judged_at + policy.warn_window,
                             purpose="server")
    findings = without_explained(
        [*pki.expiry_findings(facts[0], now, policy, "broker"),
         *chain_findings(facts[0], now_r, later, now, policy, role="broker")], explained)
    uses = cas_on_chain(loaded[0], [*loaded[1:], *trust_store.certs], now_r)
    return BrokerObservation(host, port, tls_version, facts, now_r.is_valid, later.is_valid,
                             error or now_r.error, now, tuple(findings), uses)


@dataclass(frozen=True, slots=True)
class AgentCounters:
    started_mono_s: float
    rss_bytes: int | None
    last_publish_ok_at: datetime | None
    spool_depth: int
    spool_dropped: int


def build_status(
    *,
    device_id: str,
    boot_id: str,
    seq: int,
    now: datetime,
    mono_s: float,
    interval_s: int,
    check: DeviceCheck,
    clock: ClockVerdict,
    clock_findings: Sequence[pki.Finding],
    broker: BrokerObservation | None,
    beacon: p.BeaconEcho | None,
    counters: AgentCounters,
    policy: pki.Policy,
    broker_host: tuple[p.BrokerHostState, Sequence[pki.Finding]] | None = None,
) -> p.Status:
    # Trust-store CAs judged by use (the rule `certmon-agent check` applies too); the
    # stale ones travel as facts in `trust_store.expiring` (the collector's readiness
    # views use them), not as findings that would mark every gateway as failing.
    used = (broker.uses_cas | {f.sha256 for f in broker.chain}) if broker else frozenset()
    findings = [f for f in judged_by_use(check, used).findings
                if f.code != pki.FindingCode.STALE_CA]
    findings += [*clock_findings, *(broker.findings if broker else ())]
    # A broker host's own findings (docs/broker-host.md) alert like the device's.
    findings += broker_host[1] if broker_host else ()
    findings.sort(key=lambda f: (-f.severity, f.code.value))
    return p.Status(
        device_id=device_id,
        boot_id=boot_id,
        seq=seq,
        ts=now,
        mono_s=max(mono_s, 0.0),
        interval_s=interval_s,
        client=_client_summary(check),
        client_chain=_chain_summary(check),
        trust_store=_trust_summary(check, now, policy),
        broker=_broker_seen(broker),
        clock=p.ClockSummary(
            synced=clock.synced,
            source=str(clock.source) if clock.source else None,
            offset_s=clock.offset_s,
            maxerror_s=clock.maxerror_s,
            plausible=clock.plausible,
            beacon=beacon,
        ),
        findings=tuple(p.finding_to_wire(f) for f in findings[:MAX_FINDINGS]),
        agent=p.AgentSelf(
            version=__version__,
            uptime_s=max(mono_s - counters.started_mono_s, 0.0),
            rss_bytes=counters.rss_bytes,
            last_publish_ok_at=counters.last_publish_ok_at,
            spool_depth=counters.spool_depth,
            spool_dropped=counters.spool_dropped,
        ),
        broker_host=broker_host[0] if broker_host else None,
    )


def _client_summary(check: DeviceCheck) -> p.CertSummary | None:
    if check.client is None:
        return None
    matches: bool | None = None
    if check.key is not None:
        matches = not any(f.code == pki.FindingCode.KEY_MISMATCH for f in check.findings)
    return p.cert_summary_from_facts(check.client, key_matches=matches,
                                     key_mode=check.key.mode if check.key else None)


def _chain_summary(check: DeviceCheck) -> p.ChainSummary | None:
    now_r, later = check.chain_now, check.chain_at_warn
    if now_r is None or later is None:
        return None
    earliest = earliest_expiry(now_r.path)
    return p.ChainSummary(
        valid_now=now_r.is_valid,
        valid_at_warn=later.is_valid,
        method=now_r.method,
        error=(now_r.error or "")[:256] or None,
        path=tuple(p.cert_ref(f.sha256) for f in now_r.path),
        earliest_not_after=earliest.not_after if earliest else None,
        earliest_ref=p.cert_ref(earliest.sha256) if earliest else None,
    )


def _trust_summary(check: DeviceCheck, now: datetime, policy: pki.Policy) -> p.TrustStoreSummary:
    horizon = now + timedelta(days=policy.ca_horizon_days)
    unique = {f.sha256: f for f in check.trust_store}
    expiring = sorted((f for f in unique.values() if f.not_after <= horizon),
                      key=lambda f: f.not_after)
    return p.TrustStoreSummary(
        count=len(unique),
        digest=p.trust_store_digest(unique),
        expiring=tuple(p.cert_brief_from_facts(f) for f in expiring[:32]),
    )


def _broker_seen(broker: BrokerObservation | None) -> p.BrokerSeen | None:
    if broker is None:
        return None
    return p.BrokerSeen(
        host=broker.host[:253],
        port=broker.port,
        tls_version=broker.tls_version,
        chain=tuple(p.cert_brief_from_facts(f) for f in broker.chain[:10]),
        valid_now=broker.valid_now,
        valid_at_warn=broker.valid_at_warn,
        error=(broker.error or "")[:256] or None,
        seen_at=broker.seen_at,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def status_essence(status: p.Status) -> bytes:
    """The status without what changes by itself between two cycles (instants, the
    sequence number, clock readings, the agent's own counters): two statuses with the
    same essence differ only in time and counters, so a heartbeat can stand for the
    second. Anything else — a finding, a certificate, the broker chain, a renewal
    step, a dropped spooled status — differs, and a full status goes out."""
    clock = replace(status.clock, offset_s=None, maxerror_s=None, beacon=None)
    agent = replace(status.agent, uptime_s=0.0, rss_bytes=None, last_publish_ok_at=None,
                    spool_depth=0)
    broker = replace(status.broker, seen_at=_EPOCH) if status.broker else None
    host = replace(status.broker_host, checked_at=_EPOCH) if status.broker_host else None
    return p.encode_status(replace(status, seq=0, ts=_EPOCH, mono_s=0.0, clock=clock,
                                   agent=agent, broker=broker, broker_host=host))


def build_heartbeat(status: p.Status, status_digest: str) -> p.Heartbeat:
    """The heartbeat standing for `status` (this cycle's, same seq) whose content is
    the full status named by `status_digest`."""
    beacon = status.clock.beacon
    age = None if beacon is None else round(max(status.mono_s - beacon.received_mono_s, 0.0), 3)
    return p.Heartbeat(device_id=status.device_id, boot_id=status.boot_id, seq=status.seq,
                       ts=status.ts, interval_s=status.interval_s, status_digest=status_digest,
                       beacon_ts=beacon.beacon_ts if beacon else None, beacon_age_s=age)


def inventory(device_id: str, now: datetime, trust_store: Sequence[pki.CertFacts]) -> p.Inventory:
    unique = {f.sha256: f for f in trust_store}
    cas = tuple(p.CaEntry(sha256=f.sha256, subject=f.subject[:512], not_before=f.not_before,
                          not_after=f.not_after)
                for f in sorted(unique.values(), key=lambda f: f.not_after))
    return p.Inventory(device_id=device_id, ts=now, digest=p.trust_store_digest(unique), cas=cas)
