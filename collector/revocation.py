"""The fleet's CRLs as the collector holds them (`tls.fleet_crl`, `tls.fleet_crl_urls`).

Owns reading the configured CRL files and the bodies `collector.crlfetch` fetched
from the configured URLs, checked against the fleet CAs, afresh at every fleet sweep
(a CA reissues its CRL every few days; the collector must not need
a restart to believe the new one), and logging each file's problems once per change.
Which device certificates they revoke is `certmon.pki.crl.revoked_by`'s; the alert
is `collector.alerts.rules.revoked_cert_alerts`'s.
Must not: fetch anything over the network itself (`crlfetch` does) or judge devices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from certmon import pki
from certmon.pki.crl import CrlFacts, CrlFile, parse_crls, read_crls

from .crlfetch import CrlSource

log = logging.getLogger("certmon.collector")


class FleetCrls:
    """`current()` → every CRL the configured files hold now."""

    def __init__(self, paths: Sequence[Path], fleet_cas: Sequence[pki.LoadedCert],
                 urls: CrlSource | None = None) -> None:
        self.paths = tuple(paths)
        self.fleet_cas = tuple(fleet_cas)
        self.urls = urls
        self._logged: dict[str, tuple[str, ...]] = {}

    def current(self) -> tuple[CrlFacts, ...]:
        crls: list[CrlFacts] = []
        reads: list[tuple[str, CrlFile]] = [(str(path), read_crls(path, self.fleet_cas))
                                            for path in self.paths]
        if self.urls is not None:
            reads += [(url, parse_crls(body, url, self.fleet_cas))
                      for url, body in self.urls.bodies()]
        for path, read in reads:
            problems = tuple(f.message for f in read.findings)
            problems += tuple(f"{path}: CRL of {c.issuer} does not verify under a fleet CA; "
                              "its entries are not believed" for c in read.crls
                              if c.has_known_issuer and c.signed_by_sha256 is None)
            if problems and self._logged.get(str(path)) != problems:
                for message in problems:
                    log.warning("tls.fleet_crl: %s", message)
            self._logged[str(path)] = problems
            crls.extend(read.crls)
        return tuple(crls)
