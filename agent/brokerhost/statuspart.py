"""A judged broker host as the status part `run` signs: `BrokerReport` → wire.

Owns `status_part` (pure): the compact `certmon.wire.BrokerHostState` of a
`BrokerReport` — every endpoint, each file's worst severity, a few certificates
and CRLs with their dates, the served leaf and whether it is the certfile's — and
`host_findings`, the report's findings that go into the status's findings list
(so the collector alerts on them as on a device's own). Must not read files or
sockets (`inventory`, `served` do) or sign (the service does).
"""

from __future__ import annotations

import json

from certmon import pki
from certmon import wire as p
from certmon.pki.crl import CrlFacts

from .inventory import BrokerReport, EndpointReport, FileReport

MAX_ENDPOINTS = 16
MAX_FILES = 6
MAX_CERTS = 4
MAX_CRLS = 4


# The part's share of a status (MAX_STATUS_JWS_BYTES is 16 KiB, base64 adds a third):
# a typical broker host's is 1-3 KB; one with many listeners loses its quietest
# endpoints from the part (their findings still travel in the findings list).
MAX_PART_BYTES = 8192


def status_part(report: BrokerReport, max_bytes: int = MAX_PART_BYTES) -> p.BrokerHostState:
    endpoints = [_endpoint(e) for e in report.endpoints[:MAX_ENDPOINTS]]
    rank = {id(e): (-max((f.severity for f in e.files), default=pki.Severity.OK)
                    - (e.is_reloaded is False), i) for i, e in enumerate(endpoints)}
    while True:
        part = p.BrokerHostState(
            kind=report.config.kind, config=report.config.path, checked_at=report.now,
            severity=pki.worst_severity(report.findings),
            files_read=len(report.config.files_read), endpoints=tuple(endpoints))
        if len(endpoints) <= 1 or len(json.dumps(part.to_json())) <= max_bytes:
            return part
        quietest = max(endpoints, key=lambda e: rank[id(e)])
        endpoints.remove(quietest)


def host_findings(report: BrokerReport) -> tuple[pki.Finding, ...]:
    """The findings that count (severity above OK: an INFO line is not worth a slot
    in a status whose findings list is capped)."""
    return tuple(f for f in report.findings if f.severity != pki.Severity.OK)


def _endpoint(e: EndpointReport) -> p.BrokerEndpointState:
    leaf = next((f.certs[0] for f in e.files if f.ref.role == "certfile" and f.certs), None)
    served = e.served.leaf if e.served is not None else None
    served_error = e.served.error if e.served is not None else None
    if e.remote is not None:
        # A bridge: what its remote presented to the agent's own probe (the broker a
        # gateway's local Mosquitto bridges to); its chain's findings are the remote's.
        served = e.remote.chain[0] if e.remote.chain else None
        served_error = e.remote.error
    return p.BrokerEndpointState(
        kind=e.endpoint.kind, name=e.endpoint.name, at=e.endpoint.at, port=e.endpoint.port,
        is_tls=e.endpoint.is_tls, require_certificate=e.endpoint.require_certificate,
        files=tuple(_file(f) for f in e.files[:MAX_FILES]),
        served=p.cert_brief_from_facts(served) if served is not None else None,
        served_error=served_error,
        is_reloaded=(served.sha256 == leaf.sha256) if served and leaf and e.remote is None
        else None)


def _file(f: FileReport) -> p.BrokerFile:
    certs = list(f.certs)
    if f.ref.role != "certfile":  # a CA file: the one that expires first matters
        certs.sort(key=lambda c: c.not_after)
    return p.BrokerFile(
        directive=f.ref.directive, path=f.ref.path, at=f.ref.at,
        severity=pki.worst_severity(f.findings), cert_count=len(f.certs),
        certs=tuple(p.cert_brief_from_facts(c) for c in certs[:MAX_CERTS]),
        crls=tuple(_crl(c) for c in f.crls[:MAX_CRLS]))


def _crl(crl: CrlFacts) -> p.CrlBrief:
    # A CRL number may have 20 octets (RFC 5280); the wire's integers are 63-bit.
    number = crl.crl_number if crl.crl_number is not None and crl.crl_number < 2**63 else None
    return p.CrlBrief(issuer=crl.issuer, this_update=crl.this_update,
                      next_update=crl.next_update, crl_number=number,
                      revoked_count=crl.revoked_count, signed_by=crl.signed_by)
