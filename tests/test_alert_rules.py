"""Alert rules (pure) and the engine's lifecycle against a small in-memory store."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certmon.pki import Policy, Severity
from certmon.wire import FindingWire
from collector import aggregate
from collector.alerts import Notification
from collector.alerts.engine import DEVICE_ROWS_MAX, AlertEngine
from collector.alerts.rules import (
    DEVICE_OFFLINE,
    OFFLINE_CERT_EXPIRING,
    SHARED_CLIENT_CERT,
    TRUST_STORE_MISSING_CA,
    AlertCandidate,
    CertName,
    RequiredCA,
    RulesConfig,
    Scope,
    device_alerts,
    humanize,
    offline_alerts,
    shared_client_cert_alerts,
    trust_requirement_alerts,
)
from collector.store import AlertRow, open_store

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64
REF = "0123456789abcdef"


def finding(code: str, severity: Severity = Severity.WARNING, cert: str | None = REF,
            msg: str = "", not_after: datetime | None = None) -> FindingWire:
    return FindingWire(code=code, severity=severity, cert=cert, msg=msg, not_after=not_after)


# --------------------------------------------------------------------------- device rules


def test_warning_and_worse_findings_become_alerts_ok_does_not() -> None:
    out = device_alerts("gw-1", [finding("CERT_EXPIRING", Severity.WARNING),
                                 finding("WEAK_KEY", Severity.OK),
                                 finding("CERT_EXPIRED", Severity.CRITICAL, cert="f" * 16)],
                        online=True, now=NOW)
    assert [(c.rule, c.severity) for c in out] == [("CERT_EXPIRED", Severity.CRITICAL),
                                                   ("CERT_EXPIRING", Severity.WARNING)]
    assert all(c.scope is Scope.FINDINGS for c in out)


def test_key_is_rule_device_certificate() -> None:
    [c] = device_alerts("gw-1", [finding("CERT_EXPIRING")], online=True, now=NOW)
    assert c.key == f"CERT_EXPIRING|gw-1|{REF}"
    [c] = device_alerts("gw-1", [finding("CLOCK_UNSYNCED", cert=None)], online=True, now=NOW)
    assert c.key == "CLOCK_UNSYNCED|gw-1|-"


def test_duplicate_findings_dedup_to_one_alert_with_the_worst_severity() -> None:
    out = device_alerts("gw-1", [finding("CA_EXPIRING", Severity.WARNING),
                                 finding("CA_EXPIRING", Severity.CRITICAL)], online=True, now=NOW)
    assert [(c.key, c.severity) for c in out] == [(f"CA_EXPIRING|gw-1|{REF}", Severity.CRITICAL)]


def test_same_rule_for_two_certificates_is_two_alerts_with_distinct_labels() -> None:
    out = device_alerts("gw-1", [finding("CA_EXPIRING", cert="1" * 16),
                                 finding("CA_EXPIRING", cert="2" * 16)], online=True, now=NOW)
    assert len({c.key for c in out}) == 2
    # Alertmanager identifies alerts by labels: they must differ too.
    assert {c.labels["cert"] for c in out} == {"1" * 16, "2" * 16}


def test_clock_behind_is_a_clock_alert_not_a_certificate_alert() -> None:
    [c] = device_alerts("gw-0412", [finding("CLOCK_BEHIND", cert=None,
                                            msg="clock 2 days behind")], online=True, now=NOW)
    assert c.category == "clock"
    assert c.labels["category"] == "clock"
    assert c.summary == "gw-0412: clock 2 days behind"


@pytest.mark.parametrize(("code", "cat"), [("CERT_EXPIRING", "certificate"),
                                           ("CERT_NOT_YET_VALID", "certificate"),
                                           ("CLOCK_IMPLAUSIBLE", "clock"),
                                           ("BROKER_CERT_EXPIRED", "broker"),
                                           ("SOME_FUTURE_CODE", "certificate")])
def test_category_per_code(code: str, cat: str) -> None:
    [c] = device_alerts("gw-1", [finding(code)], online=True, now=NOW)
    assert (c.rule, c.category) == (code, cat)


def test_labels_are_the_low_cardinality_set() -> None:
    [c] = device_alerts("gw-1", [finding("CERT_EXPIRING", Severity.CRITICAL)], online=True,
                        now=NOW)
    assert c.labels == {"alertname": "CERT_EXPIRING", "rule": "CERT_EXPIRING", "device": "gw-1",
                        "severity": "critical", "category": "certificate",
                        "scope": "findings", "cert": REF}


def test_summary_names_device_subject_and_date_when_known() -> None:
    certs = {REF: CertName(sha256=REF + "c" * 48, subject="CN=gw-1")}
    [c] = device_alerts("gw-1", [finding("CERT_EXPIRING", msg="client certificate expiring",
                                         not_after=NOW + timedelta(days=3))],
                        online=True, now=NOW, certs=certs)
    assert c.summary == ("gw-1: client certificate expiring; certificate CN=gw-1; "
                         "expires 2026-03-04T12:00:00Z (in 3 days)")
    assert c.cert_sha256 == REF + "c" * 48
    assert c.key == f"CERT_EXPIRING|gw-1|{REF}"  # the key does not depend on what is known


def test_offline_device_findings_stand_as_last_reported() -> None:
    [c] = device_alerts("gw-1", [finding("CERT_EXPIRED", Severity.CRITICAL, msg="expired")],
                        online=False, now=NOW)
    assert c.summary == "gw-1: expired (device offline; as last reported)"


def test_severity_override_raises_lowers_or_silences_a_rule() -> None:
    cfg = RulesConfig({"WEAK_SIGNATURE": Severity.CRITICAL, "KEY_PERMISSIONS": Severity.OK})
    out = device_alerts("gw-1", [finding("WEAK_SIGNATURE"), finding("KEY_PERMISSIONS")],
                        online=True, now=NOW, rules_config=cfg)
    assert [(c.rule, c.severity, c.labels["severity"]) for c in out] == [
        ("WEAK_SIGNATURE", Severity.CRITICAL, "critical")]


# --------------------------------------------------------------------------- offline rules


def test_online_device_has_no_offline_alerts() -> None:
    assert offline_alerts("gw-1", online=True, last_seen_at=NOW, client_not_after=NOW,
                          now=NOW, policy=Policy()) == []


def test_offline_with_a_healthy_certificate_is_device_offline_only() -> None:
    [c] = offline_alerts("gw-0412", online=False, last_seen_at=NOW - timedelta(hours=3),
                         client_not_after=NOW + timedelta(days=300), now=NOW, policy=Policy())
    assert (c.rule, c.severity, c.scope, c.key) == (DEVICE_OFFLINE, Severity.WARNING,
                                                    Scope.OFFLINE, "DEVICE_OFFLINE|gw-0412|-")
    assert c.summary == "gw-0412 has been silent for 3 hours (last seen 2026-03-01T09:00:00Z)"


def test_offline_while_its_certificate_expires_is_critical() -> None:
    out = offline_alerts("gw-0412", online=False, last_seen_at=NOW - timedelta(hours=3),
                         client_not_after=NOW + timedelta(days=2), now=NOW,
                         policy=Policy(warn_days=30), client_sha256=SHA_A)
    by_rule = {c.rule: c for c in out}
    c = by_rule[OFFLINE_CERT_EXPIRING]
    assert (c.severity, c.category, c.key) == (Severity.CRITICAL, "certificate",
                                               f"OFFLINE_CERT_EXPIRING|gw-0412|{SHA_A}")
    assert c.summary == ("gw-0412 has been silent for 3 hours and its client certificate "
                         "expires 2026-03-03T12:00:00Z (in 2 days) while it is offline")


def test_offline_with_an_already_expired_certificate() -> None:
    out = offline_alerts("gw-1", online=False, last_seen_at=None,
                         client_not_after=NOW - timedelta(days=1), now=NOW, policy=Policy())
    c = next(c for c in out if c.rule == OFFLINE_CERT_EXPIRING)
    assert "has never reported" in c.summary and "(1 day ago)" in c.summary


def test_offline_by_its_will_right_after_a_status_says_so() -> None:
    # The broker fired the device's last will 2 s after its status: sooner than any
    # silence judgement could (one interval at least), so not "silent for 2 seconds".
    [c] = offline_alerts("gw-0601", online=False, last_seen_at=NOW - timedelta(seconds=2),
                         client_not_after=None, now=NOW, policy=Policy(), interval_s=60)
    assert c.summary == ("gw-0601 went offline (its connection dropped; the broker published "
                         "its last will) at 2026-03-01T12:00:00Z, last status 2 seconds ago")


@pytest.mark.parametrize(("silence_s", "interval_s", "will"), [
    (30, 60, True), (61, 60, False), (9, None, True), (10, None, False)])
def test_will_or_silence_is_told_apart_by_the_interval(silence_s: int, interval_s: int | None,
                                                      will: bool) -> None:
    # Unknown interval: the agent's minimum (10 s) bounds the earliest silence verdict.
    [c] = offline_alerts("gw-1", online=False, last_seen_at=NOW - timedelta(seconds=silence_s),
                         client_not_after=None, now=NOW, policy=Policy(), interval_s=interval_s)
    assert ("last will" in c.summary) is will
    assert ("has been silent for" in c.summary) is not will


def test_an_offline_device_leads_with_offline_not_its_last_finding() -> None:
    # gw-0601 last reported CLOCK_UNSYNCED, then its will fired: offline is what to fix.
    code, message = aggregate.shown_worst("CLOCK_UNSYNCED", "clock not synchronised",
                                          online=False, offline_since=NOW)
    assert code == aggregate.OFFLINE_CODE == DEVICE_OFFLINE
    assert message == ("offline since 2026-03-01T12:00:00Z; last reported CLOCK_UNSYNCED: "
                       "clock not synchronised")
    assert aggregate.shown_worst(None, None, online=False, offline_since=None) == (
        DEVICE_OFFLINE, "offline")
    assert aggregate.shown_worst("CERT_EXPIRING", "m", online=True, offline_since=NOW) == (
        "CERT_EXPIRING", "m")
    assert aggregate.device_state(1, "CLOCK_UNSYNCED", online=False) == "offline"


def test_offline_expiry_outside_the_warn_window_is_not_an_alert() -> None:
    out = offline_alerts("gw-1", online=False, last_seen_at=NOW,
                         client_not_after=NOW + timedelta(days=31), now=NOW,
                         policy=Policy(warn_days=30))
    assert [c.rule for c in out] == [DEVICE_OFFLINE]


@pytest.mark.parametrize(("seconds", "text"), [(5, "5 seconds"), (60, "1 minute"),
                                               (3 * 3600 + 59, "3 hours"), (86400 * 2, "2 days")])
def test_humanize(seconds: int, text: str) -> None:
    assert humanize(timedelta(seconds=seconds)) == text


# --------------------------------------------------------------------------- fleet rules


def test_missing_required_ca_one_alert_per_device_and_ca() -> None:
    reqs = [RequiredCA("New Root", SHA_A.upper(), "required"),
            RequiredCA("Other Root", SHA_B, "required"),
            RequiredCA("Old Root", "c" * 64, "retiring")]
    out = trust_requirement_alerts(reqs, {SHA_A: {"gw-1"}, SHA_B: {"gw-1", "gw-2"}},
                                   {"gw-1", "gw-2", "gw-3"})
    assert sorted(c.key for c in out) == [f"TRUST_STORE_MISSING_CA|gw-2|{SHA_A}",
                                          f"TRUST_STORE_MISSING_CA|gw-3|{SHA_A}",
                                          f"TRUST_STORE_MISSING_CA|gw-3|{SHA_B}"]
    c = out[0]
    assert (c.rule, c.severity, c.scope, c.device_id) == (TRUST_STORE_MISSING_CA,
                                                          Severity.WARNING, Scope.TRUST, "gw-2")
    assert c.summary == f'gw-2: trust store lacks required CA "New Root" (sha256 {"a" * 16}…)'


def test_agent_and_fleet_missing_ca_never_share_a_key() -> None:
    [agent] = device_alerts("gw-1", [finding(TRUST_STORE_MISSING_CA, cert=SHA_A[:16])],
                            online=True, now=NOW)
    [fleet] = trust_requirement_alerts([RequiredCA("R", SHA_A, "required")], {}, {"gw-1"})
    assert agent.key != fleet.key and agent.scope != fleet.scope


def test_shared_client_certificate_is_one_critical_fleet_alert_per_certificate() -> None:
    out = shared_client_cert_alerts({"gw-1": SHA_A, "gw-2": SHA_A, "gw-3": SHA_B,
                                     "gw-4": SHA_A})
    [c] = out
    assert (c.rule, c.severity, c.device_id, c.key) == (
        SHARED_CLIENT_CERT, Severity.CRITICAL, None, f"SHARED_CLIENT_CERT|fleet|{SHA_A}")
    assert c.labels["device"] == "fleet"
    assert c.summary == f"client certificate {'a' * 16}… is used by 3 devices: gw-1, gw-2, gw-4"


def test_shared_client_certificate_summary_is_bounded() -> None:
    [c] = shared_client_cert_alerts({f"gw-{i}": SHA_A for i in range(8)}, max_named=2)
    assert c.summary.endswith("gw-0, gw-1 and 6 more")


# --------------------------------------------------------------------------- engine


class MemoryAlertStore:
    """The store's alert contract, in memory (see collector/store/sqlite.py)."""

    def __init__(self) -> None:
        self.rows: dict[str, AlertRow] = {}
        self._lock = threading.Lock()

    def alert_fire(self, key: str, *, rule: str, device_id: str | None,
                   cert_sha256: str | None, severity: int, summary: str,
                   labels: Mapping[str, str], now: datetime,
                   renotify_interval_s: float | None) -> bool:
        with self._lock:
            row = self.rows.get(key)
            notify = (row is None or row.state != "firing" or row.severity != severity
                      or row.last_notified_at is None
                      or (renotify_interval_s is not None and now - row.last_notified_at
                          >= timedelta(seconds=renotify_interval_s)))
            firing = row is not None and row.state == "firing"
            new = AlertRow(key, rule, device_id, cert_sha256, severity, "firing", summary,
                           dict(labels), row.started_at if row and firing else now, None,
                           now if notify else (row.last_notified_at if row else None),
                           (row.notify_count + 1 if firing and row else 1) if notify
                           else (row.notify_count if row else 0), now)
            self.rows[key] = new
            return notify

    def alert_resolve(self, key: str, now: datetime) -> bool:
        with self._lock:
            row = self.rows.get(key)
            if row is None or row.state != "firing":
                return False
            self.rows[key] = replace(row, state="resolved", resolved_at=now, updated_at=now)
            return True

    def active_alerts(self) -> list[AlertRow]:
        with self._lock:
            return [r for r in self.rows.values() if r.state == "firing"]

    def alert_history(self, device_id: str | None = None, limit: int = 100) -> list[AlertRow]:
        with self._lock:
            rows = [r for r in self.rows.values() if device_id is None or r.device_id == device_id]
        return sorted(rows, key=lambda r: (r.updated_at, r.alert_key), reverse=True)[:limit]


