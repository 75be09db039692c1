"""Reading the device's certificate material from disk: the thin I/O shell.

Owns: turning the configured paths (CA bundle, client certificate, private key, and
the dedicated status-signing certificate and key when configured) into
`DeviceMaterial`, and which certificate and key sign statuses. A missing or
unreadable file becomes a finding inside the material, never an exception. Must not
judge anything (that is `agent.report`) and never logs or serialises a private key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certmon import pki
from certmon.errors import PKIError
from certmon.files import read_regular


@dataclass(frozen=True, slots=True)
class SigningMaterial:
    """A dedicated status-signing certificate (bundle: leaf first) and its key."""

    bundle: pki.Bundle
    key: pki.KeyFacts | None
    key_findings: tuple[pki.Finding, ...]
    private_key: object | None = None

    def __repr__(self) -> str:
        return f"SigningMaterial(cert={self.bundle.source!r}, key=<hidden>)"


@dataclass(frozen=True, slots=True)
class DeviceMaterial:
    trust_store: pki.Bundle
    client: pki.Bundle | None
    key: pki.KeyFacts | None
    key_findings: tuple[pki.Finding, ...]
    # The key object itself, for signing; excluded from repr so it never reaches a log.
    private_key: object | None = None
    signing: SigningMaterial | None = None  # tls.signing_cert / tls.signing_key

    def __repr__(self) -> str:
        return (f"DeviceMaterial(trust_store={self.trust_store.source!r}, "
                f"client={self.client.source if self.client else None!r}, key=<hidden>, "
                f"signing={self.signing!r})")

    def signer(self) -> tuple[object, pki.Bundle] | None:
        """(private key, certificate bundle) that sign statuses and inventories: the
        dedicated signing pair when configured and usable, else the client pair; None
        when neither can be read. Falling back is never silent: the status it signs
        carries the signing pair's findings (a token that refuses its PIN, a module
        gone), so the fleet sees why instead of a device that went quiet."""
        if self.signing is not None and _usable(self.signing.private_key, self.signing.bundle):
            return self.signing.private_key, self.signing.bundle
        if self.client is not None and _usable(self.private_key, self.client):
            return self.private_key, self.client
        return None


def _usable(key: object | None, bundle: pki.Bundle | None) -> bool:
    return key is not None and bundle is not None and bool(bundle.certs)


# Parsed bundles by (path, SHA-256 of the bytes). Files are re-read every cycle (a
# renewed certificate must be noticed), but a 150-certificate system bundle that did
# not change is not re-parsed: that parse was most of a report's CPU time.
_PARSED: dict[tuple[str, str], pki.Bundle] = {}


# The token key this process loaded, by what loaded it: PKCS#11 logs in once per process
# and token, so a long-lived process (`run` with agent.fork_checks = false, the tests)
# reuses its session instead of loading it again each report; a new PIN file (by its
# mtime and size) loads it afresh.
_TOKEN_KEYS: dict[tuple[str, str, str, int, tuple[int, int] | None], tuple[Any, ...]] = {}


def token_key_cached(uri: str, module: str | Path | None, pin_file: str | Path | None
                     ) -> tuple[pki.KeyFacts | None, list[pki.Finding], object | None]:
    from certmon.pki.token import load_token_key

    try:
        pin_stat = os.stat(pin_file) if pin_file is not None else None
        pin_id = (pin_stat.st_mtime_ns, pin_stat.st_size) if pin_stat else None
    except OSError:
        pin_id = None  # load_token_key says why
    cache_key = (uri, str(module), str(pin_file), os.getpid(), pin_id)
    held = _TOKEN_KEYS.get(cache_key)
    if held is not None and held[2] is not None and not held[2].is_closed:
        return held[0], list(held[1]), held[2]
    for stale in [k for k in _TOKEN_KEYS if k[:3] == cache_key[:3]]:
        old = _TOKEN_KEYS.pop(stale)[2]
        if old is not None and stale[3] == os.getpid():
            old.close()  # its login would refuse the new one
    facts, findings, key = load_token_key(
        uri, module_path=str(module) if module is not None else None, pin_file=pin_file)
    if key is not None:
        _TOKEN_KEYS[cache_key] = (facts, tuple(findings), key)
    return facts, findings, key


def token_bundle(uri: str, key: object | None) -> pki.Bundle:
    """The signing certificate and its chain as stored on the token (no signing_cert
    file); a finding when the key could not be loaded or the token holds none."""
    from certmon.pki.token import TokenKey, parse_token_uri

    source = parse_token_uri(uri).label()
    if not isinstance(key, TokenKey):
        return pki.Bundle(source)  # the key's own finding says why
    try:
        ders = key.certificates()
    except PKIError as exc:
        ders, why = [], str(exc)
    else:
        why = (f"{source}: no certificate stored on the token; store it there "
               "(p11tool --write) or give tls.signing_cert")
    if not ders:
        return pki.Bundle(source, findings=(pki.Finding(
            pki.FindingCode.FILE_UNREADABLE, pki.Severity.CRITICAL, why, source=source),))
    pem = b"".join(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(d)
                   + b"-----END CERTIFICATE-----\n" for d in ders)
    return pki.parse_bundle(pem, source)


def read_bundle_cached(path: str | Path) -> pki.Bundle:
    source = str(path)
    try:
        data = read_regular(path)  # a FIFO or device never blocks the report
    except OSError:
        return pki.read_bundle(path)  # the unreadable-file finding, said once, in pki
    key = (source, hashlib.sha256(data).hexdigest())
    bundle = _PARSED.get(key)
    if bundle is None:
        for stale in [k for k in _PARSED if k[0] == source]:
            del _PARSED[stale]
        bundle = _PARSED[key] = pki.parse_bundle(data, source)
    return bundle


def read_material(
    ca_bundle: str | Path, cert: str | Path | None = None, key: str | Path | None = None,
    *, signing_cert: str | Path | None = None, signing_key: str | Path | None = None,
    signing_key_uri: str | None = None, pkcs11_module: str | Path | None = None,
    pkcs11_pin_file: str | Path | None = None,
) -> DeviceMaterial:
    trust_store = read_bundle_cached(ca_bundle)
    client = read_bundle_cached(cert) if cert is not None else None
    key_facts: pki.KeyFacts | None = None
    key_findings: list[pki.Finding] = []
    private_key: object | None = None
    if key is not None:
        key_facts, key_findings, private_key = pki.read_private_key(key)
    signing = None
    if signing_key_uri is not None:
        s_facts, s_findings, s_key = token_key_cached(signing_key_uri, pkcs11_module,
                                                      pkcs11_pin_file)
        bundle = (read_bundle_cached(signing_cert) if signing_cert is not None
                  else token_bundle(signing_key_uri, s_key))
        signing = SigningMaterial(bundle, s_facts, tuple(s_findings), s_key)
    elif signing_cert is not None and signing_key is not None:
        s_facts, s_findings, s_key = pki.read_private_key(signing_key)
        signing = SigningMaterial(read_bundle_cached(signing_cert), s_facts, tuple(s_findings),
                                  s_key)
    return DeviceMaterial(trust_store, client, key_facts, tuple(key_findings), private_key,
                          signing)
