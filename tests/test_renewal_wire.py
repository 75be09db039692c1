"""The status's optional `renewal` part, and the collector's renewal rules.

The part is optional both ways: a status without it is byte-identical to before (the
golden file in tests/data/golden is untouched, test_protocol checks it), an old
agent's status decodes with `renewal` None, and a reader ignores it as an unknown key.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from datetime import timedelta

import jsonschema
import pytest
from test_protocol import GOLDEN, T, golden_status

from certmon import wire as P
from certmon.errors import ProtocolError
from certmon.pki import Severity
from collector.alerts.rules import (
    RENEWAL_FAILING,
    RENEWAL_OVERDUE,
    RulesConfig,
    Scope,
    renewal_alerts,
)

FAILED = P.RenewalState(due_at=T - timedelta(minutes=10), is_due=True,
                        next_attempt_at=T + timedelta(minutes=10),
                        last_attempt_at=T - timedelta(minutes=5), outcome="failed",
                        reason="hook /usr/local/bin/renew exited 1: 403 forbidden", failures=3)


def schema() -> dict[str, object]:
    text = importlib.resources.files("certmon").joinpath("schemas/status-v1.json").read_text()
    return dict(json.loads(text))


def test_renewal_round_trips_and_matches_the_schema() -> None:
    status = dataclasses.replace(golden_status(), renewal=FAILED)
    data = P.encode_status(status)
    assert P.decode_status(data) == status
    jsonschema.Draft202012Validator(schema()).validate(json.loads(data))
    defs = schema()["$defs"]
    assert isinstance(defs, dict)
    assert set(defs["renewal"]["properties"]) == {
        f.name for f in dataclasses.fields(P.RenewalState)}
    fresh = P.RenewalState(due_at=T, is_due=False, next_attempt_at=T, last_attempt_at=None,
                           outcome=None, reason=None, failures=0)
    assert json.loads(P.encode_status(dataclasses.replace(golden_status(), renewal=fresh)))[
        "renewal"] == {"due_at": "2026-03-01T12:00:00Z", "failures": 0, "is_due": False,
                       "next_attempt_at": "2026-03-01T12:00:00Z"}


def test_without_renewal_the_bytes_are_the_golden_ones() -> None:
    assert P.encode_status(golden_status()) == (GOLDEN / "status-v1.json").read_bytes()
    assert P.decode_status((GOLDEN / "status-v1.json").read_bytes()).renewal is None


def test_a_bad_outcome_is_rejected() -> None:
    data = json.loads(P.encode_status(dataclasses.replace(golden_status(), renewal=FAILED)))
    data["renewal"]["outcome"] = "maybe"
    with pytest.raises(ProtocolError, match=r"^renewal\.outcome"):
        P.Status.from_json(data)


def test_failing_is_raised_with_the_reason_and_resolves_on_success() -> None:
    (alert,) = renewal_alerts("gw-1", FAILED, interval_s=300, now=T)
    assert (alert.rule, alert.severity, alert.scope, alert.category) == (
        RENEWAL_FAILING, Severity.WARNING, Scope.FINDINGS, "certificate")
    assert "403 forbidden" in alert.summary and "(3 attempt(s))" in alert.summary
    renewed = dataclasses.replace(FAILED, outcome="renewed", failures=0, is_due=False,
                                  due_at=T + timedelta(days=200))
    assert renewal_alerts("gw-1", renewed, interval_s=300, now=T) == []
    assert renewal_alerts("gw-1", None, interval_s=300, now=T) == []


def test_overdue_by_the_collectors_clock_after_three_intervals() -> None:
    quiet = dataclasses.replace(FAILED, outcome=None, reason=None, failures=0,
                                due_at=T - timedelta(seconds=899))
    assert renewal_alerts("gw-1", quiet, interval_s=300, now=T) == []
    late = dataclasses.replace(quiet, due_at=T - timedelta(seconds=900))
    (alert,) = renewal_alerts("gw-1", late, interval_s=300, now=T)
    assert alert.rule == RENEWAL_OVERDUE and "due since 2026-03-01T11:45:00Z" in alert.summary
    # The device's own is_due does not matter: the collector's clock judges.
    assert renewal_alerts("gw-1", dataclasses.replace(late, is_due=False), interval_s=300,
                          now=T)[0].rule == RENEWAL_OVERDUE


def test_severity_overrides_apply() -> None:
    silenced = RulesConfig({RENEWAL_FAILING: Severity.OK})
    assert renewal_alerts("gw-1", FAILED, interval_s=300, now=T, rules_config=silenced) == []
    louder = RulesConfig({RENEWAL_FAILING: Severity.CRITICAL})
    assert renewal_alerts("gw-1", FAILED, interval_s=300, now=T,
                          rules_config=louder)[0].severity == Severity.CRITICAL