class Recorder:
    def __init__(self) -> None:
        self.got: list[Notification] = []
        self.cond = threading.Condition()

    def send(self, notification: Notification) -> None:
        with self.cond:
            self.got.append(notification)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 2.0) -> list[Notification]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, timeout), self.got
            return list(self.got)


Env = tuple[AlertEngine, MemoryAlertStore, Recorder]


@pytest.fixture
def engine() -> Iterator[Env]:
    store, rec = MemoryAlertStore(), Recorder()
    eng = AlertEngine(store, {"rec": rec}, renotify_interval_s=3600, clock=lambda: NOW,
                      rng=random.Random(1))
    yield eng, store, rec
    eng.close(2)


def expiring(device: str = "gw-1", severity: Severity = Severity.WARNING,
             cert: str = REF) -> list[AlertCandidate]:
    return device_alerts(device, [finding("CERT_EXPIRING", severity, cert=cert)], online=True,
                         now=NOW)


def test_fire_once_then_quiet_until_the_renotify_interval(engine: Env) -> None:
    eng, _store, rec = engine
    assert eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS).notified == (
        f"CERT_EXPIRING|gw-1|{REF}",)
    assert eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS,
                        now=NOW + timedelta(minutes=59)).notified == ()
    assert eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS,
                        now=NOW + timedelta(hours=1)).notified != ()
    first, repeat = rec.wait_for(2)
    assert (first.status, first.reason, first.starts_at, first.at) == ("firing", "new", NOW, NOW)
    assert (repeat.reason, repeat.starts_at, repeat.at) == ("repeat", NOW, NOW + timedelta(hours=1))


