"""The retained side messages a full status brings: the certificate chain, the inventory.

Owns what goes on the cert topic (the signing chain, and the client chain when it
differs) and when the trust-store inventory is signed again: when the trust store
changes, and when the signing certificate does (a retained inventory signed by a
replaced certificate could no longer be verified by a collector that (re)starts
after the renewal). Must not publish (`agent.delivery` holds and re-sends them) or
judge.
"""

from __future__ import annotations

from collections.abc import Callable

from certmon import wire as p

from .certstore import DeviceMaterial
from .delivery import SideMessage
from .identity import sign
from .status import inventory


def side_messages(prefix: str, status: p.Status, material: DeviceMaterial,
                  retained_digest: Callable[[str], str | None]) -> list[SideMessage]:
    """The side messages to (re)retain after `status`; `retained_digest(topic)` is the
    digest of what is held for a topic now."""
    out = []
    device_id, client, signing = status.device_id, material.client, material.signer()
    if signing is not None:
        msg = p.cert_message(device_id, [c.cert for c in signing[1].certs],
                             [c.cert for c in client.certs] if client else ())
        out.append(SideMessage(p.cert_topic(prefix, device_id), p.encode_message(msg)))
    topic, ts = p.inventory_topic(prefix, device_id), status.trust_store
    digest = (ts.digest if ts else "") + (signing[1].certs[0].facts.sha256 if signing else "")
    if ts is not None and retained_digest(topic) != digest:
        inv = inventory(device_id, status.ts, material.trust_store.facts)
        out.append(SideMessage(topic, sign(material, p.encode_message(inv), p.INVENTORY_TYP),
                               digest))
    return out
