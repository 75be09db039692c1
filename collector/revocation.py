"""The fleet's CRLs as the collector holds them (`tls.fleet_crl`, `tls.fleet_crl_urls`).

Owns which CRLs the collector believes: each configured file and each body
`collector.crlfetch` fetched is read afresh at every fleet sweep (a CA reissues its
CRL every few days; the collector must not need a restart to believe the new one),
checked against the known CAs (the fleet CAs, plus every intermediate of a device
chain the collector holds whose signature chains to one of them), and believed only
if its signature verifies. Per source and issuer the last believed CRL is kept: a
newer read replaces it only when it verifies and its CRL number (else its
thisUpdate) is at least as new, so a missing file, a garbage body, a forgery or a
replayed older CRL changes nothing, and no CERT_REVOKED alert resolves because a
source became unreadable. Each refusal is counted by reason (`refused`) and logged
once per change.
Which device certificates they revoke is `certmon.pki.crl.revoked_by`'s; the alert
is `collector.alerts.rules.revoked_cert_alerts`'s.
Must not: fetch anything over the network itself (`crlfetch` does) or judge devices.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from cryptography import x509

from certmon import pki
from certmon.pki.crl import CrlFacts, CrlFile, parse_crls, read_crls

from .crlfetch import FETCH_REASONS, CrlSource, url_label

log = logging.getLogger("certmon.collector")
# Why a CRL read was not believed (the label of certmon_crl_refused_total).
REFUSAL_REASONS = ("unreadable", "unverified", "older")

ChainCerts = Callable[[], Iterable[x509.Certificate]]


class FleetCrls:
    """`current()` → the believed CRL of each (source, issuer), and the CRLs of the
    latest reads that are not believed (for their CRL_SIGNATURE_INVALID /
    CRL_ISSUER_UNKNOWN findings; `revoked_by` ignores them)."""

    def __init__(self, paths: Sequence[Path], fleet_cas: Sequence[pki.LoadedCert],
                 urls: CrlSource | None = None, *,
                 chain_certs: ChainCerts | None = None) -> None:
        self.paths = tuple(paths)
        self.fleet_cas = tuple(fleet_cas)
        self.urls = urls
        self.chain_certs = chain_certs
        self.refused: Counter[str] = Counter()  # one of REFUSAL_REASONS
        self._good: dict[tuple[str, str], CrlFacts] = {}  # (source, issuer) → believed
        self._logged: dict[str, tuple[tuple[str, str], ...]] = {}

    def current(self) -> tuple[CrlFacts, ...]:
        cas = self.known_cas()
        reads: list[CrlFile] = [read_crls(path, cas) for path in self.paths]
        if self.urls is not None:
            reads += [parse_crls(body, url_label(url), cas) for url, body in self.urls.bodies()]
        unverified: list[CrlFacts] = []
        for read in reads:
            problems = tuple(self._take(read))
            unverified.extend(c for c in read.crls if not c.is_verified)
            if problems and self._logged.get(read.source) != problems:
                for reason, message in problems:
                    self.refused[reason] += 1
                    log.warning("tls.fleet_crl: %s", message)
            self._logged[read.source] = problems
        return (*self._good.values(), *unverified)

    def counts(self) -> dict[str, dict[str, int]]:
        """For /metrics: CRLs refused by reason, and failed fetches by reason — every
        reason from 0, so the first refusal is a rise `increase()` can see."""
        refused = {reason: 0 for reason in REFUSAL_REASONS} | dict(self.refused)
        fetch = ({reason: 0 for reason in FETCH_REASONS} | dict(self.urls.failures)
                 if self.urls is not None else {})
        return {"refused": refused, "fetch_failed": fetch}

    def known_cas(self) -> tuple[pki.LoadedCert, ...]:
        """The fleet CAs, then each CA certificate of a held device chain that one of
        them (or an intermediate already admitted) signed: a CRL issued by the
        devices' intermediate is checked under the intermediate's key even when only
        the root is configured. A certificate a device merely put in its chain is
        admitted by its signature, never by its name."""
        known = list(self.fleet_cas)
        seen = {ca.facts.sha256 for ca in known}
        pending = [c for c in (self.chain_certs() if self.chain_certs else ()) if _is_ca(c)]
        grew = True
        while pending and grew:  # intermediates under intermediates: to a fixpoint
            grew = False
            for cert in list(pending):
                if any(_issued_by(cert, ca.cert) for ca in known):
                    pending.remove(cert)
                    facts = pki.facts_from_cert(cert)
                    if facts.sha256 not in seen:
                        seen.add(facts.sha256)
                        known.append(pki.LoadedCert(cert, facts))
                    grew = True
        return tuple(known)

    def _take(self, read: CrlFile) -> list[tuple[str, str]]:
        """Believe what `read` holds that verifies and is not older; return why the rest
        was refused ((reason, message), logged and counted by the caller)."""
        source = read.source
        kept = any(key[0] == source for key in self._good)
        keeping = "; keeping the last good CRL" if kept else "; no CRL of it believed yet"
        problems = [("unreadable", f"{f.message}{keeping}") for f in read.findings]
        for crl in read.crls:
            if not crl.is_verified:
                problems.append(("unverified", f"{source}: CRL of {crl.issuer} does not "
                                 "verify under a fleet CA or a device chain's intermediate; "
                                 f"its entries are not believed{keeping}"))
                continue
            key = (source, crl.issuer)
            last = self._good.get(key)
            if last is not None and _is_older(crl, last):
                problems.append(("older", f"{source}: CRL of {crl.issuer} "
                                 f"(number {crl.crl_number}) is older than the one believed "
                                 f"(number {last.crl_number}); keeping that one"))
                continue
            self._good[key] = crl
        return problems


def _is_older(crl: CrlFacts, last: CrlFacts) -> bool:
    # RFC 5280 §5.2.3: the CRL number increases with each CRL of an issuer; without
    # one on both sides, thisUpdate says which is newer.
    if crl.crl_number is not None and last.crl_number is not None:
        return crl.crl_number < last.crl_number
    return crl.this_update < last.this_update


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except Exception:  # noqa: BLE001 - absent or malformed: not a CA
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # noqa: BLE001 - wrong name, wrong key, unsupported algorithm
        return False
    return True