def test_severity_change_notifies_and_names_the_replaced_labels(engine: Env) -> None:
    eng, _store, rec = engine
    eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS)
    later = NOW + timedelta(minutes=5)
    eng.evaluate("gw-1", expiring(severity=Severity.CRITICAL), scope=Scope.FINDINGS, now=later)
    _, changed = rec.wait_for(2)
    assert (changed.reason, changed.severity, changed.starts_at) == ("severity",
                                                                    Severity.CRITICAL, NOW)
    assert changed.replaces_labels is not None
    assert changed.replaces_labels["severity"] == "warning"


def test_resolve_exactly_once(engine: Env) -> None:
    eng, store, rec = engine
    eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS)
    later = NOW + timedelta(minutes=10)
    assert eng.evaluate("gw-1", [], scope=Scope.FINDINGS, now=later).resolved == (
        f"CERT_EXPIRING|gw-1|{REF}",)
    assert eng.evaluate("gw-1", [], scope=Scope.FINDINGS, now=later).resolved == ()
    _, resolved = rec.wait_for(2)
    assert (resolved.status, resolved.starts_at, resolved.ends_at) == ("resolved", NOW, later)
    assert store.active_alerts() == []


def test_refire_after_resolve_starts_a_new_lifecycle(engine: Env) -> None:
    eng, _store, rec = engine
    t1, t2 = NOW + timedelta(minutes=1), NOW + timedelta(minutes=2)
    eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS)
    eng.evaluate("gw-1", [], scope=Scope.FINDINGS, now=t1)
    eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS, now=t2)
    third = rec.wait_for(3)[2]
    assert (third.status, third.reason, third.starts_at) == ("firing", "new", t2)


