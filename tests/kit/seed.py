"""A deterministic synthetic fleet, written through the real `Store` API.

Owns: `seed_fleet` — realistic verified statuses built from `certmon.wire`
dataclasses (the same JSON the ingest path stores), inventories, broker chains as
devices saw them, scans of the broker endpoints, alerts and online/offline changes —
and which device ids ended up in which state, so tests can assert on them. Used by
the web tests, the browser test, the API bench and the demo's figures.

Must not: issue certificates (no cryptography is involved: fingerprints are SHA-256
of a name, which is all a store or a dashboard can tell apart; kit.pki issues real
ones, kit.fleet signs real statuses), read the wall clock (everything derives from
(seed, now)), or bypass the `Store` protocol.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from certmon import wire as p
from certmon.pki import Severity
from collector import aggregate
from collector import store as st

STATES = ("ok", "warning", "critical", "offline", "clock")
# Shares of each state; every state gets at least one device even in a tiny fleet.
_SHARES = {"warning": 0.12, "critical": 0.10, "offline": 0.08, "clock": 0.08}
BROKER_HOST = "broker.fleet.example"
BROKER_PORT = 8883
BROKER_TARGET = f"{BROKER_HOST}:{BROKER_PORT}"
CLOUD_TARGET = "iot.cloud.example:443"


def fingerprint(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _cert(name: str, subject: str, not_before: datetime, not_after: datetime, *,
          is_ca: bool, issuer: str | None = None) -> st.CertRow:
    return st.CertRow(sha256=fingerprint(name), subject=subject, not_before=not_before,
                   not_after=not_after, issuer=issuer or subject,
                   serial_hex=fingerprint("serial" + name)[:16],
                   key_type="EC", key_bits=256, signature_algorithm="ecdsa-with-SHA256",
                   is_ca=is_ca, is_self_issued=issuer is None)


@dataclass(frozen=True, slots=True)
class Pki:
    """The fleet's shared certificates (CAs, broker chains), fixed per (seed, now)."""

    root: st.CertRow  # fleet root, long-lived, required everywhere
    intermediate: st.CertRow  # issues device certs; expires in ~200 days
    old_root: st.CertRow  # retiring: expires in 20 days, still in most trust stores
    new_root: st.CertRow  # required successor, rolled out to part of the fleet
    broker_leaf: st.CertRow  # what the broker presents now
    stale_leaf: st.CertRow  # an old broker node's leaf, still seen by a few devices
    broker_ca: st.CertRow

    @classmethod
    def build(cls, now: datetime, seed: int) -> Pki:
        d = timedelta(days=1)
        root = _cert(f"{seed}:root", "CN=Fleet Root CA,O=Example", now - 900 * d, now + 2700 * d,
                     is_ca=True)
        inter = _cert(f"{seed}:inter", "CN=Fleet Devices CA 1,O=Example", now - 500 * d,
                      now + 200 * d, is_ca=True, issuer=root.subject)
        old = _cert(f"{seed}:oldroot", "CN=Legacy Root CA,O=Example", now - 3600 * d,
                    now + 20 * d, is_ca=True)
        new = _cert(f"{seed}:newroot", "CN=Fleet Root CA 2,O=Example", now - 30 * d,
                    now + 3600 * d, is_ca=True)
        bca = _cert(f"{seed}:brokerca", "CN=Broker CA,O=Example", now - 400 * d, now + 330 * d,
                    is_ca=True, issuer=root.subject)
        leaf = _cert(f"{seed}:brokerleaf", f"CN={BROKER_HOST}", now - 40 * d, now + 45 * d,
                     is_ca=False, issuer=bca.subject)
        stale = _cert(f"{seed}:staleleaf", f"CN={BROKER_HOST}", now - 380 * d, now + 5 * d,
                      is_ca=False, issuer=bca.subject)
        return cls(root, inter, old, new, leaf, stale, bca)


def device_ids(n: int, seed: int = 1) -> list[str]:
    return [f"gw-{seed:02d}-{i:06d}" for i in range(n)]


