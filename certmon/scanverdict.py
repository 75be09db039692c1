"""Scan verdicts: one observed TLS endpoint (a ProbeResult) → facts and findings.

Owns the scanner's judgement of a presented chain: per-element facts in the order sent,
chain validation against a trust store now and at now + warn window, hostname/SAN
matching, incomplete/misordered chains, self-signed leaves, expiry per element, the
earliest expiry on the path that actually validates, the revocation facts (CDP, OCSP,
stapling; `certmon.pki.revinfo` reads them), and how probe failures (timeouts,
refused client certificates, MQTT CONNACK refusals) map onto findings and severity.

Pure: a function of (ProbeResult, TrustStore, now, policy), shared by `certmon-scan`
(the `scanner` role) and the collector's scheduled scans. It must not open sockets,
read files or the clock (`certmon.scan` does that) and it must not re-implement a
certificate rule that `certmon.pki` (expiry, strength), `certmon.chain` (validation) or
`certmon.hostname` (RFC 6125 names) already owns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from . import pki
from .chain import chain_findings, earliest_expiry, verify_chain
from .hostname import match_hostname
from .pki import CertFacts, Finding, FindingCode, LoadedCert, Policy, Severity
from .pki.revinfo import RevocationPointers, ocsp_staple_status, revocation_pointers
from .tlsprobe import ProbeResult, ProbeTarget, sni_for

__all__ = [
    "PresentedCert",
    "ScanReport",
    "TrustStore",
    "judge",
    "parse_presented",
    "target_label",
    "trust_from_bundles",
]

# Ports where the leaf is judged as an MQTT broker certificate (BROKER_CERT_* codes).
MQTT_PORTS = frozenset({1883, 8883, 8884})
MQTT_ALPNS = frozenset({"mqtt", "x-amzn-mqtt-ca"})


@dataclass(frozen=True, slots=True)
class TrustStore:
    """Anchors to validate against, plus known intermediates that are *not* trusted but
    may complete a chain a server sends incompletely (INCOMPLETE_CHAIN diagnosis)."""

    source: str
    anchors: tuple[LoadedCert, ...]
    intermediates: tuple[LoadedCert, ...] = ()


def trust_from_bundles(anchors: pki.Bundle, intermediates: pki.Bundle | None = None) -> TrustStore:
    extra = intermediates.certs if intermediates is not None else ()
    return TrustStore(anchors.source, anchors.certs, tuple(extra))


@dataclass(frozen=True, slots=True)
class ScanReport:
    """Everything known about one endpoint at one instant; `severity` = worst finding."""

    target: ProbeTarget
    name: str  # "host:port" (or "servername@host:port"): the Prometheus `target` label
    checked_at: datetime
    severity: Severity
    presented: tuple[CertFacts, ...]  # as sent; `index` is the position on the wire
    path: tuple[CertFacts, ...]  # leaf → anchor: validated when chain_valid, else linked
    path_status: str  # "validated" | "completed" | "linked" (names only) | "none"
    chain_valid: bool | None  # None: nothing was presented
    chain_valid_at_warn: bool | None  # validity at now + policy.warn_window
    chain_error: str | None
    hostname: str
    hostname_match: str | None  # "san" | "cn" (legacy fallback) | "mismatch" | None
    earliest_expiry: CertFacts | None
    tls_version: str | None
    cipher: str | None
    alpn: str | None
    address: str | None
    mqtt_connack: int | None
    error: str | None
    error_kind: str | None
    duration_s: float | None
    findings: tuple[Finding, ...]
    # Revocation facts, no network fetch: each presented certificate's CRL
    # Distribution Points / OCSP responders / must-staple flag (in `presented` order),
    # whether the server stapled an OCSP response (None: no handshake) and its status.
    revocation: tuple[RevocationPointers, ...] = ()
    ocsp_stapled: bool | None = None
    ocsp_status: str | None = None

    @property
    def is_success(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class PresentedCert:
    """A presented certificate parsed once (source "scan", index 0), with its revocation
    pointers: a scan's endpoints mostly send the same few intermediates, often one leaf."""

    loaded: LoadedCert
    revocation: RevocationPointers


def parse_presented(ders: Iterable[bytes]) -> dict[bytes, PresentedCert | None]:
    """Each distinct DER parsed once; None for one that does not parse."""
    out: dict[bytes, PresentedCert | None] = {}
    for der in ders:
        if der not in out:
            certs = pki.parse_bundle(der, "scan").certs
            out[der] = PresentedCert(certs[0], revocation_pointers(certs[0].cert)) \
                if certs else None
    return out