def test_findings_evaluation_does_not_resolve_the_offline_alert(engine: Env) -> None:
    eng, store, _rec = engine
    offline = offline_alerts("gw-1", online=False, last_seen_at=NOW - timedelta(hours=1),
                             client_not_after=None, now=NOW, policy=Policy())
    eng.evaluate("gw-1", offline, scope=Scope.OFFLINE)
    eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS)
    eng.evaluate("gw-1", [], scope=Scope.FINDINGS)  # findings cleared: offline must stay
    assert [r.rule for r in store.active_alerts()] == [DEVICE_OFFLINE]
    eng.evaluate("gw-1", [], scope=Scope.OFFLINE)  # back online
    assert store.active_alerts() == []


def test_one_device_does_not_resolve_another(engine: Env) -> None:
    eng, store, _rec = engine
    eng.evaluate("gw-1", expiring("gw-1"), scope=Scope.FINDINGS)
    eng.evaluate("gw-2", expiring("gw-2"), scope=Scope.FINDINGS)
    eng.evaluate("gw-2", [], scope=Scope.FINDINGS)
    assert [r.device_id for r in store.active_alerts()] == ["gw-1"]


def test_fleet_sweep_owns_its_scope_on_every_device(engine: Env) -> None:
    eng, store, _rec = engine
    req = [RequiredCA("R", SHA_A, "required")]
    eng.evaluate("gw-1", expiring("gw-1"), scope=Scope.FINDINGS)
    eng.evaluate_fleet(trust_requirement_alerts(req, {}, {"gw-1", "gw-2"}), scope=Scope.TRUST)
    assert len(store.active_alerts()) == 3
    res = eng.evaluate_fleet(trust_requirement_alerts(req, {SHA_A: {"gw-2"}}, {"gw-1", "gw-2"}),
                             scope=Scope.TRUST)
    assert res.resolved == (f"TRUST_STORE_MISSING_CA|gw-2|{SHA_A}",)
    assert sorted(r.rule for r in store.active_alerts()) == ["CERT_EXPIRING",
                                                             TRUST_STORE_MISSING_CA]


