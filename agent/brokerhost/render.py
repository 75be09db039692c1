"""`certmon-agent check --broker-config`: the broker-host check's table and JSON.

Owns turning a `BrokerReport` into the human table (one block per listener or
bridge: each file with the config line naming it, then the findings) and the
`--json` document, and `run_check`, the command body (read the configuration, judge
it, print, return the Nagios exit code: the worst finding's severity).
Must not: judge anything or parse configuration.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import TextIO

from certmon import pki
from certmon.cli import write_json

from ..status import BrokerObservation
from . import KINDS
from .inventory import BrokerReport, Prober, inspect_broker, worst
from .served import probe_listener


def run_check(config_path: Path, kind: str, now: datetime, policy: pki.Policy,
              out: TextIO, *, as_json: bool, prober: Prober | None = probe_listener) -> int:
    report = inspect_broker(KINDS[kind](config_path), now, policy, prober)
    if as_json:
        write_json(report_to_json(report), out)
    else:
        render(report, out)
    return int(worst(report))


def report_to_json(report: BrokerReport) -> dict[str, object]:
    config = report.config
    return {
        "status": worst(report).name,
        "now": pki.as_json(report.now),
        "broker": {"kind": config.kind, "config": config.path,
                   "files_read": list(config.files_read),
                   "per_listener_settings": config.per_listener_settings},
        "endpoints": [{
            "kind": e.endpoint.kind, "name": e.endpoint.name, "at": e.endpoint.at,
            "host": e.endpoint.host, "port": e.endpoint.port,
            "require_certificate": e.endpoint.require_certificate,
            "files": [{"role": f.ref.role, "directive": f.ref.directive, "path": f.ref.path,
                       "at": f.ref.at, "certs": pki.as_json(f.certs),
                       "crls": [_crl_json(c) for c in f.crls], "key": pki.as_json(f.key),
                       "findings": pki.as_json(f.findings)} for f in e.files],
            "served": pki.as_json(e.served),
            "remote": _remote_json(e.remote),
        } for e in report.endpoints],
        "findings": pki.as_json(report.findings),
    }


def _remote_json(remote: BrokerObservation | None) -> object:
    if remote is None:
        return None
    data = pki.as_json(dataclasses.replace(remote, uses_cas=frozenset()))
    assert isinstance(data, dict)
    data["uses_cas"] = sorted(remote.uses_cas)  # a frozenset: not JSON
    return data


def _crl_json(crl: object) -> object:
    data = pki.as_json(crl)
    assert isinstance(data, dict)
    # The serials themselves can be thousands; the count says what a reader needs.
    data.pop("revoked_serials", None)
    return data


def render(report: BrokerReport, out: TextIO) -> None:
    now = report.now
    out.write(f"{report.config.kind} {report.config.path}"
              f"  (per_listener_settings {str(report.config.per_listener_settings).lower()})\n")
    for e in report.endpoints:
        tls = "TLS" if e.endpoint.is_tls else "plain"
        extra = ", require_certificate" if e.endpoint.require_certificate else ""
        out.write(f"\n{e.endpoint.name}  ({tls}{extra}; {e.endpoint.at})\n")
        for file in e.files:
            out.write(f"  {file.ref.directive:16} {file.ref.path}  ({file.ref.at})\n")
            for cert in file.certs:
                out.write(f"    cert  {pki.iso_utc(cert.not_after)}  {cert.days_left(now):8.1f} d"
                          f"  {cert.name}  sha256 {cert.sha256[:16]}…\n")
            for crl in file.crls:
                nxt = pki.iso_utc(crl.next_update) if crl.next_update else "never"
                out.write(f"    crl   nextUpdate {nxt}  #{crl.crl_number}  "
                          f"{crl.revoked_count} revoked  {crl.issuer}  "
                          f"signed by {crl.signed_by or 'no known CA'}\n")
        if e.served is not None:
            leaf = e.served.leaf
            seen = (f"{leaf.name} notAfter {pki.iso_utc(leaf.not_after)} sha256 "
                    f"{leaf.sha256[:16]}…" if leaf else f"nothing ({e.served.error})")
            out.write(f"  served on {e.served.target}: {seen}\n")
        if e.remote is not None:
            verdict = ("chain valid" if e.remote.valid_now else
                       f"chain INVALID: {e.remote.error}" if e.remote.chain else
                       f"nothing ({e.remote.error})")
            out.write(f"  remote {e.remote.host}:{e.remote.port}: {verdict}\n")
    findings = sorted(report.findings, key=lambda f: -f.severity)
    counted = [f for f in findings if f.severity != pki.Severity.OK]
    out.write(f"\n{worst(report).name}: {len(counted)} finding(s)\n")
    for f in findings:
        label = "INFO" if f.severity == pki.Severity.OK else f.severity.name
        out.write(f"  {label:8} {f.code.value:32} {f.message}\n")
