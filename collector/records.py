"""Records: what the store is handed for a verified status or inventory, and the plan.

Owns the pure steps from verified messages to store records — a status's
`StatusRecord` (headline severity, clock-offset bounds, the certificate rows it
implies when asked for), an inventory's `InventoryRecord`, and `plan_of`, which puts a
batch's decided effects in message order with each run of statuses as one
transaction. Must not verify, read the clock or touch the store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from certmon import pki
from certmon import wire as p
from certmon.errors import ProtocolError

from . import aggregate
from .effects import Effect, Pending, Plan, Reject, Statuses, Unadmitted
from .store import CertLink, CertRole, CertRow, FindingRecord, InventoryRecord, StatusRecord
from .verify import CertCache, KnownCert, Verified

__all__ = ["cert_links", "inventory_record", "plan_of", "status_record"]


def status_record(verified: Verified, *, retained: bool, at: datetime,
                  with_certs: bool) -> StatusRecord:
    """`at`: when the message arrived, which the store keeps as received;
    `with_certs`: carry the certificate rows (the device's certificate changed)."""
    status, signer = verified.status, verified.signer
    severity, worst_code = aggregate.headline(status.findings)
    offset = aggregate.clock_offset(status, at, retained=retained)
    links: tuple[CertLink, ...] = ()
    roles: frozenset[CertRole] = frozenset()
    if with_certs:
        links, roles = cert_links(signer, status)
    return StatusRecord(
        device_id=status.device_id, boot_id=status.boot_id, seq=status.seq,
        device_ts=status.ts, received_at=at, interval_s=status.interval_s,
        status_json=verified.payload.decode("utf-8"),
        severity=int(severity), worst_code=worst_code,
        findings=tuple(FindingRecord(f.code, int(f.severity), f.cert, f.msg)
                       for f in status.findings),
        client_sha256=status.client.sha256 if status.client else None,
        trust_digest=status.trust_store.digest if status.trust_store else None,
        certs=links, replace_roles=roles,
        clock_offset_lo_s=offset.lo_s, clock_offset_hi_s=offset.hi_s,
    )


def inventory_record(certs: CertCache, device_id: str, token: bytes,
                     at: datetime) -> InventoryRecord:
    """A signed inventory as its record; raises ProtocolError with the reason."""
    parsed = p.parse_jws(token, p.MAX_INVENTORY_JWS_BYTES, typ=p.INVENTORY_TYP)
    known = certs.get(parsed.cert_sha256, at)
    if known is None:
        raise ProtocolError("unknown_cert", "inventory signed by an unknown certificate")
    if not known.trusted or known.identity != device_id:
        raise ProtocolError("identity_mismatch", "inventory not signed by this device")
    p.verify_jws(parsed, known.cert.public_key())
    inv = p.decode_message(p.Inventory, parsed.payload, max_bytes=p.MAX_INVENTORY_JWS_BYTES)
    if inv.device_id != device_id:
        raise ProtocolError("topic_mismatch", "inventory for another device")
    cas = tuple(CertRow(sha256=c.sha256, subject=c.subject, not_before=c.not_before,
                        not_after=c.not_after, is_ca=True) for c in inv.cas)
    return InventoryRecord(device_id, inv.digest, json.dumps(
        [c.to_json() for c in inv.cas], separators=(",", ":")), at, cas)


def plan_of(decided: Sequence[Pending | Effect | None]) -> Plan:
    """Effects in message order, each run of statuses as one `Statuses` (one
    transaction). Only a device-state effect (online, inventory) ends a run; a
    rejection inside a run is applied after it, which changes no state."""
    plan = Plan()
    run: list[Pending] = []
    rejects: list[Effect] = []

    def flush() -> None:
        if run:
            plan.effects.append(Statuses(tuple(run)))
            run.clear()
        plan.effects.extend(rejects)
        rejects.clear()

    for d in decided:
        if isinstance(d, Pending):
            run.append(d)
        elif isinstance(d, (Reject, Unadmitted)):
            rejects.append(d)
        elif d is not None:
            flush()
            plan.effects.append(d)
    flush()
    return plan


def cert_links(signer: KnownCert, status: p.Status
                ) -> tuple[tuple[CertLink, ...], frozenset[CertRole]]:
    """The certificate rows a status implies, and the roles they replace."""
    def chain(facts: Sequence[pki.CertFacts], der: Sequence[bytes]) -> list[CertLink]:
        return [CertLink(CertRow.from_facts(f, d), CertRole.CLIENT if i == 0 else CertRole.CHAIN)
                for i, (f, d) in enumerate(zip(facts, der, strict=True))]

    client_sha = status.client.sha256 if status.client else None
    if client_sha is None or client_sha == signer.facts.sha256:
        # Signed with the TLS key: the signing chain is the client chain.
        return (tuple(chain(signer.chain_facts, signer.chain_der)),
                frozenset({CertRole.CLIENT, CertRole.CHAIN}))
    # A dedicated signing key: the signing certificate in its own role, and the client
    # chain from the cert message when it names the client certificate of this status.
    links = [CertLink(CertRow.from_facts(signer.facts, signer.chain_der[0]), CertRole.SIGNING)]
    roles = {CertRole.SIGNING}
    facts = signer.client_chain_facts
    if facts and facts[0].sha256 == client_sha:
        links += chain(facts, signer.client_chain_der)
        roles |= {CertRole.CLIENT, CertRole.CHAIN}
    return tuple(links), frozenset(roles)
