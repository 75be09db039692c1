"""Simulated devices and what they publish: real keys, real certificates, real signatures.

Owns: the simulated fleet's CAs and devices (`make_ca`, `make_device(s)`, issued
through `kit.pki.PKIFactory`), a healthy device's status as a template (`status`),
its signed form (`signed_status`), its retained cert message (`cert_message`) and the
findings the simulator injects (`expiring_finding`, `clock_behind_finding`).

Must not: run the agent's checks (a status is built from a template, so ten thousand
devices cost seconds, not minutes; what the collector does with them — verify,
store, evaluate — is the real work), talk MQTT (bench/fleetsim.py and the tests
publish), or write a store (kit.seed does, without cryptography).

Every certificate is valid from a day before `now`: a status stamped a little in the
past still falls inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from certmon import wire as p
from certmon.pki import Severity
from kit.pki import Issued, PKIFactory, PrivateKey

__all__ = [
    "SimCA",
    "SimDevice",
    "cert_message",
    "clock_behind_finding",
    "expiring_finding",
    "make_ca",
    "make_device",
    "make_devices",
    "signed_status",
    "status",
]

_BACKDATE = timedelta(days=1)


@dataclass(frozen=True)
class SimCA:
    """A CA that issues simulated devices: its certificate and key (any kit.pki CA's
    `cert` and `key` make one)."""

    cert: x509.Certificate
    key: PrivateKey

    def issuer(self) -> Issued:
        """As a kit.pki issuer (its own chain is not needed to sign)."""
        return Issued(name="sim-ca", cert=self.cert, key=self.key, issuer=None)


@dataclass(frozen=True)
class SimDevice:
    device_id: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # intermediates the device ships


def make_ca(cn: str, now: datetime, issuer: SimCA | None = None, days: int = 3650) -> SimCA:
    """A fresh-keyed P-256 CA: a root, or an intermediate under `issuer`."""
    factory = PKIFactory(now)  # a new factory: a new key
    start, end = now - _BACKDATE, now + timedelta(days=days)
    ca = (factory.root(cn, not_before=start, not_after=end) if issuer is None else
          factory.intermediate(issuer.issuer(), cn, path_length=None, not_before=start,
                               not_after=end))
    return SimCA(ca.cert, ca.key)


def make_device(ca: SimCA, device_id: str, now: datetime, *, days: float = 365,
                factory: PKIFactory | None = None) -> SimDevice:
    """One device whose certificate (CN = `device_id`, any unicode) `ca` issues."""
    factory = factory or PKIFactory(now)
    leaf = factory.leaf(ca.issuer(), device_id, name=device_id, not_before=now - _BACKDATE,
                        not_after=now + timedelta(days=days))
    assert isinstance(leaf.key, ec.EllipticCurvePrivateKey)  # p256: what devices sign with
    return SimDevice(device_id, leaf.key, leaf.cert, (ca.cert,))


def make_devices(ca: SimCA, n: int, now: datetime, *, prefix: str = "sim",
                 days: float = 365) -> list[SimDevice]:
    """`n` devices `<prefix>-00000`…, each with its own fresh key."""
    factory = PKIFactory(now)  # one per call: keys are cached per factory, by name
    return [make_device(ca, f"{prefix}-{i:05d}", now, days=days, factory=factory)
            for i in range(n)]


def cert_message(dev: SimDevice) -> bytes:
    """The retained cert-topic message: the device certificate and what it ships."""
    return p.encode_message(p.cert_message(dev.device_id, (dev.cert, *dev.chain)))


def status(dev: SimDevice, seq: int, now: datetime, *, boot_id: str = "sim-boot",
           interval_s: int = 60, findings: Sequence[p.FindingWire] = ()) -> p.Status:
    """A healthy device's status v1, with `findings` added."""
    sha = dev.cert.fingerprint(hashes.SHA256()).hex()
    ca_sha = dev.chain[0].fingerprint(hashes.SHA256()).hex() if dev.chain else sha
    return p.Status(
        device_id=dev.device_id, boot_id=boot_id, seq=seq, ts=now, mono_s=1000.0 + seq,
        interval_s=interval_s,
        client=p.CertSummary(sha256=sha, not_after=dev.cert.not_valid_after_utc,
                             key_matches=True, key_mode="0600"),
        client_chain=p.ChainSummary(valid_now=True, valid_at_warn=True, method="cryptography",
                                    error=None, path=(p.cert_ref(sha), p.cert_ref(ca_sha)),
                                    earliest_not_after=dev.cert.not_valid_after_utc,
                                    earliest_ref=p.cert_ref(sha)),
        trust_store=p.TrustStoreSummary(count=2, digest=p.trust_store_digest([ca_sha]),
                                        expiring=()),
        broker=None,
        clock=p.ClockSummary(synced=True, source="chrony", offset_s=0.01, maxerror_s=0.05,
                             plausible=True, beacon=None),
        findings=tuple(findings),
        agent=p.AgentSelf(version="sim", uptime_s=float(seq * interval_s), rss_bytes=30_000_000,
                          last_publish_ok_at=None, spool_depth=0, spool_dropped=0),
    )


def signed_status(dev: SimDevice, seq: int, now: datetime, *, boot_id: str = "sim-boot",
                  interval_s: int = 60, findings: Sequence[p.FindingWire] = ()) -> bytes:
    """`status(...)` as the JWS the device publishes."""
    body = p.encode_status(status(dev, seq, now, boot_id=boot_id, interval_s=interval_s,
                                  findings=findings))
    return p.sign_jws(body, dev.key, dev.cert)


def expiring_finding(days_left: float, now: datetime) -> p.FindingWire:
    severity = Severity.CRITICAL if days_left <= 7 else Severity.WARNING
    return p.FindingWire(code="CERT_EXPIRING", severity=severity, cert=None,
                         msg=f"client certificate expires in {days_left:.1f} days",
                         not_after=now + timedelta(days=days_left))


def clock_behind_finding() -> p.FindingWire:
    return p.FindingWire(code="CLOCK_BEHIND", severity=Severity.CRITICAL, cert=None,
                         msg="device clock is 172800.000 s behind (2.00 days) per chrony")
