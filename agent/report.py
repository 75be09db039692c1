"""What the device's certificate material means: pure, `now` and `Policy` in, facts
and findings out.

Owns the composition of certmon.pki's rules for one device (trust store, client
certificate and key, the chain between them) and the one rule that judges a trust
store's CAs by use (`judged_by_use`), which `certmon-agent check` and the status
`certmon-agent run` publishes both apply, so the two cannot disagree. Must not read
files, clocks or the network: the caller passes `DeviceMaterial` and `now`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from certmon import pki
from certmon.chain import chain_findings, verify_chain, verify_signature_with

from .certstore import DeviceMaterial, SigningMaterial
from .clocksync import ClockVerdict, explains_not_yet_valid


@dataclass(frozen=True, slots=True)
class DeviceCheck:
    """Everything a one-shot check or a status message needs about the device's PKI."""

    now: datetime
    trust_store: tuple[pki.CertFacts, ...]
    client: pki.CertFacts | None
    client_extra: tuple[pki.CertFacts, ...]  # intermediates shipped in the cert file
    key: pki.KeyFacts | None
    chain_now: pki.ChainResult | None
    chain_at_warn: pki.ChainResult | None
    findings: tuple[pki.Finding, ...]
    # SHA-256 of the trust-store CAs the client chain goes through: the validated path,
    # or when it does not validate (an expired root) the CAs it links to by signature.
    client_chain_cas: frozenset[str] = frozenset()

    @property
    def severity(self) -> pki.Severity:
        return pki.worst_severity(self.findings)


def split_trust_store(
    bundle: pki.Bundle,
) -> tuple[list[pki.LoadedCert], list[pki.LoadedCert]]:
    """(anchors, intermediates) as OpenSSL would use a CA file: the chain must end at a
    self-issued root; CA certificates that are not self-issued only help build the path.
    A bundle with no self-issued certificate at all is taken as a partial-chain store
    (every certificate an anchor), which is how certmon still reports something useful
    for a device that pins an intermediate."""
    anchors = [c for c in bundle.certs if c.facts.is_self_issued]
    if not anchors:
        return list(bundle.certs), []
    return anchors, [c for c in bundle.certs if not c.facts.is_self_issued]


TRUST_STORE_CODES = frozenset({pki.FindingCode.CA_EXPIRED, pki.FindingCode.CA_EXPIRING})


def judged_by_use(check: DeviceCheck, used: Iterable[str] = (), *,
                  count_stale: bool = False) -> DeviceCheck:
    """The trust store judged by use: a CA's expiry (CA_EXPIRED, CA_EXPIRING) keeps its
    severity only when something the device holds or sees chains through it — its
    client chain (`check.client_chain_cas`) or what the caller adds in `used` (the
    broker chain the agent's session saw, the CAs `check --require-ca` names).
    Any other such finding becomes STALE_CA at severity OK: a stock system bundle
    ships a few expired roots nobody here relies on (Debian 12: Baltimore CyberTrust
    Root, E-Tugra, …), and they must not page anyone. `count_stale` keeps them all
    (`check --count-stale-cas`, the lint of the file)."""
    if count_stale:
        return check
    in_use = check.client_chain_cas | frozenset(used)
    findings = tuple(
        f if f.code not in TRUST_STORE_CODES or f.cert_sha256 in in_use
        else replace(f, code=pki.FindingCode.STALE_CA, severity=pki.Severity.OK,
                     message=f"stale CA in the bundle: {f.message}; no chain of this "
                             "device goes through it")
        for f in check.findings)
    return replace(check, findings=findings)


def required_ca_findings(trust_store: Sequence[pki.CertFacts],
                         required: Sequence[pki.Bundle]) -> list[pki.Finding]:
    """`check --require-ca`: a CA the device must trust (the one the broker moves to)
    that the bundle lacks warns, as the collector's required-CA alert does; a file
    that cannot be read says so (and makes the check UNKNOWN)."""
    held = {f.sha256 for f in trust_store}
    out: list[pki.Finding] = []
    for bundle in required:
        out.extend(bundle.findings)
        out.extend(pki.finding_about(pki.FindingCode.TRUST_STORE_MISSING_CA,
                                     pki.Severity.WARNING,
                                     f"trust store lacks required CA {c.facts.name} "
                                     f"({bundle.source}): connections that chain to it "
                                     "will fail", c.facts)
                   for c in bundle.certs if c.facts.sha256 not in held)
    return out


def linked_cas(leaf: pki.LoadedCert, pool: Sequence[pki.LoadedCert]) -> frozenset[str]:
    """The CAs of `pool` a chain from `leaf` reaches by issuer name and signature, valid
    or not: what "chains through it" means when the chain does not validate (an
    expired root fails the verifier, which then names no path). Every CA that could
    be the next link counts (a re-issued root with the same key and name: either may
    be the one a TLS stack picks)."""
    used: set[str] = set()
    current = leaf
    for _ in range(8):  # the verifier's max_chain_depth
        if current.facts.is_self_issued:
            break
        issuers = [c for c in pool if c.facts.subject == current.facts.issuer
                   and c.facts.sha256 not in used and verify_signature_with(current.cert, c.cert)]
        if not issuers:
            break
        used.update(c.facts.sha256 for c in issuers)
        current = issuers[0]
    return frozenset(used)


def cas_on_chain(leaf: pki.LoadedCert, pool: Sequence[pki.LoadedCert],
                 result: pki.ChainResult) -> frozenset[str]:
    """The CAs a chain goes through: the validated path when there is one, else the
    CAs it links to (see `linked_cas`)."""
    if result.is_valid:
        return frozenset(f.sha256 for f in result.path[1:])
    return linked_cas(leaf, pool)


