"""A broker host's inventory judged: every file each endpoint names, read and checked.

Owns `inspect_broker`: for each listener and bridge of a `BrokerConfig`, the
certificates of its cafile/capath/certfile, its private key and its CRLs (facts and
findings, every finding prefixed with the config FILE:LINE that names the file), and
for a TLS listener the served-versus-on-disk comparison (`served`), for a TLS bridge
its remote's chain judged against the bridge's CAs. Also the report types and
`worst`, the check's exit status.
Must not: parse a broker's configuration (one module per kind does), raise on a
missing, unreadable or malformed file (each is a finding), or read the clock (`now`
is passed in).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from OpenSSL import crypto

from certmon import pki
from certmon.pki.crl import CrlFacts, crl_findings, missing_crl_findings, read_crls

from ..status import BrokerObservation, observe_broker
from .model import BrokerConfig, Endpoint, FileRef
from .served import RemoteChain, ServedCert, probe_bridge, probe_listener, served_findings


@dataclass(frozen=True, slots=True)
class FileReport:
    """One referenced file (or capath directory): what was read from it, and findings."""

    ref: FileRef
    certs: tuple[pki.CertFacts, ...] = ()
    crls: tuple[CrlFacts, ...] = ()
    key: pki.KeyFacts | None = None
    findings: tuple[pki.Finding, ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointReport:
    endpoint: Endpoint
    files: tuple[FileReport, ...]
    served: ServedCert | None
    findings: tuple[pki.Finding, ...]  # the files', the served comparison's, the remote's
    remote: BrokerObservation | None = None  # a bridge's remote, judged with its CAs


@dataclass(frozen=True, slots=True)
class BrokerReport:
    config: BrokerConfig
    now: datetime
    endpoints: tuple[EndpointReport, ...]

    @property
    def findings(self) -> tuple[pki.Finding, ...]:
        return (*self.config.findings, *(f for e in self.endpoints for f in e.findings))


Prober = Callable[[Endpoint], ServedCert | None]
BridgeProber = Callable[[Endpoint], RemoteChain | None]


def inspect_broker(config: BrokerConfig, now: datetime, policy: pki.Policy,
                   prober: Prober | None = probe_listener,
                   bridge_prober: BridgeProber | None = probe_bridge) -> BrokerReport:
    """Read and judge every endpoint's files; `prober=None` skips the listeners'
    handshakes, `bridge_prober=None` the bridges' remotes."""
    return BrokerReport(config, now, tuple(
        inspect_endpoint(e, now, policy, prober, bridge_prober) for e in config.endpoints))


def inspect_endpoint(endpoint: Endpoint, now: datetime, policy: pki.Policy,
                     prober: Prober | None,
                     bridge_prober: BridgeProber | None = None) -> EndpointReport:
    cas: list[pki.LoadedCert] = []
    reports: list[FileReport] = []
    for role in ("cafile", "capath"):
        if ref := endpoint.file(role):
            bundle = _read_capath(ref) if role == "capath" else pki.read_bundle(ref.path)
            cas.extend(bundle.certs)
            reports.append(FileReport(ref, certs=bundle.facts, findings=_at(
                ref, pki.trust_store_findings(bundle, now, policy))))
    leaf: pki.LoadedCert | None = None
    if ref := endpoint.file("certfile"):
        bundle = pki.read_bundle(ref.path)
        leaf = bundle.certs[0] if bundle.certs else None
        reports.append(FileReport(ref, certs=bundle.facts, findings=_at(
            ref, _certfile_findings(bundle, endpoint, now, policy))))
    if ref := endpoint.file("keyfile"):
        key, findings, _ = pki.read_private_key(ref.path)
        if key is not None and leaf is not None:
            findings += pki.key_findings(key, leaf.facts, pki.cert_spki_sha256(leaf.cert))
        elif key is not None:
            findings += pki.key_findings(key, None, None)
        reports.append(FileReport(ref, key=key, findings=_at(ref, findings)))
    if ref := endpoint.file("crlfile"):
        crl_file = read_crls(ref.path, cas)
        findings = list(crl_file.findings)
        for crl in crl_file.crls:
            findings += crl_findings(crl, now, policy)
        if crl_file.crls:  # an unreadable crlfile has its own finding already
            findings += missing_crl_findings([c.facts for c in cas], crl_file.crls, ref.path)
        reports.append(FileReport(ref, crls=crl_file.crls, findings=_at(ref, findings)))
    served = prober(endpoint) if prober is not None else None
    served_list = (served_findings(endpoint, leaf.facts if leaf else None, served, now, policy)
                   if served is not None else [])
    remote = _remote(endpoint, bridge_prober, cas, now, policy) if bridge_prober else None
    findings_all = (*(f for r in reports for f in r.findings), *served_list,
                    *(_at_endpoint(endpoint, remote.findings) if remote else ()))
    return EndpointReport(endpoint, tuple(reports), served, findings_all, remote)


def _remote(endpoint: Endpoint, bridge_prober: BridgeProber, cas: Sequence[pki.LoadedCert],
            now: datetime, policy: pki.Policy) -> BrokerObservation | None:
    """The bridge's remote as the bridge sees it: its chain against bridge_cafile/capath
    (expiry, validity now and at the warning horizon), as a device judges its broker."""
    seen = bridge_prober(endpoint)
    if seen is None:
        return None
    if seen.error is not None:
        return BrokerObservation(seen.host, seen.port, seen.tls_version, (), None, None,
                                 seen.error, now, (pki.Finding(
                                     pki.FindingCode.PROBE_FAILED, pki.Severity.WARNING,
                                     f"no TLS handshake with the remote {seen.host}:"
                                     f"{seen.port}: {seen.error}"),))
    trust = pki.Bundle(f"{endpoint.name} CAs", tuple(cas))
    return observe_broker(seen.host, seen.port, seen.tls_version, seen.presented_der, trust,
                          now, policy)


