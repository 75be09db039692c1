"""Certificate facts and findings: bundles → certificates → facts → findings.

One package, one home per part: `model` (severities, finding codes, the policy, the
fact and finding types and their JSON form), `bundle` (PEM/DER bundles read into
certificates, never raising), `facts` (what one certificate says about itself),
`keys` (public-key facts, reading a private key) and `rules` (every per-certificate
judgement: expiry, strength, trust-store hygiene, key fit and permissions). The chain
rule is in `certmon.chain`, built on it. Callers import the package:
`from certmon import pki`, then `pki.read_bundle(...)`.

It is pure: every judgement takes `now` (a tz-aware UTC datetime) and a `Policy`; the
only I/O is the thin `read_bundle`/`read_private_key` shells, which turn an unreadable
file into a finding instead of an exception. It must not import paho, the agent or
the collector.
"""

from .bundle import parse_bundle, read_bundle
from .facts import _serial_hex as _serial_hex  # tests pin the serial's spelling
from .facts import facts_from_cert, identity_of, raw_serial, tolerant
from .keys import cert_spki_sha256, describe_public_key, read_private_key, spki_sha256
from .model import (
    Bundle,
    CertFacts,
    ChainResult,
    Finding,
    FindingCode,
    KeyFacts,
    LoadedCert,
    Policy,
    Severity,
    as_json,
    iso_utc,
)
from .rules import (
    days_of,
    expiry_findings,
    finding_about,
    human_days,
    key_findings,
    strength_findings,
    trust_store_findings,
    worst_severity,
)

__all__ = [
    "Bundle", "CertFacts", "ChainResult", "Finding", "FindingCode", "KeyFacts",
    "LoadedCert", "Policy", "Severity", "as_json", "cert_spki_sha256", "days_of",
    "describe_public_key", "expiry_findings", "facts_from_cert", "finding_about",
    "human_days", "identity_of", "iso_utc", "key_findings", "parse_bundle", "raw_serial",
    "read_bundle", "read_private_key", "spki_sha256", "strength_findings", "tolerant",
    "trust_store_findings", "worst_severity",
]