def newest_not_before(material: DeviceMaterial) -> datetime | None:
    """The latest not_before among the certificates the device holds: its wall clock
    cannot honestly be earlier than that (the clock plausibility rule's input)."""
    certs = [*material.trust_store.certs, *(material.client.certs if material.client else ())]
    return max((c.facts.not_before for c in certs), default=None)


def check_device(
    material: DeviceMaterial, now: datetime, policy: pki.Policy,
    clock: ClockVerdict | None = None,
) -> DeviceCheck:
    """Judge the device's material at `now` (the device's own wall clock).

    With a clock verdict, a certificate that is "not yet valid" only because that
    clock is behind is not reported as a certificate problem: the clock findings say
    it (CLOCK_IMPLAUSIBLE / CLOCK_BEHIND), and the chain is judged at the best
    estimate of the true time instead (now + measured offset, or else the newest
    not_before the device holds, since the true time cannot be earlier).
    """
    checked = _check(material, now, policy, now)
    if clock is None:
        return checked
    explained = explained_by_clock(clock, _all_facts(checked), now)
    if not explained:
        return checked
    rejudged = _check(material, now, policy, best_true_now(clock, now, newest_not_before(material)))
    return replace(rejudged, findings=without_explained(rejudged.findings, explained))


def explained_by_clock(clock: ClockVerdict, facts: Sequence[pki.CertFacts],
                       now: datetime) -> set[str]:
    """Fingerprints of the certificates that look not-yet-valid only because of the clock."""
    return {f.sha256 for f in facts if explains_not_yet_valid(clock, f.not_before, now)}


def best_true_now(clock: ClockVerdict, now: datetime, newest_nb: datetime | None) -> datetime:
    """The best estimate of the true time: now + the measured offset, or else just past
    the newest not_before the device holds (the true time cannot be earlier)."""
    if clock.offset_s is not None:
        return now + timedelta(seconds=clock.offset_s)
    return max(now, newest_nb or now) + timedelta(seconds=1)


def without_explained(
    findings: Sequence[pki.Finding], explained: set[str]
) -> tuple[pki.Finding, ...]:
    return tuple(f for f in findings
                 if not (f.code == pki.FindingCode.CERT_NOT_YET_VALID
                         and f.cert_sha256 in explained))


def _all_facts(check: DeviceCheck) -> list[pki.CertFacts]:
    return [*check.trust_store, *([check.client] if check.client else []), *check.client_extra]


def _check(
    material: DeviceMaterial, now: datetime, policy: pki.Policy, chain_at: datetime
) -> DeviceCheck:
    findings: list[pki.Finding] = pki.trust_store_findings(material.trust_store, now, policy)
    client_facts: pki.CertFacts | None = None
    extra: tuple[pki.CertFacts, ...] = ()
    chain_now = chain_later = None
    chain_cas: frozenset[str] = frozenset()
    if material.client is not None:
        findings.extend(material.client.findings)
        if material.client.certs:
            leaf, *shipped = material.client.certs
            client_facts, extra = leaf.facts, tuple(c.facts for c in shipped)
            findings.extend(pki.expiry_findings(leaf.facts, now, policy, "client"))
            findings.extend(pki.strength_findings(leaf.facts, policy))
            for cert in shipped:
                findings.extend(pki.strength_findings(cert.facts, policy))
            anchors, store_intermediates = split_trust_store(material.trust_store)
            intermediates = [c.cert for c in shipped] + [c.cert for c in store_intermediates]
            roots = [c.cert for c in anchors]
            if roots:
                chain_now = verify_chain(leaf.cert, intermediates, roots, chain_at,
                                             purpose="client")
                chain_later = verify_chain(leaf.cert, intermediates, roots,
                                               chain_at + policy.warn_window, purpose="client")
                findings.extend(chain_findings(leaf.facts, chain_now, chain_later, now,
                                                   policy, role="client"))
                chain_cas = cas_on_chain(leaf, [*shipped, *material.trust_store.certs],
                                         chain_now)
            if material.key is not None:
                findings.extend(pki.key_findings(material.key, leaf.facts,
                                                 pki.cert_spki_sha256(leaf.cert)))
    findings.extend(material.key_findings)
    if material.key is not None and material.client is None:
        findings.extend(pki.key_findings(material.key, None, None))
    if material.signing is not None:
        findings.extend(_signing_findings(material.signing, now, policy))
    return DeviceCheck(
        now=now,
        trust_store=material.trust_store.facts,
        client=client_facts,
        client_extra=extra,
        key=material.key,
        chain_now=chain_now,
        chain_at_warn=chain_later,
        findings=tuple(_dedupe(findings)),
        client_chain_cas=chain_cas,
    )


def _signing_findings(signing: SigningMaterial, now: datetime,
                      policy: pki.Policy) -> list[pki.Finding]:
    """The dedicated signing pair: readable, matching, private, and not expiring (the
    collector keeps verifying an expired one, but the operator must renew it)."""
    findings = [*signing.bundle.findings, *signing.key_findings]
    leaf = signing.bundle.certs[0] if signing.bundle.certs else None
    if leaf is not None:
        findings.extend(pki.expiry_findings(leaf.facts, now, policy, "signing"))
    if signing.key is not None:
        findings.extend(pki.key_findings(signing.key, leaf.facts if leaf else None,
                                         pki.cert_spki_sha256(leaf.cert) if leaf else None))
    return findings


def _dedupe(findings: list[pki.Finding]) -> list[pki.Finding]:
    # The same CA can be reached as a trust-store entry and as a path element; say it once.
    seen: set[tuple[str, str | None]] = set()
    out = []
    for f in findings:
        key = (f.code.value, f.cert_sha256)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out