def assign_states(n: int, seed: int) -> list[str]:
    counts = {s: max(1, round(n * share)) for s, share in _SHARES.items()} if n >= 5 else {}
    plan = [s for s, k in counts.items() for _ in range(k)]
    plan += ["ok"] * (n - len(plan))
    random.Random(seed).shuffle(plan)
    return plan[:n]


def _brief(c: st.CertRow) -> p.CertBrief:
    return p.CertBrief(ref=p.cert_ref(c.sha256), subject=c.subject, not_after=c.not_after)


def _finding(code: str, sev: Severity, msg: str, cert: st.CertRow | None) -> p.FindingWire:
    return p.FindingWire(code=code, severity=sev, cert=None if cert is None else
                         p.cert_ref(cert.sha256), msg=msg,
                         not_after=None if cert is None else cert.not_after)


def _status_records(dev: str, state: str, i: int, now: datetime, pki: Pki, rnd: random.Random,
                    seed: int) -> Iterator[tuple[st.StatusRecord, tuple[st.CertRow, ...]]]:
    """One or two statuses (critical devices first report healthy, for history), each
    with the device's trust store as it stands."""
    d = timedelta(days=1)
    days = {"ok": rnd.uniform(60, 400), "warning": rnd.uniform(8, 29),
            "critical": rnd.uniform(-6, 6), "offline": rnd.uniform(5, 300),
            "clock": rnd.uniform(60, 400)}[state]
    client = _cert(f"{seed}:client:{dev}", f"CN={dev},O=Example Devices",
                   now + days * d - 365 * d, now + days * d, is_ca=False,
                   issuer=pki.intermediate.subject)
    trust = [pki.root] + ([pki.old_root] if i % 5 != 0 else []) + (
        [pki.new_root] if i % 3 != 0 else [])
    broker_leaf = pki.stale_leaf if i % 17 == 3 else pki.broker_leaf
    findings: list[p.FindingWire] = []
    offset_s = rnd.gauss(0, 0.4)
    synced: bool | None = True
    if state == "warning":
        findings.append(_finding("CERT_EXPIRING", Severity.WARNING,
                                 f"client certificate expires in {days:.0f} days", client))
    elif state == "critical":
        code = "CERT_EXPIRED" if days < 0 else "CERT_EXPIRING"
        findings.append(_finding(code, Severity.CRITICAL,
                                 f"client certificate {'expired' if days < 0 else 'expires'} "
                                 f"{abs(days):.1f} days {'ago' if days < 0 else 'from now'}",
                                 client))
    elif state == "clock":
        offset_s = rnd.choice((-2 * 86400.0, -3600.0 * 7, 420.0, 95000.0))
        synced = False
        findings.append(_finding("CLOCK_UNSYNCED", Severity.WARNING,
                                 "kernel clock is not synchronised (maxerror 16 s)", None))
        if abs(offset_s) > 3600:
            findings.append(_finding("CLOCK_IMPLAUSIBLE", Severity.CRITICAL,
                                     f"device clock is off by {offset_s / 3600:.1f} h", None))
    if pki.old_root in trust:
        findings.append(_finding("CA_EXPIRING", Severity.OK,
                                 "Legacy Root CA in the trust store expires in 20 days",
                                 pki.old_root))
    severity, worst = aggregate.headline(findings)
    interval_s = 300
    first_at = now - (timedelta(hours=2) if state == "offline" else timedelta(seconds=rnd.uniform(5, 200)))
    statuses = [(first_at, findings, severity, worst)]
    if state == "critical":
        statuses.insert(0, (first_at - d, [], Severity.OK, None))
    digest = p.trust_store_digest(c.sha256 for c in trust)
    for seq, (at, fnd, sev, code) in enumerate(statuses, 1):
        ts = at + timedelta(seconds=offset_s)
        status = p.Status(
            device_id=dev, boot_id=f"boot{i:x}", seq=seq, ts=ts, mono_s=1000.0 + seq * 300,
            interval_s=interval_s,
            client=p.CertSummary(sha256=client.sha256, not_after=client.not_after,
                                 key_matches=True, key_mode="0600"),
            client_chain=p.ChainSummary(
                valid_now=days > 0, valid_at_warn=days > 30, method="cryptography", error=None,
                path=(p.cert_ref(client.sha256), p.cert_ref(pki.intermediate.sha256),
                      p.cert_ref(pki.root.sha256)),
                earliest_not_after=min(client.not_after, pki.intermediate.not_after),
                earliest_ref=p.cert_ref(client.sha256 if client.not_after <
                                        pki.intermediate.not_after else pki.intermediate.sha256)),
            trust_store=p.TrustStoreSummary(
                count=len(trust), digest=digest,
                expiring=tuple(_brief(c) for c in trust if c.not_after < now + 90 * d)),
            broker=p.BrokerSeen(host=BROKER_HOST, port=BROKER_PORT, tls_version="TLSv1.3",
                                chain=(_brief(broker_leaf), _brief(pki.broker_ca)),
                                valid_now=True, valid_at_warn=broker_leaf is pki.broker_leaf,
                                error=None, seen_at=ts),
            clock=p.ClockSummary(synced=synced, source="chrony" if synced else None,
                                 offset_s=None if not synced else round(offset_s, 3),
                                 maxerror_s=0.05 if synced else 16.0, plausible=synced is True,
                                 beacon=p.BeaconEcho(beacon_ts=at - timedelta(seconds=30),
                                                     received_mono_s=1000.0 + seq * 300 - 31)),
            findings=tuple(fnd),
            agent=p.AgentSelf(version="0.1.0", uptime_s=86400.0 * 3, rss_bytes=24_000_000,
                              last_publish_ok_at=ts - timedelta(seconds=interval_s),
                              spool_depth=0, spool_dropped=0),
        )
        yield st.StatusRecord(
            device_id=dev, boot_id=status.boot_id, seq=seq, device_ts=ts, received_at=at,
            interval_s=interval_s,
            status_json=json.dumps(status.to_json(), sort_keys=True, separators=(",", ":")),
            severity=int(sev), worst_code=code,
            findings=tuple(st.FindingRecord(f.code, int(f.severity), f.cert, f.msg) for f in fnd),
            client_sha256=client.sha256, trust_digest=digest,
            certs=(st.CertLink(client, st.CertRole.CLIENT),
                   st.CertLink(pki.intermediate, st.CertRole.CHAIN),
                   st.CertLink(broker_leaf, st.CertRole.BROKER),
                   st.CertLink(pki.broker_ca, st.CertRole.BROKER)),
            replace_roles=frozenset({st.CertRole.CLIENT, st.CertRole.CHAIN, st.CertRole.BROKER}),
            clock_offset_lo_s=offset_s - 0.2, clock_offset_hi_s=offset_s + 0.3,
        ), tuple(trust)


