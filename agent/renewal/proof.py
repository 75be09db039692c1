"""Proving a new certificate pair before it replaces the working one.

Owns the checks, in order, each failure a one-line reason: the pair parses, the key
belongs to the certificate, the chain builds to the device's trust store, the
validity covers `now` and ends later than the current certificate's, the identity
(`certmon.pki.identity_of`: the certmon device URI SAN, else the CN) is the device
id, and finally a real MQTT CONNECT/CONNACK with the new pair to the configured
broker. Must not: write or move files (`agent.renewal.install`), run the hook, or
log key material.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from certmon import pki
from certmon.chain import verify_chain
from certmon.tlsprobe import ProbeTarget, probe


@dataclass(frozen=True, slots=True)
class NewPair:
    bundle: pki.Bundle
    facts: pki.CertFacts


def prove_pair(new_cert: Path, new_key: Path, *, trust_store: pki.Bundle,
               current: pki.CertFacts | None, device_id: str,
               now: datetime) -> NewPair | str:
    """The proven pair, or why it is refused."""
    if not new_cert.exists() or new_cert.stat().st_size == 0:
        return "the hook exited 0 but wrote no certificate to CERTMON_NEW_CERT"
    if not new_key.exists() or new_key.stat().st_size == 0:
        return "the hook exited 0 but wrote no key to CERTMON_NEW_KEY"
    bundle = pki.read_bundle(new_cert)
    if not bundle.certs:
        return "the new certificate does not parse: " + (
            bundle.findings[0].message if bundle.findings else "no certificate in it")
    key_facts, key_problems, _key = pki.read_private_key(new_key)
    if key_facts is None:
        return "the new key does not parse: " + (
            key_problems[0].message if key_problems else "unreadable")
    leaf = bundle.certs[0]
    facts = leaf.facts
    if pki.cert_spki_sha256(leaf.cert) != key_facts.public_sha256:
        return f"the new key does not belong to the new certificate ({facts.name})"
    chain = verify_chain(leaf.cert, [c.cert for c in bundle.certs[1:]],
                         [c.cert for c in trust_store.certs], now, purpose="client")
    if not chain.is_valid:
        return (f"the new certificate does not chain to the trust store "
                f"{trust_store.source}: {chain.error}")
    if not facts.not_before <= now < facts.not_after:
        return (f"the new certificate is not valid now ({pki.iso_utc(facts.not_before)} to "
                f"{pki.iso_utc(facts.not_after)})")
    if current is not None and facts.not_after <= current.not_after:
        return (f"the new certificate ends {pki.iso_utc(facts.not_after)}, not later than "
                f"the current one ({pki.iso_utc(current.not_after)})")
    identity = pki.identity_of(facts)
    if identity != device_id:
        return f"the new certificate is for {identity!r}, not this device ({device_id!r})"
    return NewPair(bundle, facts)


def prove_connect(host: str, port: int, *, servername: str | None, alpn: tuple[str, ...],
                  new_cert: Path, new_key: Path, device_id: str, timeout_s: float) -> str | None:
    """A real MQTT CONNECT/CONNACK with the new pair; None when the broker accepted it.
    Its own client id, so the agent's running session is not taken over."""
    result = probe(ProbeTarget(host=host, port=port, servername=servername, alpn=alpn,
                               client_cert=str(new_cert), client_key=str(new_key), mqtt=True,
                               mqtt_client_id=f"certmon-{device_id}-renewal"[:64],
                               timeout_s=timeout_s))
    if result.error is None and result.mqtt_connack == 0:
        return None
    why = result.error or result.mqtt_error or f"CONNACK {result.mqtt_connack}"
    return f"the broker {host}:{port} refused the new pair: {why}"
