"""Certificate chains: building and validating a path, and what a path means.

Owns the chain rule: `verify_chain` (cryptography's verifier with an extension policy
for private IoT PKIs, and OpenSSL's store as the stated fallback for what cryptography
refuses by design) and `chain_findings` (an invalid chain, a CA on the path that
expires before the leaf). Pure like certmon.pki, whose facts and findings it uses:
every verdict is for an explicit instant `at`, so verdicts for the last few instants
are memoised by their inputs (a scan of 200 endpoints behind one certificate validates
it once per instant, "now" and "now + warn window", not 200 times, against one verifier
store); older instants are dropped, so a long-running agent (new instants every cycle)
keeps nothing from an earlier cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from threading import Lock

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID

from .pki import (
    CertFacts,
    ChainResult,
    Finding,
    FindingCode,
    Policy,
    Severity,
    days_of,
    expiry_findings,
    facts_from_cert,
    finding_about,
    human_days,
    iso_utc,
)


def _eku_validator(purpose: str) -> object:
    wanted = {
        "client": ExtendedKeyUsageOID.CLIENT_AUTH,
        "server": ExtendedKeyUsageOID.SERVER_AUTH,
    }.get(purpose)

    def check(_policy: object, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
        # Private IoT PKIs often issue leaves with no EKU at all: that is accepted.
        if eku is None or wanted is None:
            return
        if wanted not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
            raise ValueError(f"extended key usage does not allow {purpose} authentication")

    return check


def _policies(purpose: str) -> tuple[xv.ExtensionPolicy, xv.ExtensionPolicy]:
    # webpki's defaults require SANs and keyUsage bits that private fleet PKIs (and
    # Mosquitto's own test PKI) do not have; we keep the chain-building and signature
    # rules and relax only the extension requirements.
    ee = xv.ExtensionPolicy.permit_all().may_be_present(
        x509.ExtendedKeyUsage, xv.Criticality.AGNOSTIC, _eku_validator(purpose)  # type: ignore[arg-type]
    )
    ca = xv.ExtensionPolicy.permit_all().require_present(
        x509.BasicConstraints, xv.Criticality.AGNOSTIC, None
    )
    return ca, ee


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    at: datetime,
    *,
    purpose: str = "any",
) -> ChainResult:
    """Validate `leaf` up to one of `anchors` at instant `at`.

    cryptography's verifier first; it refuses RSA < 2048, SHA-1 and Ed25519-signed
    chains by design, so when such a certificate is involved the verdict comes from
    OpenSSL's X509Store through pyOpenSSL instead, and `method` says so. The same
    inputs give the same (shared, frozen) result: certificates compare by their DER.
    """
    key = (leaf, tuple(intermediates), tuple(anchors), purpose)
    with _memo_lock:
        held = _memo.results.get(at)
        result = None if held is None else held.get(key)
    if result is None:
        result = _verified(*key[:3], at, purpose)
        with _memo_lock:
            results = _memo.results.setdefault(at, {})
            results[key] = result
            while len(_memo.results) > MEMO_INSTANTS:
                _memo.results.pop(next(iter(_memo.results)))  # the oldest instant
    return result


MEMO_INSTANTS = 4  # a scan judges at 2 (now, now + warn window); an agent cycle at ~3


@dataclass(slots=True)
class _Memo:
    """Verdicts per recent instant, and the verifier store of the last anchor set."""

    results: dict[datetime, dict[tuple[object, ...], ChainResult]] = field(
        default_factory=dict)
    store: tuple[tuple[x509.Certificate, ...], xv.Store] | None = None


_memo = _Memo()
_memo_lock = Lock()


def _store(anchors: tuple[x509.Certificate, ...]) -> xv.Store:
    """The verifier's store of an anchor set (a 144-CA system bundle costs ~0.3 ms to
    load into one; a scan asks for the same set per endpoint)."""
    with _memo_lock:
        held = _memo.store
    if held is not None and held[0] == anchors:
        return held[1]
    store = xv.Store(list(anchors))
    with _memo_lock:
        _memo.store = (anchors, store)
    return store


def _verified(
    leaf: x509.Certificate,
    intermediates: tuple[x509.Certificate, ...],
    anchors: tuple[x509.Certificate, ...],
    at: datetime,
    purpose: str,
) -> ChainResult:
    if not anchors:
        return ChainResult(False, at, "none", error="trust store is empty")
    ca_policy, ee_policy = _policies(purpose)
    try:
        verifier = (
            xv.PolicyBuilder()
            .store(_store(anchors))
            .time(at)
            .max_chain_depth(8)
            .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
            .build_client_verifier()
        )
        verified = verifier.verify(leaf, list(intermediates))
        path = tuple(facts_from_cert(c) for c in verified.chain)
        return ChainResult(True, at, "cryptography", path=path)
    except (xv.VerificationError, ValueError) as exc:
        crypto_error = str(exc)
    openssl = _verify_with_openssl(leaf, intermediates, anchors, at)
    if openssl.is_valid and _needs_openssl(leaf, intermediates, anchors):
        return openssl
    return ChainResult(
        False,
        at,
        "cryptography",
        error=openssl.error or crypto_error,
        failing_cert_sha256=openssl.failing_cert_sha256,
        extra={"cryptography": crypto_error},
    )


def _needs_openssl(
    leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
) -> bool:
    for cert in (leaf, *intermediates, *anchors):
        facts = facts_from_cert(cert)
        if facts.key_type in {"Ed25519", "Ed448", "DSA"}:
            return True
        if facts.key_type == "RSA" and facts.key_bits < 2048:
            return True
        if facts.signature_hash in {"md5", "sha1"} or facts.signature_hash is None:
            return True
    return False


def _verify_with_openssl(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    at: datetime,
) -> ChainResult:
    from OpenSSL import crypto  # imported lazily: only the fallback path pays for it

    store = crypto.X509Store()
    for anchor in anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    # A store holding an intermediate (not a root) is a valid anchor for cryptography;
    # PARTIAL_CHAIN makes OpenSSL agree.
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    store.set_time(at.astimezone(UTC).replace(tzinfo=None))
    ctx = crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        [crypto.X509.from_cryptography(c) for c in intermediates],
    )
    try:
        chain = ctx.get_verified_chain()
    except crypto.X509StoreContextError as exc:
        failing = exc.certificate.to_cryptography() if exc.certificate is not None else None
        depth = exc.errors[1] if len(exc.errors) > 1 else "?"
        subject = facts_from_cert(failing).subject if failing is not None else "?"
        return ChainResult(
            False,
            at,
            "pyopenssl",
            error=f"{exc.errors[2] if len(exc.errors) > 2 else exc} (depth {depth}: {subject})",
            failing_cert_sha256=failing.fingerprint(hashes.SHA256()).hex() if failing else None,
        )
    path = tuple(facts_from_cert(c.to_cryptography()) for c in chain)
    return ChainResult(True, at, "pyopenssl", path=path)


def chain_findings(
    leaf: CertFacts,
    now_result: ChainResult,
    later_result: ChainResult,
    now: datetime,
    policy: Policy,
    *,
    role: str = "client",
) -> list[Finding]:
    """Findings about a validated (or not) chain: invalid now, and CAs on the path
    that expire before the leaf does. `later_result` (validity at the end of the
    warning window) stays a reported fact: whatever makes it fail is a certificate
    on the path expiring, which the expiry rules already name precisely."""
    out: list[Finding] = []
    broker = role == "broker"
    if not now_result.is_valid:
        code = FindingCode.BROKER_CHAIN_INVALID if broker else FindingCode.CHAIN_INVALID
        failing = now_result.failing_cert_sha256
        out.append(finding_about(code, Severity.CRITICAL,
                           f"chain of {leaf.name} does not validate: {now_result.error}",
                           leaf, cert_sha256=failing))
        return out
    path = now_result.path
    for ca in path[1:]:
        if ca.not_after < leaf.not_after:
            days_before = days_of(leaf.not_after - ca.not_after)
            out.append(Finding(
                FindingCode.INTERMEDIATE_EXPIRES_BEFORE_LEAF,
                Severity.WARNING,
                f"{'root' if ca.is_self_issued else 'intermediate'} CA {ca.name} expires "
                f"{iso_utc(ca.not_after)}, {human_days(days_before)} before {leaf.name}: "
                "the leaf stops validating then",
                cert_sha256=ca.sha256, subject=ca.subject, source=ca.source,
                not_after=ca.not_after))
            out.extend(expiry_findings(ca, now, policy, "intermediate"))
    return out


def earliest_expiry(path: Sequence[CertFacts]) -> CertFacts | None:
    """The certificate on a validated path that expires first (the one that matters)."""
    return min(path, key=lambda f: f.not_after) if path else None


def verify_signature_with(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key signed `cert` (used for diagnosis, not for validation)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