def target_label(target: ProbeTarget) -> str:
    host = target.host.strip("[]")
    hostport = f"[{host}]:{target.port}" if ":" in host else f"{host}:{target.port}"
    return f"{target.servername}@{hostport}" if target.servername else hostport


def judge(
    result: ProbeResult,
    trust: TrustStore,
    now: datetime,
    policy: Policy,
    *,
    known_intermediates: Sequence[LoadedCert] = (),
    duration_s: float | None = None,
    parsed: Mapping[bytes, PresentedCert | None] | None = None,
) -> ScanReport:
    """The verdict on one probe. `known_intermediates` (e.g. what other endpoints of the
    same scan presented) only ever help *diagnose* an incomplete chain; they never make
    a chain valid. `parsed` (`parse_presented` of the scan's chains) saves parsing
    again what it holds; the verdict is the same without it."""
    target = result.target
    name = target_label(target)
    findings: list[Finding] = []
    ders = result.presented_der
    known = parsed or {}
    cache = parse_presented(d for d in ders if d not in known)
    cache.update((d, known[d]) for d in ders if d in known)
    presented, revocation = _parse_presented(ders, f"tls:{name}", cache, findings)
    hostname = _check_name(target)
    chain = _Chain()
    match: str | None = None
    if presented and presented[0].facts.index == 0:  # an unparseable leaf: nothing to judge
        leaf = presented[0].facts
        role = "broker" if _is_mqtt(target) else "server"
        chain = _judge_chain(presented, trust, known_intermediates, now, policy, role, findings)
        match = match_hostname(leaf, hostname)
        findings.extend(_hostname_findings(leaf, hostname, match))
        findings.extend(pki.expiry_findings(leaf, now, policy, role))
        for loaded in presented[1:]:
            findings.extend(pki.expiry_findings(loaded.facts, now, policy, "intermediate"))
        for loaded in presented:
            findings.extend(pki.strength_findings(loaded.facts, policy))
    findings.extend(_probe_findings(result, has_chain=bool(presented)))
    unique = _dedupe(findings)
    return ScanReport(
        target=target, name=name, checked_at=now, severity=pki.worst_severity(unique),
        presented=tuple(p.facts for p in presented), path=chain.path,
        path_status=chain.status, chain_valid=chain.valid, chain_valid_at_warn=chain.valid_later,
        chain_error=chain.error, hostname=hostname, hostname_match=match,
        earliest_expiry=earliest_expiry(chain.path), tls_version=result.tls_version,
        cipher=result.cipher, alpn=result.alpn, address=result.address,
        mqtt_connack=result.mqtt_connack, error=result.error, error_kind=result.error_kind,
        duration_s=duration_s, findings=tuple(unique),
        revocation=revocation,
        ocsp_stapled=None if result.ocsp_response is None else bool(result.ocsp_response),
        ocsp_status=ocsp_staple_status(result.ocsp_response) if result.ocsp_response else None,
    )  # fmt: skip


# --------------------------------------------------------------------------- chain


@dataclass(frozen=True, slots=True)
class _Chain:
    path: tuple[CertFacts, ...] = ()
    status: str = "none"
    valid: bool | None = None
    valid_later: bool | None = None
    error: str | None = None


def _parse_presented(
    ders: Sequence[bytes], source: str, parsed: Mapping[bytes, PresentedCert | None],
    findings: list[Finding],
) -> tuple[list[LoadedCert], tuple[RevocationPointers, ...]]:
    out: list[LoadedCert] = []
    revocation: list[RevocationPointers] = []
    for position, der in enumerate(ders):
        entry = parsed[der]
        if entry is None:
            # A leaf nobody can parse fails every client; an odd extra certificate does not.
            severity = Severity.CRITICAL if position == 0 else Severity.WARNING
            findings.append(Finding(FindingCode.UNPARSEABLE_BLOCK, severity,
                                    f"{source}: presented certificate #{position} does not "
                                    "parse", source=source))
            continue
        facts = dataclasses.replace(entry.loaded.facts, source=source, index=position)
        out.append(LoadedCert(entry.loaded.cert, facts))
        revocation.append(entry.revocation)
    return out, tuple(revocation)


