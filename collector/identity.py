"""The collector's own identity as a signer of what it publishes.

Owns reading the collector's certificate (with the chain the file carries after it)
and key — the same pair it connects to the broker with, issued by the operations CA
that never issues device certificates (docs/mosquitto.md) — into a
`certmon.fleetsig.FleetSigner`. A pair that cannot sign is a ConfigError naming the
file, at start. Must not log or copy the key.
"""

from __future__ import annotations

from typing import cast

from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from certmon import pki
from certmon.errors import CertmonError, ConfigError
from certmon.fleetsig import FleetSigner

from .config import CollectorConfig


def collector_signer(config: CollectorConfig) -> FleetSigner:
    cert_path, key_path = config.tls.cert, config.tls.key
    bundle = pki.read_bundle(cert_path)
    if not bundle.certs:
        problems = "; ".join(f.message for f in bundle.findings)
        raise ConfigError(f"tls.cert: {cert_path}: no certificate ({problems})")
    _facts, findings, key = pki.read_private_key(key_path)
    if key is None:
        problems = "; ".join(f.message for f in findings)
        raise ConfigError(f"tls.key: {key_path}: {problems or 'no private key'}")
    certs = [c.cert for c in bundle.certs]
    try:
        # read_private_key returns the loaded key object, typed loosely for its callers.
        signer = FleetSigner(cast(PrivateKeyTypes, key), certs[0], tuple(certs[1:]))
    except CertmonError as exc:
        raise ConfigError(f"tls.key: {key_path}: cannot sign fleet topics with it: "
                          f"{exc}") from exc
    return signer