def test_fleet_alerts_without_a_device(engine: Env) -> None:
    eng, store, rec = engine
    shared = shared_client_cert_alerts({"gw-1": SHA_A, "gw-2": SHA_A})
    eng.evaluate(None, shared, scope=Scope.SHARED_CERT)
    assert rec.wait_for(1)[0].device_id is None
    eng.evaluate(None, [], scope=Scope.SHARED_CERT)
    assert store.active_alerts() == []


def test_candidates_outside_the_scope_or_device_are_refused(engine: Env) -> None:
    eng, _store, _rec = engine
    with pytest.raises(ValueError, match="does not belong"):
        eng.evaluate("gw-1", expiring(), scope=Scope.OFFLINE)
    with pytest.raises(ValueError, match="does not belong"):
        eng.evaluate("gw-2", expiring("gw-1"), scope=Scope.FINDINGS)
    with pytest.raises(ValueError, match="not in scope"):
        eng.evaluate_fleet(expiring(), scope=Scope.TRUST)


def test_renotify_due_resends_what_a_crash_lost(engine: Env) -> None:
    eng, store, rec = engine
    # Another collector recorded the transition, then died before its sink call.
    for c in expiring():
        store.alert_fire(c.key, rule=c.rule, device_id=c.device_id, cert_sha256=c.cert_sha256,
                         severity=int(c.severity), summary=c.summary, labels=c.labels,
                         now=NOW, renotify_interval_s=3600)
    assert eng.renotify_due(NOW + timedelta(minutes=30)) == 0
    assert eng.renotify_due(NOW + timedelta(hours=1)) == 1
    assert eng.renotify_due(NOW + timedelta(hours=1)) == 0  # claimed: sent once
    [n] = rec.wait_for(1)
    assert (n.reason, n.starts_at, n.labels["scope"]) == ("repeat", NOW, "findings")


