"""Signatures on what the collector publishes: fleet views, alerts and the time beacon.

The broker's ACL keeps devices off the collector's topics (docs/mosquitto.md), but a
consumer that reads them through a bridge, a second broker or a dashboard with wider
rights cannot see that ACL. So the collector signs each payload it publishes with its
own identity (a certificate of the operations CA, which never issues device
certificates) and sends the signature beside the payload, as the MQTT v5 user
property `certmon-sig`: a JWS with a detached payload (RFC 7515 Appendix F), its
header binding the topic and carrying the signer's chain (`x5c`). The payload stays
the plain JSON dashboards already read; a consumer that cares checks the signature
against the operations CA with `verify_fleet`.

Owns that signature format only. It must not publish, subscribe or read the clock
(`at` is passed in); chain validation is certmon.chain's, the JWS primitives are
certmon.wire.jws's.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from certmon.chain import verify_chain
from certmon.errors import PKIError, ProtocolError
from certmon.wire.jws import (
    _b64url,
    alg_for_key,
    jws_signature,
    parse_jws,
    verify_jws,
    x5t_s256,
)

FLEET_TYP = "certmon-fleet+jws"
SIG_PROPERTY = "certmon-sig"
# Header (with a 2-3 certificate x5c) plus signature; anything longer is not ours.
MAX_SIG_BYTES = 16384


@dataclass(frozen=True, slots=True)
class FleetSigner:
    """The collector's signing identity: its key (used in place) and certificate chain."""

    key: PrivateKeyTypes = field(repr=False)
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()
    # The header's fixed part, built once: it is signed on every publish.
    _fixed: dict[str, object] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if self.key.public_key().public_bytes(der, spki) != \
                self.cert.public_key().public_bytes(der, spki):
            raise PKIError("the collector's key does not match its certificate")
        fixed = {"alg": alg_for_key(self.key),  # an unsupported key type fails here
                 "typ": FLEET_TYP, "x5t#S256": x5t_s256(self.cert),
                 "x5c": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                         for c in (self.cert, *self.chain)]}
        object.__setattr__(self, "_fixed", fixed)

    def sign(self, topic: str, payload: bytes) -> str:
        """The detached JWS of `payload` published on `topic` (`header..signature`)."""
        header = {**self._fixed, "topic": topic}
        header_b64 = _b64url(json.dumps(header, separators=(",", ":")).encode("ascii"))
        signature = jws_signature(self.key, header_b64 + b"." + _b64url(payload))
        return (header_b64 + b".." + _b64url(signature)).decode("ascii")

    def user_properties(self, topic: str, payload: bytes) -> tuple[tuple[str, str]]:
        return ((SIG_PROPERTY, self.sign(topic, payload)),)


def verify_fleet(topic: str, payload: bytes, signature: str | None,
                 anchors: Sequence[x509.Certificate], at: datetime) -> x509.Certificate:
    """The certificate that signed `payload` on `topic`, chained to one of `anchors`
    (the operations CA) at `at`; ProtocolError with a stable reason otherwise:
    `unsigned`, `not_jws`/`bad_header`/… (the JWS parser's), `topic_mismatch`,
    `bad_signature`, `untrusted_cert`."""
    if not signature:
        raise ProtocolError("unsigned", f"no {SIG_PROPERTY} user property")
    if len(signature) > MAX_SIG_BYTES:
        raise ProtocolError("oversized", f"signature of {len(signature)} bytes")
    parts = signature.encode("ascii", "replace").split(b".")
    if len(parts) != 3 or parts[1]:
        raise ProtocolError("not_jws", "expected a detached JWS (header..signature)")
    token = parts[0] + b"." + _b64url(payload) + b"." + parts[2]
    parsed = parse_jws(token, MAX_SIG_BYTES + 4 * len(payload), typ=FLEET_TYP)
    if parsed.header.get("topic") != topic:
        raise ProtocolError("topic_mismatch", "signed for another topic: "
                            f"{str(parsed.header.get('topic'))[:120]!r}")
    if not parsed.x5c:
        raise ProtocolError("bad_header", "x5c missing: the signer's chain is required")
    try:
        certs = [x509.load_der_x509_certificate(der) for der in parsed.x5c]
    except ValueError as exc:
        raise ProtocolError("bad_header", f"x5c holds a certificate that does not parse: "
                            f"{exc}") from exc
    verify_jws(parsed, certs[0].public_key())
    result = verify_chain(certs[0], certs[1:], anchors, at, purpose="client")
    if not result.is_valid:
        raise ProtocolError("untrusted_cert", f"signer does not chain to the operations CA: "
                            f"{result.error}")
    return certs[0]
