"""Alert rules: findings and fleet facts → `AlertCandidate`s. Pure.

Owns which conditions are alerts, their rule names, severities, categories, dedup
keys, summaries and labels. Every function is a pure function of its inputs and
`now`; the store reads, the lifecycle (firing → resolved, re-notify) and delivery
belong to `collector.alerts.engine`. Must not read the clock, the store or the network.

Expiry thresholds (days and fraction of lifetime) are applied by the agent
(`certmon.pki.Policy`) before a finding exists; here a finding of severity ≥ WARNING
becomes an alert, optionally with its severity overridden per rule (`RulesConfig`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from certmon.pki import Finding, FindingCode, Policy, Severity
from certmon.pki.crl import CrlFacts, crl_findings, revoked_by
from certmon.wire import FindingWire, RenewalState, cert_ref, format_instant
from collector.aggregate import category
from collector.trust import RequiredCA  # resolved by collector.trust at start

__all__ = [
    "CERT_REVOKED", "DEVICE_FLOODING", "DEVICE_OFFLINE", "FLEET", "OFFLINE_CERT_EXPIRING",
    "RENEWAL_FAILING", "RENEWAL_OVERDUE", "SHARED_CLIENT_CERT", "TRUST_STORE_MISSING_CA",
    "AlertCandidate", "CertName", "HeldCert", "RequiredCA", "RulesConfig", "Scope",
    "device_alerts", "fleet_crl_alerts", "flooding_alerts", "offline_alerts",
    "renewal_alerts", "revoked_cert_alerts", "shared_client_cert_alerts",
    "trust_requirement_alerts",
]

# Rules the collector derives itself (every other rule name is an agent finding code).
DEVICE_OFFLINE = "DEVICE_OFFLINE"
OFFLINE_CERT_EXPIRING = "OFFLINE_CERT_EXPIRING"
TRUST_STORE_MISSING_CA = "TRUST_STORE_MISSING_CA"
SHARED_CLIENT_CERT = "SHARED_CLIENT_CERT"
CERT_REVOKED = "CERT_REVOKED"  # revoked_cert_alerts, against the fleet's CRLs
RENEWAL_FAILING = "RENEWAL_FAILING"  # from the status's renewal part (renewal_alerts)
RENEWAL_OVERDUE = "RENEWAL_OVERDUE"
DEVICE_FLOODING = "DEVICE_FLOODING"  # flooding_alerts: over its ingest budget (admission)

# agent.config's lower bound on interval_s: no device is judged silent sooner.
MIN_AGENT_INTERVAL_S = 10

FLEET = "fleet"  # the `device` label of an alert about no single device (a reserved id)


class Scope(enum.StrEnum):
    """Which evaluation owns an alert: only the evaluation of the same scope (and, for
    per-device scopes, the same device) may resolve it. Recorded as the `scope` label.

    A device's findings, its liveness and the fleet facts are judged at different
    moments by different code paths: the status handler must not resolve
    DEVICE_OFFLINE just because the status it evaluates has no such finding, and the
    hourly trust-store sweep must not resolve a device's CERT_EXPIRING.
    """

    FINDINGS = "findings"  # device_alerts: the agent's findings, per status
    OFFLINE = "offline"  # offline_alerts: silence / LWT, per device
    TRUST = "trust"  # trust_requirement_alerts: fleet sweep
    SHARED_CERT = "shared_cert"  # shared_client_cert_alerts: fleet sweep
    SCAN = "scan"  # scan_alerts: the collector's scheduled endpoint scans
    REVOKED = "revoked"  # revoked_cert_alerts, fleet_crl_alerts: sweep of tls.fleet_crl
    FLOODING = "flooding"  # flooding_alerts: the ingest's admission, per device


@dataclass(frozen=True, slots=True)
class AlertCandidate:
    """An alert condition that holds now. `key` is the dedup identity (rule, device,
    certificate); the store keeps one lifecycle per key."""

    key: str
    rule: str
    device_id: str | None  # None: a fleet alert (SHARED_CLIENT_CERT)
    # The certificate the alert is about: the full SHA-256 when known, else the
    # 16-hex-digit reference the agent's finding carries.
    cert_sha256: str | None
    severity: Severity
    category: str  # "certificate", "clock", "broker" or "fleet"
    scope: Scope
    summary: str
    labels: dict[str, str]


@dataclass(frozen=True, slots=True)
class RulesConfig:
    """Per-rule severity overrides, e.g. {"WEAK_SIGNATURE": Severity.CRITICAL,
    "KEY_PERMISSIONS": Severity.OK}. OK silences a rule; any other value replaces the
    severity the agent (or the rule below) chose. Thresholds stay in `[policy]`."""

    severity_overrides: Mapping[str, Severity] = field(default_factory=dict)

    def severity(self, rule: str, default: Severity) -> Severity:
        return self.severity_overrides.get(rule, default)


DEFAULT_RULES = RulesConfig()


@dataclass(frozen=True, slots=True)
class CertName:
    """What the collector knows of a certificate an agent names by reference."""

    sha256: str
    subject: str


def _key(rule: str, device_id: str | None, cert: str | None) -> str:
    # The certificate part is the identity the source has: the wire's 16-hex ref for
    # agent findings (stable whether or not the collector holds the certificate), the
    # full SHA-256 for collector-derived rules. The lengths differ, so an agent finding
    # and a fleet rule of the same name never share a key.
    return f"{rule}|{device_id or FLEET}|{cert or '-'}"


def _labels(rule: str, device_id: str | None, severity: Severity, cat: str,
            scope: Scope, cert: str | None) -> dict[str, str]:
    labels = {"alertname": rule, "rule": rule, "device": device_id or FLEET,
              "severity": severity.name.lower(), "category": cat, "scope": str(scope)}
    if cert:
        # Alertmanager identifies an alert by its label set: without the certificate,
        # CA_EXPIRING for two CAs of one device would collapse into one alert.
        labels["cert"] = cert_ref(cert)
    return labels


def _candidate(rule: str, device_id: str | None, cert_key: str | None,
               cert_sha256: str | None, severity: Severity, cat: str, scope: Scope,
               summary: str) -> AlertCandidate:
    return AlertCandidate(
        key=_key(rule, device_id, cert_key), rule=rule, device_id=device_id,
        cert_sha256=cert_sha256, severity=severity, category=cat, scope=scope,
        summary=summary, labels=_labels(rule, device_id, severity, cat, scope, cert_sha256))


def humanize(delta: timedelta) -> str:
    """'3 hours', '2 days', '45 minutes': summaries are read on a phone at 3 a.m."""
    s = abs(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= size:
            n = int(s // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{int(s)} seconds"


def _expiry_phrase(not_after: datetime, now: datetime) -> str:
    when = format_instant(not_after)
    if not_after <= now:
        return f"expired {when} ({humanize(now - not_after)} ago)"
    return f"expires {when} (in {humanize(not_after - now)})"


# --------------------------------------------------------------------------- per device


def device_alerts(device_id: str, findings: Sequence[FindingWire], *, online: bool,
                  now: datetime, rules_config: RulesConfig = DEFAULT_RULES,
                  certs: Mapping[str, CertName] | None = None) -> list[AlertCandidate]:
    """One candidate per (code, certificate) whose severity (after overrides) is at
    least WARNING, scope FINDINGS. `certs` maps cert refs to what the collector holds,
    so a summary can name the subject. Findings of an offline device stand as last
    reported (the summary says so); the offline rules judge the silence itself."""
    best: dict[str, tuple[FindingWire, Severity]] = {}
    for f in findings:
        severity = rules_config.severity(f.code, f.severity)
        if severity < Severity.WARNING:
            continue
        key = _key(f.code, device_id, f.cert)
        if key not in best or severity > best[key][1]:  # duplicates: keep the worst
            best[key] = (f, severity)
    out = []
    for f, severity in best.values():
        known = (certs or {}).get(f.cert) if f.cert else None
        cat = category(f.code)
        parts = [f"{device_id}: {f.msg}" if f.msg else f"{device_id}: {f.code}"]
        if known is not None:
            parts.append(f"certificate {known.subject}")
        # The agent's message usually names the date already; say it only when not.
        if f.not_after is not None and f.not_after.strftime("%Y-%m-%d") not in (f.msg or ""):
            parts.append(_expiry_phrase(f.not_after, now))
        summary = "; ".join(parts)
        if not online:
            summary += " (device offline; as last reported)"
        out.append(_candidate(f.code, device_id, f.cert,
                              known.sha256 if known else f.cert, severity, cat,
                              Scope.FINDINGS, summary))
    return sorted(out, key=lambda c: c.key)


# A healthy agent renews at its first report after the renewal point; three report
# intervals past it without a renewal is overdue (docs/renewal.md).
RENEWAL_GRACE_INTERVALS = 3


def renewal_alerts(device_id: str, renewal: RenewalState | None, *, interval_s: int,
                   now: datetime, rules_config: RulesConfig = DEFAULT_RULES,
                   ) -> list[AlertCandidate]:
    """Scope FINDINGS, from the status's renewal part: RENEWAL_FAILING (WARNING) while
    the last attempt failed, RENEWAL_OVERDUE (WARNING) once the renewal point is
    RENEWAL_GRACE_INTERVALS report intervals past by the collector's clock and the
    certificate is still the one due: the earliest reliable warning, long before
    CERT_EXPIRING. Both resolve with the status after a successful renewal."""
    if renewal is None:
        return []
    out = []
    severity = rules_config.severity(RENEWAL_FAILING, Severity.WARNING)
    if renewal.outcome == "failed" and severity >= Severity.WARNING:
        retry = (f"; next attempt {format_instant(renewal.next_attempt_at)}"
                 if renewal.next_attempt_at else "")
        out.append(_candidate(RENEWAL_FAILING, device_id, None, None, severity,
                              "certificate", Scope.FINDINGS,
                              f"{device_id}: certificate renewal failing "
                              f"({renewal.failures} attempt(s)): {renewal.reason}{retry}"))
    severity = rules_config.severity(RENEWAL_OVERDUE, Severity.WARNING)
    overdue_at = renewal.due_at + timedelta(seconds=RENEWAL_GRACE_INTERVALS * interval_s)
    if now >= overdue_at and severity >= Severity.WARNING:
        out.append(_candidate(RENEWAL_OVERDUE, device_id, None, None, severity,
                              "certificate", Scope.FINDINGS,
                              f"{device_id}: certificate renewal overdue: due since "
                              f"{format_instant(renewal.due_at)} "
                              f"({humanize(now - renewal.due_at)} ago), not renewed"))
    return out


def offline_alerts(device_id: str, *, online: bool, last_seen_at: datetime | None,
                   client_not_after: datetime | None, now: datetime, policy: Policy,
                   client_sha256: str | None = None, interval_s: int | None = None,
                   rules_config: RulesConfig = DEFAULT_RULES) -> list[AlertCandidate]:
    """Scope OFFLINE. DEVICE_OFFLINE (WARNING) while the device is offline;
    OFFLINE_CERT_EXPIRING (CRITICAL) when, in addition, its client certificate
    expires within `policy.warn_days` or already has: the agent cannot report that
    itself, and the device may not reconnect once the certificate has expired.

    `now` is the instant it went offline. Silence can only be judged after at least
    one of its intervals (`interval_s`, else the agent's minimum): offline sooner than
    that came from its online topic, and the summary says so instead of "silent for
    0 seconds"."""
    if online:
        return []
    seen = ""
    if last_seen_at is None:
        silent = "has never reported"
    elif now - last_seen_at < timedelta(seconds=interval_s or MIN_AGENT_INTERVAL_S):
        silent = (f"went offline (its connection dropped; the broker published its last "
                  f"will) at {format_instant(now)}, last status "
                  f"{humanize(now - last_seen_at)} ago")
    else:
        silent = f"has been silent for {humanize(now - last_seen_at)}"
        seen = f" (last seen {format_instant(last_seen_at)})"
    out = []
    severity = rules_config.severity(DEVICE_OFFLINE, Severity.WARNING)
    if severity >= Severity.WARNING:
        out.append(_candidate(DEVICE_OFFLINE, device_id, None, None, severity, FLEET,
                              Scope.OFFLINE, f"{device_id} {silent}{seen}"))
    severity = rules_config.severity(OFFLINE_CERT_EXPIRING, Severity.CRITICAL)
    if (client_not_after is not None and severity >= Severity.WARNING
            and client_not_after - now <= policy.warn_window):
        summary = (f"{device_id} {silent} and its client certificate "
                   f"{_expiry_phrase(client_not_after, now)} while it is offline")
        out.append(_candidate(OFFLINE_CERT_EXPIRING, device_id, client_sha256,
                              client_sha256, severity, "certificate", Scope.OFFLINE, summary))
    return out


def flooding_alerts(device_id: str, *, flooding: bool,
                    rules_config: RulesConfig = DEFAULT_RULES) -> list[AlertCandidate]:
    """Scope FLOODING. DEVICE_FLOODING (WARNING) while the device sends statuses over
    its ingest budget (`ingest.device_rate_per_min`, `ingest.device_burst`): a looping
    agent or a compromised gateway. Its statuses beyond the budget are not verified
    (counted superseded / rate_limited); resolves once it has been within budget for
    a minute."""
    severity = rules_config.severity(DEVICE_FLOODING, Severity.WARNING)
    if not flooding or severity < Severity.WARNING:
        return []
    return [_candidate(DEVICE_FLOODING, device_id, None, None, severity, FLEET,
                       Scope.FLOODING, f"{device_id} sends statuses faster than its budget: "
                       "only its newest pending status is verified and stored")]


# --------------------------------------------------------------------------- fleet


def trust_requirement_alerts(requirements: Iterable[RequiredCA],
                             holders: Mapping[str, set[str]], devices: set[str], *,
                             rules_config: RulesConfig = DEFAULT_RULES) -> list[AlertCandidate]:
    """Scope TRUST. TRUST_STORE_MISSING_CA (WARNING) for each device in `devices` whose
    trust store lacks a "required" CA: one alert per (device, CA). `holders` maps a CA
    SHA-256 to the devices holding it; `devices` must be the devices whose inventory
    is known — a device not yet heard from is not "missing" anything. "retiring" CAs
    are fleet views (who still depends on it), not alerts."""
    severity = rules_config.severity(TRUST_STORE_MISSING_CA, Severity.WARNING)
    if severity < Severity.WARNING:
        return []
    out = []
    for req in requirements:
        if req.status != "required":
            continue
        sha = req.sha256.lower()
        held = holders.get(sha, set())
        for dev in sorted(devices - held):
            out.append(_candidate(
                TRUST_STORE_MISSING_CA, dev, sha, sha, severity, FLEET, Scope.TRUST,
                f"{dev}: trust store lacks required CA \"{req.name}\" (sha256 {sha[:16]}…)"))
    return out


@dataclass(frozen=True, slots=True)
class HeldCert:
    """A device's client certificate as the store has it (for revocation)."""

    device_id: str
    sha256: str
    subject: str
    issuer: str | None
    serial_hex: str | None


def revoked_cert_alerts(held: Iterable[HeldCert], crls: Sequence[CrlFacts], *,
                        rules_config: RulesConfig = DEFAULT_RULES) -> list[AlertCandidate]:
    """Scope REVOKED. CERT_REVOKED (CRITICAL) for each online device whose client
    certificate a fleet CRL lists: revoked, yet it still connects and reports (the
    broker has no crlfile, or an old one). One alert per (device, certificate)."""
    severity = rules_config.severity(CERT_REVOKED, Severity.CRITICAL)
    if severity < Severity.WARNING or not crls:
        return []
    out = []
    for cert in held:
        crl = revoked_by(cert.issuer, cert.serial_hex, crls)
        if crl is None:
            continue
        out.append(_candidate(
            CERT_REVOKED, cert.device_id, cert.sha256, cert.sha256, severity, "certificate",
            Scope.REVOKED, f"{cert.device_id}: client certificate {cert.subject} (serial "
            f"{cert.serial_hex}) is revoked by the CRL of {crl.issuer} ({crl.source}) "
            "and the device still reports"))
    return out


def fleet_crl_alerts(crls: Sequence[CrlFacts], now: datetime, policy: Policy, *,
                     rules_config: RulesConfig = DEFAULT_RULES) -> list[AlertCandidate]:
    """Scope REVOKED, fleet alerts: a `tls.fleet_crl` CRL past or near its nextUpdate
    (CRL_EXPIRED / CRL_EXPIRING, certmon.pki.crl's rule): the collector's copy is stale,
    so new revocations go unseen, and every broker given that CRL as crlfile refuses
    all clients from that instant. A CRL whose signature no known CA verifies
    (CRL_SIGNATURE_INVALID / CRL_ISSUER_UNKNOWN: forged, or its CA is not configured)
    is an alert of its own and revokes nothing; its dates are not judged. Keyed by the
    CRL's issuer."""
    out: list[AlertCandidate] = []
    for crl in crls:
        wanted = ((FindingCode.CRL_EXPIRED, FindingCode.CRL_EXPIRING) if crl.is_verified
                  else (FindingCode.CRL_SIGNATURE_INVALID, FindingCode.CRL_ISSUER_UNKNOWN))
        for f in crl_findings(crl, now, policy):
            if f.code not in wanted:
                continue
            severity = rules_config.severity(str(f.code), f.severity)
            if severity >= Severity.WARNING:
                out.append(_candidate(str(f.code), None, f"crl:{crl.issuer}", None, severity,
                                      "certificate", Scope.REVOKED, f"fleet CRL: {f.message}"))
    return out


def scan_alerts(reports: Iterable[tuple[str, Sequence[Finding]]], *,
                rules_config: RulesConfig = DEFAULT_RULES) -> list[AlertCandidate]:
    """Scope SCAN. One candidate per (finding code, endpoint, certificate) of the
    collector's own scans, at least WARNING: the broker as certmon sees it, next to the
    broker as each device sees it. A fleet alert; the endpoint is in the summary and
    the key (reports are (target name, findings))."""
    out: dict[str, AlertCandidate] = {}
    for target, findings in reports:
        for f in findings:
            severity = rules_config.severity(str(f.code), f.severity)
            if severity < Severity.WARNING:
                continue
            cand = _candidate(str(f.code), None, f"{target}|{f.cert_sha256 or '-'}",
                              f.cert_sha256, severity, category(str(f.code)), Scope.SCAN,
                              f"scan of {target}: {f.message}")
            cand.labels["target"] = target
            if cand.key not in out or severity > out[cand.key].severity:
                out[cand.key] = cand
    return list(out.values())


def shared_client_cert_alerts(client_by_device: Mapping[str, str], *,
                              rules_config: RulesConfig = DEFAULT_RULES,
                              max_named: int = 5) -> list[AlertCandidate]:
    """Scope SHARED_CERT. SHARED_CLIENT_CERT (CRITICAL) per client certificate that
    two or more device ids present: a cloned image or a copied key, so one device can
    speak for another. A fleet alert (device label "fleet"), keyed by the SHA-256."""
    severity = rules_config.severity(SHARED_CLIENT_CERT, Severity.CRITICAL)
    if severity < Severity.WARNING:
        return []
    by_sha: dict[str, list[str]] = {}
    for dev, sha in client_by_device.items():
        by_sha.setdefault(sha.lower(), []).append(dev)
    out = []
    for sha, devs in sorted(by_sha.items()):
        if len(devs) < 2:
            continue
        devs.sort()
        named = ", ".join(devs[:max_named])
        more = f" and {len(devs) - max_named} more" if len(devs) > max_named else ""
        out.append(_candidate(
            SHARED_CLIENT_CERT, None, sha, sha, severity, FLEET, Scope.SHARED_CERT,
            f"client certificate {sha[:16]}… is used by {len(devs)} devices: {named}{more}"))
    return out
