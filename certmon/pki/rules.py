"""The per-certificate rules: expiry, key and signature strength, trust-store hygiene,
and whether a private key belongs to its certificate and is kept private.

Owns every judgement about one certificate, a CA bundle or a key (the chain rule is in
`certmon.chain`, built on `finding_about`, `days_of` and `human_days` from here), and
`worst_severity`. Each rule is pure: it takes `now` (a tz-aware UTC datetime) and a `Policy`.
Must not: read files, parse certificates, or read the clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from .model import Bundle, CertFacts, Finding, FindingCode, KeyFacts, Policy, Severity, iso_utc


def finding_about(
    code: FindingCode, severity: Severity, message: str, facts: CertFacts,
    cert_sha256: str | None = None,
) -> Finding:
    """A finding about one certificate (`cert_sha256` overrides which one, e.g. the
    intermediate that broke a chain rather than the leaf it was reached from)."""
    return Finding(code, severity, message, cert_sha256=cert_sha256 or facts.sha256,
                   subject=facts.subject, source=facts.source, not_after=facts.not_after)


def days_of(delta: timedelta) -> float:
    return delta.total_seconds() / 86400.0


def human_days(days: float) -> str:
    if abs(days) < 1:
        return f"{days * 24:.1f} hours"
    return f"{days:.1f} days"


def expiry_findings(facts: CertFacts, now: datetime, policy: Policy, role: str) -> list[Finding]:
    """The expiry rule, in one place.

    `role` is "client", "server", "signing", "broker", "intermediate" or "ca" (trust
    store) and only chooses the finding code: an intermediate that expires is a different
    operational problem (every leaf under it breaks) from a leaf that expires.
    """
    label = _ROLE_LABEL.get(role, "certificate")
    if now < facts.not_before:
        ahead = human_days(days_of(facts.not_before - now))
        return [finding_about(FindingCode.CERT_NOT_YET_VALID, Severity.CRITICAL,
                              f"{label} {facts.name} is not valid before "
                              f"{iso_utc(facts.not_before)} ({ahead} from now)", facts)]
    left = days_of(facts.not_after - now)
    expired_code, expiring_code = _ROLE_CODES.get(role, _ROLE_CODES["client"])
    if left <= 0:
        return [finding_about(expired_code, Severity.CRITICAL,
                        f"{label} {facts.name} expired {iso_utc(facts.not_after)} "
                        f"({human_days(-left)} ago)", facts)]
    lifetime_s = facts.lifetime_s
    fraction = (facts.not_after - now).total_seconds() / lifetime_s if lifetime_s > 0 else 0.0
    severity = Severity.OK
    if left <= policy.crit_days or fraction <= policy.crit_fraction:
        severity = Severity.CRITICAL
    elif left <= policy.warn_days or fraction <= policy.warn_fraction:
        severity = Severity.WARNING
    if role == "ca" and severity == Severity.OK and left <= policy.ca_horizon_days:
        severity = Severity.WARNING
    if severity == Severity.OK:
        return []
    return [finding_about(expiring_code, severity,
                    f"{label} {facts.name} expires {iso_utc(facts.not_after)} "
                    f"(in {human_days(left)}, {fraction:.0%} of its lifetime left)",
                    facts)]


_ROLE_LABEL = {"client": "client certificate", "server": "server certificate",
               "broker": "broker certificate", "intermediate": "intermediate CA",
               "ca": "trusted CA", "signing": "status-signing certificate"}
_ROLE_CODES = {
    "client": (FindingCode.CERT_EXPIRED, FindingCode.CERT_EXPIRING),
    "server": (FindingCode.CERT_EXPIRED, FindingCode.CERT_EXPIRING),
    "signing": (FindingCode.CERT_EXPIRED, FindingCode.CERT_EXPIRING),
    "broker": (FindingCode.BROKER_CERT_EXPIRED, FindingCode.BROKER_CERT_EXPIRING),
    "intermediate": (FindingCode.CERT_EXPIRED, FindingCode.INTERMEDIATE_EXPIRING),
    "ca": (FindingCode.CA_EXPIRED, FindingCode.CA_EXPIRING),
}


def strength_findings(facts: CertFacts, policy: Policy) -> list[Finding]:
    """Weak keys and weak signatures. A self-signed root's own signature is never
    checked by anyone (the anchor is trusted by fingerprint), so it is exempt."""
    out: list[Finding] = []
    weak_key = (
        (facts.key_type == "RSA" and facts.key_bits < policy.min_rsa_bits)
        or (facts.key_type == "EC" and facts.key_bits < policy.min_ec_bits)
        or facts.key_type == "DSA"
    )
    if weak_key:
        out.append(finding_about(FindingCode.WEAK_KEY, Severity.CRITICAL,
                           f"{facts.name} has a weak key ({facts.key_type}-{facts.key_bits}); "
                           "OpenSSL 3 at security level 2 refuses it", facts))
    if not facts.is_self_issued and facts.signature_hash in {"md2", "md4", "md5", "sha1"}:
        out.append(finding_about(FindingCode.WEAK_SIGNATURE, Severity.CRITICAL,
                           f"{facts.name} is signed with {facts.signature_algorithm}; "
                           "current TLS stacks reject it", facts))
    return out


def trust_store_findings(bundle: Bundle, now: datetime, policy: Policy) -> list[Finding]:
    """Findings about a CA bundle as a whole: unparseable blocks, duplicates, CAs that
    expired or expire within the horizon, non-CA certificates sitting in it."""
    out = list(bundle.findings)
    seen: dict[str, CertFacts] = {}
    for facts in bundle.facts:
        if facts.sha256 in seen:
            out.append(Finding(FindingCode.DUPLICATE_CERT, Severity.WARNING,
                               f"{facts.source}: certificate #{facts.index} ({facts.name}) "
                               f"duplicates #{seen[facts.sha256].index}",
                               cert_sha256=facts.sha256, subject=facts.subject,
                               source=facts.source, not_after=facts.not_after))
            continue
        seen[facts.sha256] = facts
        out.extend(expiry_findings(facts, now, policy, "ca"))
        out.extend(strength_findings(facts, policy))
    return out


def key_findings(key: KeyFacts, cert: CertFacts | None, cert_spki: str | None) -> list[Finding]:
    """Whether the private key belongs to the certificate and is kept private."""
    out: list[Finding] = []
    if cert is not None and cert_spki is not None and cert_spki != key.public_sha256:
        out.append(Finding(FindingCode.KEY_MISMATCH, Severity.CRITICAL,
                           f"private key {key.source} does not belong to certificate "
                           f"{cert.name} ({cert.source}): TLS handshakes will fail",
                           cert_sha256=cert.sha256, subject=cert.subject, source=key.source,
                           not_after=cert.not_after))
    if key.mode is not None and key.mode & 0o077:
        # World access is a leak waiting to happen; group access is sometimes a
        # deliberate `ssl-cert` group setup, so it only warns.
        severity = Severity.CRITICAL if key.mode & 0o007 else Severity.WARNING
        out.append(Finding(FindingCode.KEY_PERMISSIONS, severity,
                           f"private key {key.source} has mode {key.mode:04o}; "
                           "it should be 0600 (or 0640 with a dedicated group)",
                           source=key.source))
    return out


def worst_severity(findings: Iterable[Finding]) -> Severity:
    return max((f.severity for f in findings), default=Severity.OK)