def _judge_chain(
    presented: list[LoadedCert], trust: TrustStore, known: Sequence[LoadedCert],
    now: datetime, policy: Policy, role: str, findings: list[Finding],
) -> _Chain:
    leaf, rest = presented[0], [p.cert for p in presented[1:]]
    anchors = [a.cert for a in trust.anchors]
    now_result = verify_chain(leaf.cert, rest, anchors, now, purpose="server")
    later = verify_chain(leaf.cert, rest, anchors, now + policy.warn_window, purpose="server")
    facts = leaf.facts
    # chain_findings knows "broker" (BROKER_CHAIN_INVALID) and otherwise CHAIN_INVALID.
    role = "broker" if role == "broker" else "server"
    if now_result.is_valid:
        findings.extend(chain_findings(facts, now_result, later, now, policy, role=role))
        if facts.is_self_issued:
            findings.append(_about(FindingCode.SELF_SIGNED_LEAF, Severity.WARNING,
                                   f"self-signed leaf {facts.subject} is trusted only because "
                                   "the trust store pins it: there is no CA to rotate it", facts))
        path = _relabel(now_result.path, presented, trust)
        findings.extend(_order_findings(presented, path))
        return _Chain(path, "validated", True, later.is_valid)
    # Invalid now. Facts survive: link the chain by names and key ids (no signatures, no
    # time) so that an expired or untrusted chain still has dates and an earliest expiry.
    linked, borrowed = _link(presented, _pool(presented, trust, known), trust.anchors)
    reaches_anchor = linked[-1].facts.sha256 in {a.facts.sha256 for a in trust.anchors}
    status, path = "linked", tuple(x.facts for x in linked)
    if borrowed and reaches_anchor:
        # It would link up with intermediates the server did not send: incomplete chain.
        # Verified again with them so the path (and its earliest expiry) is a real one.
        extra = [b.cert for b in borrowed]
        completed = verify_chain(leaf.cert, rest + extra, anchors, now, purpose="server")
        status = "completed"
        path = _relabel(completed.path, [*presented, *borrowed], trust) or path
        names = ", ".join(b.facts.subject for b in borrowed)
        findings.append(_about(FindingCode.INCOMPLETE_CHAIN, Severity.CRITICAL,
                               f"server does not send intermediate {names}: clients holding "
                               f"only {trust.source} cannot validate {facts.subject}", facts))
    elif facts.is_self_issued and not facts.is_ca:
        findings.append(_about(FindingCode.SELF_SIGNED_LEAF, Severity.CRITICAL,
                               f"leaf {facts.subject} is self-signed and not in the trust "
                               f"store {trust.source}", facts))
    else:
        hint = _missing_issuer_hint(linked, trust)
        invalid = dataclasses.replace(now_result, error=f"{now_result.error}{hint}")
        findings.extend(chain_findings(facts, invalid, later, now, policy, role=role))
    findings.extend(_order_findings(presented, path))
    return _Chain(path, status, False, later.is_valid, now_result.error)


def _relabel(
    path: Sequence[CertFacts], known: Sequence[LoadedCert], trust: TrustStore
) -> tuple[CertFacts, ...]:
    # The verifier's facts carry no source; ours say "tls:host:port" #position or the
    # trust bundle's path and index, which is what a report reader needs.
    by_sha = {c.facts.sha256: c.facts for c in (*trust.anchors, *known)}
    return tuple(by_sha.get(f.sha256, f) for f in path)


def _pool(
    presented: list[LoadedCert], trust: TrustStore, known: Sequence[LoadedCert]
) -> list[LoadedCert]:
    sent = {p.facts.sha256 for p in presented}
    out: dict[str, LoadedCert] = {}
    for cand in (*trust.intermediates, *known):
        if cand.facts.is_ca and cand.facts.sha256 not in sent:
            out.setdefault(cand.facts.sha256, cand)
    return list(out.values())


def _issued_by(child: CertFacts, parent: CertFacts) -> bool:
    if child.issuer != parent.subject:
        return False
    # Same name, other key (the fake_root case): key identifiers tell them apart.
    return child.aki is None or parent.ski is None or child.aki == parent.ski


def _link(
    presented: list[LoadedCert], pool: list[LoadedCert], anchors: Sequence[LoadedCert]
) -> tuple[list[LoadedCert], list[LoadedCert]]:
    """Leaf → issuer → … by names and key ids, preferring trust anchors, then what the
    server sent, then the pool. Returns (path, the pool members it needed)."""
    path, borrowed = [presented[0]], []
    used = {presented[0].facts.sha256}
    groups = (("anchor", anchors), ("sent", presented[1:]), ("pool", pool))
    while len(path) < 10 and not path[-1].facts.is_self_issued:
        child = path[-1].facts
        found = next(((kind, c) for kind, group in groups for c in group
                      if c.facts.sha256 not in used and _issued_by(child, c.facts)), None)
        if found is None:
            break
        kind, parent = found
        path.append(parent)
        used.add(parent.facts.sha256)
        if kind == "pool":
            borrowed.append(parent)
        if kind == "anchor":  # trusted: the path ends here, as a verifier's would
            break
    return path, borrowed


