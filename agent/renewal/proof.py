"""Proving a new certificate pair before it replaces the working one.

Owns the checks, in order, each failure a one-line reason: the pair parses, the key
belongs to the certificate, the chain builds to the device's trust store, the
validity covers `now` and ends later than the current certificate's, the identity
(`certmon.pki.identity_of`: the certmon device URI SAN, else the CN) is the device
id, and finally a real MQTT CONNECT/CONNACK with the new pair to the configured
broker. It works on the bytes the hook wrote (read once, `agent.renewal.hook`), and
the certificate file to install is re-encoded from the proven certificates only, so
a private key the hook put beside them in CERTMON_NEW_CERT never lands in the
(often world-readable) certificate file. Must not: read, write or move files
(`agent.renewal.install`), run the hook, or log key material.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from certmon import pki
from certmon.chain import verify_chain
from certmon.tlsprobe import ProbeTarget, probe

from .hook import HookOutput

NEW_CERT, NEW_KEY = "CERTMON_NEW_CERT", "CERTMON_NEW_KEY"  # the sources named in reasons


@dataclass(frozen=True, slots=True)
class NewPair:
    """A proven pair: exactly the bytes to install (and to probe the broker with)."""

    bundle: pki.Bundle
    facts: pki.CertFacts
    cert_pem: bytes  # the proven certificates re-encoded as PEM, leaf first; nothing else
    key_pem: bytes  # the key as the hook wrote it (installed with the key file's mode)


def prove_pair(output: HookOutput, *, trust_store: pki.Bundle,
               current: pki.CertFacts | None, device_id: str,
               now: datetime) -> NewPair | str:
    """The proven pair, or why it is refused."""
    bundle = pki.parse_bundle(output.cert_pem, NEW_CERT)
    if not bundle.certs or bundle.findings:
        return "the new certificate does not parse: " + (
            bundle.findings[0].message if bundle.findings else "no certificate in it")
    key_sha256, refused = _key_spki_sha256(output.key_pem)
    if key_sha256 is None:
        return refused
    leaf = bundle.certs[0]
    facts = leaf.facts
    if pki.cert_spki_sha256(leaf.cert) != key_sha256:
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
    pem = serialization.Encoding.PEM
    cert_pem = b"".join(c.cert.public_bytes(pem) for c in bundle.certs)
    return NewPair(bundle, facts, cert_pem, output.key_pem)


def _key_spki_sha256(data: bytes) -> tuple[str | None, str]:
    """(the key's SPKI fingerprint, "") or (None, why not); never key material."""
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        return None, f"the new key does not parse: {NEW_KEY}: it is encrypted"
    except (ValueError, UnsupportedAlgorithm) as exc:
        # cryptography's exception text never contains key material.
        why = ("it holds a certificate: a certificate where the key is expected?"
               if b"-----BEGIN CERTIFICATE-----" in data else type(exc).__name__)
        return None, f"the new key does not parse: {NEW_KEY}: not a usable private key ({why})"
    return pki.spki_sha256(key.public_key()), ""


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
