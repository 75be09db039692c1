"""Trust requirements with their fingerprints resolved: the one resolver.

Owns `RequiredCA` (a `[[trust_requirements]]` entry as fingerprints) and turning the
config's entries into them, once, at start. Both the alert driver (the
TRUST_STORE_MISSING_CA rule) and the web views (CA readiness) take what this returns,
so the two can never disagree on which CAs a requirement names. Must not judge
devices (that is `collector.alerts.rules`) or be called per status.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from certmon import pki
from certmon.errors import ConfigError

from .config import TrustRequirement

__all__ = ["RequiredCA", "resolve_requirements"]


@dataclass(frozen=True, slots=True)
class RequiredCA:
    """One CA a requirement names: its lower-case SHA-256 and the requirement's status."""

    name: str
    sha256: str
    status: str  # "required" | "retiring"


def resolve_requirements(reqs: Iterable[TrustRequirement]) -> tuple[RequiredCA, ...]:
    """Config entries → fingerprints. A `ca_file` names every certificate it holds (a
    bundle of the old and the cross-signed new root is one requirement on both); a
    readable file with no certificate is a config error, not a requirement on nothing."""
    out: list[RequiredCA] = []
    for req in reqs:
        if req.sha256 is not None:
            out.append(RequiredCA(req.name, req.sha256.lower(), req.status))
            continue
        if req.ca_file is None:  # cross_check refuses this; kept total for the type
            continue
        bundle = pki.read_bundle(req.ca_file)
        if not bundle.certs:
            problems = "; ".join(f.message for f in bundle.findings) or "no certificate"
            raise ConfigError(f"trust_requirements {req.name!r}: {req.ca_file}: {problems}")
        out.extend(RequiredCA(req.name, c.facts.sha256.lower(), req.status)
                   for c in bundle.certs)
    return tuple(out)