def _missing_issuer_hint(linked: list[LoadedCert], trust: TrustStore) -> str:
    top = linked[-1].facts
    if top.is_self_issued or top.sha256 in {a.facts.sha256 for a in trust.anchors}:
        return ""
    return (f"; issuer {top.issuer} of {top.subject} is neither sent by the server nor in "
            f"{trust.source} (incomplete chain or untrusted CA)")


def _order_findings(presented: list[LoadedCert], path: Sequence[CertFacts]) -> list[Finding]:
    """Extra certificates (not on the path) and path members sent out of order. TLS 1.3
    tolerates both, but TLS 1.2 stacks and small embedded clients do not."""
    rank = {f.sha256: i for i, f in enumerate(path)}
    leaf = presented[0].facts
    extra = [p.facts for p in presented[1:] if p.facts.sha256 not in rank]
    seen = [rank[p.facts.sha256] for p in presented if p.facts.sha256 in rank]
    dupes = len(seen) != len(set(seen))
    out: list[Finding] = []
    if extra or dupes:
        names = ", ".join(f"#{f.index} {f.subject}" for f in extra) or "a duplicate"
        out.append(_about(FindingCode.CHAIN_MISORDERED, Severity.WARNING,
                          f"server sends certificate(s) not on the chain of {leaf.subject}: "
                          f"{names}", leaf))
    if seen != sorted(seen) and not dupes:
        order = ", ".join(f"#{p.facts.index} {p.facts.subject}" for p in presented)
        out.append(_about(FindingCode.CHAIN_MISORDERED, Severity.WARNING,
                          f"chain sent out of order ({order}); expected leaf first, then "
                          "each issuer", leaf))
    return out


# --------------------------------------------------------------------------- hostname


def _check_name(target: ProbeTarget) -> str:
    # What a client would check: the SNI name it sends, else the host (an IP literal).
    return sni_for(target) or target.host.strip("[]").split("%", 1)[0]


def _hostname_findings(leaf: CertFacts, name: str, match: str) -> list[Finding]:
    if match == "san":
        return []
    if match == "cn":
        return [_about(FindingCode.HOSTNAME_MISMATCH, Severity.WARNING,
                       f"{name} matches only the subject CN of {leaf.subject}, which has no "
                       "subjectAltName: Go, Chrome and hostname-checking MQTT clients "
                       "reject it", leaf)]
    sans = ", ".join(leaf.sans) or f"no SAN, CN={leaf.common_name}"
    return [_about(FindingCode.HOSTNAME_MISMATCH, Severity.CRITICAL,
                   f"{leaf.subject} is not valid for {name} ({sans})", leaf)]


# --------------------------------------------------------------------------- probe outcome


def _is_mqtt(target: ProbeTarget) -> bool:
    return target.mqtt or target.port in MQTT_PORTS or bool(MQTT_ALPNS & set(target.alpn))


def _probe_findings(result: ProbeResult, *, has_chain: bool) -> list[Finding]:
    kind, error = result.error_kind, result.error
    source = f"tls:{target_label(result.target)}"
    if kind is None:
        return []
    if kind == "mqtt_refused":
        return [_finding(FindingCode.MQTT_CONNACK_REFUSED, Severity.CRITICAL,
                         f"broker refused MQTT CONNECT: CONNACK {result.mqtt_connack} "
                         f"({result.mqtt_error})", source)]
    if kind == "client_cert_rejected":
        return [_finding(FindingCode.CLIENT_CERT_REJECTED, Severity.CRITICAL,
                         f"broker rejects our client certificate: {error}", source)]
    if kind == "client_cert_required" and has_chain and not result.target.mqtt:
        # The server chain was observed in full; the refusal only says "mTLS listener".
        return [_finding(FindingCode.CLIENT_CERT_REQUIRED, Severity.OK,
                         "listener requires a client certificate (pass --cert/--key to "
                         "test the MQTT session too)", source)]
    return [_finding(FindingCode.PROBE_FAILED, Severity.UNKNOWN, f"{kind}: {error}", source)]


def _finding(code: FindingCode, severity: Severity, message: str, source: str) -> Finding:
    return Finding(code, severity, message, source=source)


def _about(code: FindingCode, severity: Severity, message: str, facts: CertFacts) -> Finding:
    return Finding(code, severity, message, cert_sha256=facts.sha256, subject=facts.subject,
                   source=facts.source, not_after=facts.not_after)


def _dedupe(findings: list[Finding]) -> list[Finding]:
    # chain_findings and the per-element expiry rule both name an expiring intermediate.
    seen: set[tuple[str, str | None, str]] = set()
    out: list[Finding] = []
    for f in findings:
        key = (str(f.code), f.cert_sha256, f.message)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out

