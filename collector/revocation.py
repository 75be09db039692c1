"""The fleet's CRLs as the collector holds them (`tls.fleet_crl`).

Owns reading the configured CRL files, checked against the fleet CAs, afresh at
every fleet sweep (a CA reissues its CRL every few days; the collector must not need
a restart to believe the new one), and logging each file's problems once per change.
Which device certificates they revoke is `certmon.pki.crl.revoked_by`'s; the alert
is `collector.alerts.rules.revoked_cert_alerts`'s.
Must not: fetch anything over the network or judge devices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from certmon import pki
from certmon.pki.crl import CrlFacts, read_crls

log = logging.getLogger("certmon.collector")


class FleetCrls:
    """`current()` → every CRL the configured files hold now."""

    def __init__(self, paths: Sequence[Path], fleet_cas: Sequence[pki.LoadedCert]) -> None:
        self.paths = tuple(paths)
        self.fleet_cas = tuple(fleet_cas)
        self._logged: dict[str, tuple[str, ...]] = {}

    def current(self) -> tuple[CrlFacts, ...]:
        crls: list[CrlFacts] = []
        for path in self.paths:
            read = read_crls(path, self.fleet_cas)
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