def _inventory(dev: str, trust: Sequence[st.CertRow], at: datetime) -> st.InventoryRecord:
    entries = [p.CaEntry(sha256=c.sha256, subject=c.subject, not_before=c.not_before,
                         not_after=c.not_after) for c in trust]
    return st.InventoryRecord(dev, p.trust_store_digest(c.sha256 for c in trust),
                           json.dumps([e.to_json() for e in entries], separators=(",", ":")),
                           at, tuple(trust))


def scan_result(target: str, now: datetime, chain: Sequence[st.CertRow], *,
                error: str | None = None) -> str:
    """A scan in the shape of `certmon-scan --json` targets[i] (pki.as_json(ScanReport))."""
    presented = [{"index": i, "sha256": c.sha256, "subject": c.subject, "issuer": c.issuer,
                  "not_before": p.format_instant(c.not_before),
                  "not_after": p.format_instant(c.not_after)} for i, c in enumerate(chain)]
    earliest = min(presented, key=lambda c: c["not_after"]) if presented else None
    return json.dumps({"name": target, "checked_at": p.format_instant(now),
                       "severity": "UNKNOWN" if error else "OK", "presented": presented,
                       "path": presented, "chain_valid": None if error else True,
                       "earliest_expiry": earliest, "error": error,
                       "error_kind": "timeout" if error else None, "findings": []})