def _at_endpoint(endpoint: Endpoint,
                 findings: Sequence[pki.Finding]) -> tuple[pki.Finding, ...]:
    return tuple(replace(f, message=f"{endpoint.at}: {endpoint.name}: remote: {f.message}")
                 for f in findings)


def _certfile_findings(bundle: pki.Bundle, endpoint: Endpoint, now: datetime,
                       policy: pki.Policy) -> list[pki.Finding]:
    out = list(bundle.findings)
    role = "broker" if endpoint.kind == "listener" else "client"
    for index, facts in enumerate(bundle.facts):
        out += pki.expiry_findings(facts, now, policy, role if index == 0 else "intermediate")
        out += pki.strength_findings(facts, policy)
    return out


def _read_capath(ref: FileRef) -> pki.Bundle:
    """Every certificate in a capath directory (OpenSSL looks them up by hashed name;
    the c_rehash links and their targets hold the same certificates, read once)."""
    directory = Path(ref.path)
    if not directory.is_dir():
        why = "does not exist" if not directory.exists() else "is not a directory"
        return pki.Bundle(ref.path, findings=(pki.Finding(
            pki.FindingCode.FILE_UNREADABLE, pki.Severity.CRITICAL,
            f"capath {ref.path} {why} (capath takes a directory of CA certificates; a "
            "single file belongs in cafile)", source=ref.path),))
    certs: dict[str, pki.LoadedCert] = {}
    findings: list[pki.Finding] = []
    try:
        members: Sequence[Path] = sorted(p for p in directory.iterdir() if p.is_file())
    except OSError as exc:
        members = []
        findings.append(pki.Finding(pki.FindingCode.FILE_UNREADABLE, pki.Severity.CRITICAL,
                                    f"capath {ref.path}: cannot list: {exc.strerror or exc}",
                                    source=ref.path))
    under: dict[str, set[str]] = {}  # certificate SHA-256 → the file names holding it
    for path in members:
        bundle = pki.read_bundle(path)
        for loaded in bundle.certs:
            certs.setdefault(loaded.facts.sha256, loaded)
            under.setdefault(loaded.facts.sha256, set()).add(path.name)
        # A README or a CRL among the CA files is not a problem for OpenSSL.
        findings += [f for f in bundle.findings if f.code != pki.FindingCode.NO_CERTIFICATE]
    findings += _unhashed(ref.path, certs.values(), under)
    if not certs and not findings:
        findings.append(pki.Finding(pki.FindingCode.NO_CERTIFICATE, pki.Severity.WARNING,
                                    f"capath {ref.path} holds no certificate",
                                    source=ref.path))
    return pki.Bundle(ref.path, tuple(certs.values()), tuple(findings))


def _unhashed(directory: str, certs: Iterable[pki.LoadedCert],
              under: dict[str, set[str]]) -> list[pki.Finding]:
    """A capath CA that no `<subject hash>.N` file holds is invisible to OpenSSL, which
    looks certificates up by that name only: its clients are refused (Mosquitto 2.0.11,
    checked) until `openssl rehash DIR` (c_rehash) links it."""
    out: list[pki.Finding] = []
    for loaded in certs:
        try:
            digest = f"{crypto.X509.from_cryptography(loaded.cert).subject_name_hash():08x}"
        except Exception:  # noqa: BLE001, S112 - a name OpenSSL cannot hash: nothing to say
            continue
        if any(re.fullmatch(rf"{digest}\.\d+", name) for name in under[loaded.facts.sha256]):
            continue
        out.append(pki.Finding(
            pki.FindingCode.BROKER_CONFIG_INVALID, pki.Severity.WARNING,
            f"capath {directory}: CA {loaded.facts.name} is not under its hashed name "
            f"{digest}.0, so OpenSSL never finds it and refuses its clients (run "
            f"`openssl rehash {directory}`)", cert_sha256=loaded.facts.sha256,
            subject=loaded.facts.subject, source=directory, not_after=loaded.facts.not_after))
    return out


def _at(ref: FileRef, findings: Sequence[pki.Finding]) -> tuple[pki.Finding, ...]:
    """Each finding names the config line that references the file, and a DER file
    where Mosquitto reads only PEM is one more."""
    return tuple(replace(f, message=f"{ref.at}: {ref.directive}: {f.message}")
                 for f in (*_der_findings(ref), *findings))


def _der_findings(ref: FileRef) -> list[pki.Finding]:
    # Mosquitto loads cafile, certfile, keyfile and crlfile with OpenSSL's PEM readers:
    # a DER file (which certmon reads fine) stops it at start, e.g. "Unable to load
    # certificate revocation file … PEM routines::no start line" (Mosquitto 2.0.11).
    if ref.role == "capath" or not Path(ref.path).is_file():
        return []  # a FIFO would block the read; the reader's finding says what it is
    try:
        with open(ref.path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return []  # the reader's finding says why
    if head[:1] != b"\x30" or b"-----BEGIN" in head:
        return []
    return [pki.Finding(pki.FindingCode.BROKER_CONFIG_INVALID, pki.Severity.CRITICAL,
                        f"{ref.path} is DER; Mosquitto reads {ref.directive} as PEM only "
                        "and refuses to start with it (convert: openssl x509|crl|pkey "
                        "-inform DER -outform PEM)", source=ref.path)]


def worst(report: BrokerReport) -> pki.Severity:
    return pki.worst_severity(report.findings)
