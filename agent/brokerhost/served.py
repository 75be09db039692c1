"""Served versus on disk: the certificate a listener presents now against its certfile.

Owns `probe_listener` (the I/O shell: one TLS handshake with the listener, on its
bound address or loopback, verification off, no client certificate: the server's
Certificate message comes before any request for ours) and `served_findings` (pure):
`BROKER_CERT_NOT_RELOADED` when the served leaf is not the certfile's, naming both
SHA-256 fingerprints and both notAfter instants; and `probe_bridge`, the chain a
bridge's remote presents (judged against the bridge's CAs by `inventory`).
Must not: read certificate files (that is `inventory`) or judge the certfile itself.

Why: certbot, step or an operator renews the certfile, but Mosquitto keeps serving
the certificate it loaded at start until it is restarted (mosquitto#1877), so the
outage comes on the *old* certificate's date while every file check says all is well.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from certmon import pki
from certmon.tlsprobe import ProbeTarget, probe

from .model import Endpoint

PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ServedCert:
    """What one TLS listener presented: its leaf, or why nothing was seen."""

    target: str  # "127.0.0.1:8883"
    tls_version: str | None = None
    leaf: pki.CertFacts | None = None
    error: str | None = None


def probe_listener(endpoint: Endpoint, timeout_s: float = PROBE_TIMEOUT_S) -> ServedCert | None:
    """Handshake with a TLS listener; None for one without a port (a Unix socket)."""
    if endpoint.kind != "listener" or endpoint.port is None or not endpoint.is_tls:
        return None
    host = endpoint.host or "127.0.0.1"  # a wildcard bind answers on loopback too
    target = f"[{host}]:{endpoint.port}" if ":" in host else f"{host}:{endpoint.port}"
    seen = probe(ProbeTarget(host=host, port=endpoint.port, timeout_s=timeout_s))
    leaf = None
    if seen.presented_der:
        bundle = pki.parse_bundle(seen.presented_der[0], f"tls:{target}")
        leaf = bundle.certs[0].facts if bundle.certs else None
    error = None if leaf is not None else (seen.error or "no certificate presented")
    return ServedCert(target, seen.tls_version, leaf, error)


@dataclass(frozen=True, slots=True)
class RemoteChain:
    """What a bridge's remote endpoint presented (leaf first), or why nothing."""

    host: str
    port: int
    tls_version: str | None = None
    presented_der: tuple[bytes, ...] = ()
    error: str | None = None


def probe_bridge(endpoint: Endpoint, timeout_s: float = PROBE_TIMEOUT_S) -> RemoteChain | None:
    """Handshake with a TLS bridge's remote (its first address), as the bridge would,
    but without its client certificate: the remote's chain is all that is needed."""
    if endpoint.kind != "bridge" or endpoint.host is None or endpoint.port is None \
            or not endpoint.is_tls:
        return None
    seen = probe(ProbeTarget(host=endpoint.host, port=endpoint.port, timeout_s=timeout_s))
    error = None if seen.presented_der else (seen.error or "no certificate presented")
    return RemoteChain(endpoint.host, endpoint.port, seen.tls_version, seen.presented_der,
                       error)


def served_findings(endpoint: Endpoint, on_disk: pki.CertFacts | None, served: ServedCert,
                    now: datetime, policy: pki.Policy) -> list[pki.Finding]:
    """Compare what `endpoint` serves with its certfile's leaf (`on_disk`)."""
    at = endpoint.at
    if served.leaf is None:
        return [pki.Finding(pki.FindingCode.PROBE_FAILED, pki.Severity.WARNING,
                            f"{at}: {endpoint.name}: no TLS handshake with {served.target} "
                            f"({served.error}); cannot compare the served certificate "
                            "with the certfile", source=at)]
    leaf = served.leaf
    if on_disk is None or on_disk.sha256 == leaf.sha256:
        return []
    left = leaf.days_left(now)
    severity = pki.Severity.CRITICAL if left <= policy.crit_days else pki.Severity.WARNING
    return [pki.Finding(
        pki.FindingCode.BROKER_CERT_NOT_RELOADED, severity,
        f"{at}: {endpoint.name} serves {leaf.name} sha256 {leaf.sha256} (notAfter "
        f"{pki.iso_utc(leaf.not_after)}, in {pki.human_days(left)}) but its certfile "
        f"{on_disk.source} holds {on_disk.name} sha256 {on_disk.sha256} (notAfter "
        f"{pki.iso_utc(on_disk.not_after)}): the broker was not restarted since the "
        "certificate was replaced; it fails on the served one's date",
        cert_sha256=leaf.sha256, subject=leaf.subject, source=on_disk.source,
        not_after=leaf.not_after)]
