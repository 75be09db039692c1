"""Who the device is and how it signs: its id from the client certificate, and the JWS.

Owns the device id's default (the client certificate's CN or certmon device URI,
validated as a topic-safe id) and signing a payload with the material's signer (the
dedicated signing pair when configured, else the client pair), with or without the
chain in `x5c`. Must not read files (`agent.certstore` does), decide when x5c rides
(`agent.x5c`), or log key material: only paths and fingerprints.
"""

from __future__ import annotations

from pathlib import Path

from certmon import pki
from certmon import wire as p
from certmon.errors import ConfigError, TransportError

from .certstore import DeviceMaterial


def device_id_from(material: DeviceMaterial, cert_path: Path) -> str:
    """The identity the client certificate carries, as a device id; ConfigError when
    it carries none, or one that is not a valid device id."""
    client = material.client
    facts = client.certs[0].facts if client and client.certs else None
    identity = pki.identity_of(facts) if facts else None
    if identity is None:
        raise ConfigError(f"{cert_path}: no device_id configured and no CN or "
                          "certmon device URI in the client certificate")
    problem = p.validate_device_id(identity)
    if problem:
        raise ConfigError(f"{cert_path}: certificate identity {identity!r} "
                          f"is not a valid device id: {problem}")
    return identity


def sign(material: DeviceMaterial, payload: bytes, typ: str, *,
         include_x5c: bool = False) -> bytes:
    """The compact JWS of `payload`; TransportError when the signer is unreadable."""
    signer = material.signer()
    if signer is None:
        which = ("signing nor the client" if material.signing is not None else "client")
        raise TransportError(f"cannot sign: the {which} certificate or key is unreadable")
    key, bundle = signer
    leaf, *chain = (c.cert for c in bundle.certs)
    return p.sign_jws(payload, key, leaf, typ=typ,  # type: ignore[arg-type]
                      include_x5c=include_x5c, chain=chain)