def seed_fleet(store: st.Store, now: datetime, n: int = 50, seed: int = 1, *,
               batch: int = 500, inventories: bool = True, alerts: bool = True) -> dict[str, list[str]]:
    """Write a synthetic fleet of `n` devices; returns {state: [device ids]} plus
    "stale_broker" (devices that saw the old broker leaf) and "missing_new_root"."""
    store.migrate()
    pki = Pki.build(now, seed)
    rnd = random.Random(seed)
    states = assign_states(n, seed)
    out: dict[str, list[str]] = {s: [] for s in STATES}
    out["stale_broker"], out["missing_new_root"] = [], []
    pending: list[st.StatusRecord] = []
    for i, (dev, state) in enumerate(zip(device_ids(n, seed), states, strict=True)):
        out[state].append(dev)
        if i % 17 == 3:
            out["stale_broker"].append(dev)
        if i % 3 == 0:
            out["missing_new_root"].append(dev)
        records = list(_status_records(dev, state, i, now, pki, rnd, seed))
        pending.extend(record for record, _ in records)
        trust = records[-1][1]  # the trust store as the newest status describes it
        if len(pending) >= batch:
            store.record_statuses(pending)
            pending = []
        if inventories:
            # Writes one transaction per device; the bench turns it off and relies on
            # the status's trust digest plus CertRole.TRUST links written in bulk.
            store.put_inventory(_inventory(dev, trust, now - timedelta(minutes=1)))
    if pending:
        store.record_statuses(pending)
    for dev in out["offline"]:
        store.set_online(dev, False, now - timedelta(minutes=30))
    if alerts:
        _alerts(store, now, out)
    store.put_scan(st.ScanRecord(BROKER_TARGET, now - timedelta(minutes=10), 0,
                              scan_result(BROKER_TARGET, now, [pki.broker_leaf, pki.broker_ca])))
    store.put_scan(st.ScanRecord(CLOUD_TARGET, now - timedelta(minutes=10), 3,
                              scan_result(CLOUD_TARGET, now, [], error="timed out after 10 s")))
    return out


def _alerts(store: st.Store, now: datetime, out: dict[str, list[str]]) -> None:
    for dev in out["critical"]:
        store.alert_fire(f"cert_expiry|{dev}", rule="cert_expiry", device_id=dev,
                         cert_sha256=None, severity=int(Severity.CRITICAL),
                         summary=f"{dev}: client certificate expires within 7 days or expired",
                         labels={"device": dev, "category": "certificate"},
                         now=now - timedelta(hours=1), renotify_interval_s=14400)
    for dev in out["clock"]:
        store.alert_fire(f"clock|{dev}", rule="clock", device_id=dev, cert_sha256=None,
                         severity=int(Severity.WARNING), summary=f"{dev}: clock not synchronised",
                         labels={"device": dev, "category": "clock"},
                         now=now - timedelta(minutes=20), renotify_interval_s=14400)
    for dev in out["offline"]:
        store.alert_fire(f"offline|{dev}", rule="device_offline", device_id=dev,
                         cert_sha256=None, severity=int(Severity.WARNING),
                         summary=f"{dev}: offline for 30 minutes",
                         labels={"device": dev}, now=now - timedelta(minutes=5),
                         renotify_interval_s=14400)
    # A resolved alert, so histories are not empty on a healthy device.
    for dev in out["ok"][:3]:
        key = f"cert_expiry|{dev}"
        store.alert_fire(key, rule="cert_expiry", device_id=dev, cert_sha256=None,
                         severity=int(Severity.WARNING), summary=f"{dev}: certificate renewed late",
                         labels={"device": dev}, now=now - timedelta(days=3),
                         renotify_interval_s=None)
        store.alert_resolve(key, now - timedelta(days=2))