class FleetReadCounting(MemoryAlertStore):
    """Counts reads of the whole fleet's firing alerts."""

    def __init__(self) -> None:
        super().__init__()
        self.fleet_reads = 0

    def active_alerts(self) -> list[AlertRow]:
        self.fleet_reads += 1
        return super().active_alerts()


def test_a_device_evaluation_reads_that_device_only() -> None:
    # Other devices' alerts are not read on the ingest path: the device's own rows come
    # by its index (alert_history); only a device with more rows than that falls back.
    store = FleetReadCounting()
    with AlertEngine(store, {}, renotify_interval_s=3600, clock=lambda: NOW) as eng:
        for i in range(50):
            eng.evaluate(f"gw-{i}", expiring(f"gw-{i}"), scope=Scope.FINDINGS)
        resolved = eng.evaluate_device("gw-1", {Scope.FINDINGS: [], Scope.OFFLINE: []})
        assert resolved.resolved == (f"CERT_EXPIRING|gw-1|{REF}",)
        assert store.fleet_reads == 0
        assert len(store.active_alerts()) == 49
        for i in range(DEVICE_ROWS_MAX):
            store.alert_fire(f"OLD|gw-2|{i}", rule="OLD", device_id="gw-2", cert_sha256=None,
                             severity=2, summary="s", labels={"scope": "findings"}, now=NOW,
                             renotify_interval_s=None)
        store.fleet_reads = 0
        assert len(eng.evaluate("gw-2", [], scope=Scope.FINDINGS).resolved) == DEVICE_ROWS_MAX + 1
        assert store.fleet_reads == 1


def test_two_engines_on_one_store_notify_once(engine: Env) -> None:
    eng, store, rec = engine
    other_rec = Recorder()
    other = AlertEngine(store, {"rec": other_rec}, renotify_interval_s=3600, clock=lambda: NOW)
    try:
        eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS)
        other.evaluate("gw-1", expiring(), scope=Scope.FINDINGS)
        other.evaluate("gw-1", [], scope=Scope.FINDINGS)
        eng.evaluate("gw-1", [], scope=Scope.FINDINGS)
    finally:
        other.close(2)
    assert [n.status for n in rec.wait_for(1)] == ["firing"]
    assert [n.status for n in other_rec.got] == ["resolved"]


def test_lifecycle_against_the_real_sqlite_store(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/alerts.db")
    store.migrate()
    rec = Recorder()
    eng = AlertEngine(store, {"rec": rec}, renotify_interval_s=3600, clock=lambda: NOW)
    try:
        offline = offline_alerts("gw-1", online=False, last_seen_at=NOW, client_not_after=None,
                                 now=NOW, policy=Policy())
        eng.evaluate("gw-1", offline, scope=Scope.OFFLINE)
        eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS)
        assert eng.evaluate("gw-1", expiring(), scope=Scope.FINDINGS).notified == ()
        eng.evaluate("gw-1", [], scope=Scope.FINDINGS, now=NOW + timedelta(minutes=1))
        assert [r.rule for r in store.active_alerts()] == [DEVICE_OFFLINE]
        assert eng.renotify_due(NOW + timedelta(hours=1)) == 1
        got = rec.wait_for(4)
        assert [(n.status, n.reason, n.rule) for n in got] == [
            ("firing", "new", DEVICE_OFFLINE), ("firing", "new", "CERT_EXPIRING"),
            ("resolved", "resolved", "CERT_EXPIRING"), ("firing", "repeat", DEVICE_OFFLINE)]
    finally:
        eng.close(2)
        store.close()
