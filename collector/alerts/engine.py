"""The alert lifecycle (firing → resolved, re-notify), dispatch and the resend cycle.

Owns: turning a scope's candidates into store transitions (`alert_fire`,
`alert_resolve`, which are atomic across collectors and say whether *this* caller
must notify), the `Notification`s those transitions claim, handing them to every
sink's worker without blocking (`delivery.NotifyWorker` per human channel,
`feed.AlertmanagerFeed` per Alertmanager receiver), and the Alertmanager resend
cycle (`resend`: the store's active set to every feed). Must not judge findings
(that is `rules`), format for a channel (that is each sink), retry or batch (the
workers) or block the ingest path on a sink.

Delivery guarantee (docs/alerts.md, "Delivery"): the store records the transition
(and `last_notified_at`) before the notification is queued, so N collectors send one
notification. Human channels: a notification lost after that (process killed, queue
full, retries exhausted) is made good by the next re-notify: a firing alert is
delivered at least once per `renotify_interval_s` while it keeps firing and is
evaluated (or swept by `renotify_due`, which the collector runs at start and
periodically); a resolution at most once. Alertmanager receivers get every active
alert every `resend_interval_s`, whoever fired it, so a lost notification or a
receiver that lost its memory is made good within one resend interval.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from certmon.pki import Severity
from collector.alerts import Notification
from collector.alerts.delivery import NotifyWorker, SinkStats
from collector.alerts.feed import AlertmanagerFeed, FeedStats
from collector.alerts.rules import AlertCandidate, Scope
from collector.alerts.sinks import AlertmanagerSink, Sink
from collector.store import AlertRow, AlertStore

__all__ = ["AlertEngine", "AlertStore", "Evaluation", "FeedStats", "SinkStats"]

log = logging.getLogger(__name__)


# A device's alert rows read per evaluation (firing and resolved: one row per key, so a
# few per rule and certificate it ever had); past this many the fleet list is read.
DEVICE_ROWS_MAX = 1000


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What one evaluation changed (keys), for logs and tests."""

    notified: tuple[str, ...]  # fired, repeated or changed severity: queued for the sinks
    resolved: tuple[str, ...]  # resolved now: queued for the sinks
    firing: int  # candidates held (notified or not)


class AlertEngine:
    """`evaluate` candidates per (device, scope); dispatch off the caller's thread."""

    def __init__(self, store: AlertStore, sinks: Mapping[str, Sink], *,
                 renotify_interval_s: float, clock: Callable[[], datetime],
                 alertmanagers: Mapping[str, AlertmanagerSink] | None = None,
                 resend_interval_s: float = 60.0,
                 queue_size: int = 1000, max_attempts: int = 8,
                 backoff_base_s: float = 1.0, backoff_cap_s: float = 300.0,
                 generator_url: str | None = None, rng: random.Random | None = None) -> None:
        self._store = store
        self._renotify_interval_s = renotify_interval_s
        self._clock = clock
        self._generator_url = generator_url
        # One order for notifications and snapshot reads across threads (ingest,
        # service tick): a feed tells a resolution from a snapshot read before it.
        # next() on itertools.count is atomic under the GIL.
        self._seq = itertools.count(1)
        rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._workers = [NotifyWorker(name, sink, queue_size=queue_size,
                                      max_attempts=max_attempts,
                                      backoff_base_s=backoff_base_s,
                                      backoff_cap_s=backoff_cap_s,
                                      rng=random.Random(rng.random()))  # noqa: S311
                         for name, sink in sinks.items()]
        self._feeds = [AlertmanagerFeed(name, sink, resend_interval_s=resend_interval_s,
                                        clock=clock, max_resolving=queue_size,
                                        backoff_base_s=backoff_base_s,
                                        backoff_cap_s=backoff_cap_s,
                                        rng=random.Random(rng.random()))  # noqa: S311
                       for name, sink in (alertmanagers or {}).items()]

    # ------------------------------------------------------------------ lifecycle

    def evaluate(self, device_id: str | None, candidates: Sequence[AlertCandidate], *,
                 scope: Scope, now: datetime | None = None) -> Evaluation:
        """Fire every candidate; resolve every active alert of `device_id` in `scope`
        whose key is not among them. `device_id=None` means the fleet alerts (no
        device) of `scope`. Candidates must belong to that device and scope: an alert
        fired outside its scope would never be resolved by anyone."""
        return self.evaluate_device(device_id, {scope: candidates}, now=now)

    def evaluate_device(self, device_id: str | None,
                        by_scope: Mapping[Scope, Sequence[AlertCandidate]], *,
                        now: datetime | None = None) -> Evaluation:
        """`evaluate` for several scopes of one device with one store read: a changed
        status judges its findings and ends its offline alerts in one go."""
        for scope, candidates in by_scope.items():
            for c in candidates:
                if c.scope != scope or c.device_id != device_id:
                    raise ValueError(f"candidate {c.key} (scope {c.scope}) does not belong "
                                     f"to evaluate({device_id!r}, scope={scope})")
        scopes = {str(s) for s in by_scope}
        return self._reconcile([c for cs in by_scope.values() for c in cs], now,
                               lambda r: r.labels.get("scope") in scopes,
                               self._firing_of(device_id))

    def evaluate_fleet(self, candidates: Sequence[AlertCandidate], *, scope: Scope,
                       now: datetime | None = None) -> Evaluation:
        """Like `evaluate`, but owning `scope`'s alerts of every device at once: for the
        fleet sweeps (TRUST, SHARED_CERT) that judge all devices together. Run them
        under `store.try_claim` so one collector sweeps at a time."""
        for c in candidates:
            if c.scope != scope:
                raise ValueError(f"candidate {c.key} (scope {c.scope}) is not in scope {scope}")
        return self._reconcile(candidates, now, lambda r: r.labels.get("scope") == scope,
                               self._store.active_alerts())

    def renotify_due(self, now: datetime | None = None) -> int:
        """Re-notify every firing alert whose last notification is older than the
        interval (at start, and periodically): covers notifications lost in a crash
        between the store transition and the sink, and alerts nobody evaluates
        anymore. `alert_fire` stays the arbiter, so N collectors send one."""
        now = now or self._clock()
        due = timedelta(seconds=self._renotify_interval_s)
        count = 0
        for row in self._store.active_alerts():
            if row.last_notified_at is not None and now - row.last_notified_at < due:
                continue
            if self._fire(_candidate_of(row), row, now):
                count += 1
        return count

    def _firing_of(self, device_id: str | None) -> list[AlertRow]:
        """The firing alerts of one device (None: the fleet alerts, no device), read from
        the store at each evaluation: in a share group another collector may have fired
        or resolved them since, so no copy in this process would do (docs/alerts.md,
        "Cost"). A device's rows come by the (device_id, updated_at) index, so the cost
        is the device's, not the fleet's; fleet alerts are only evaluated by the sweep."""
        if device_id is not None:
            rows = self._store.alert_history(device_id, limit=DEVICE_ROWS_MAX)
            if len(rows) < DEVICE_ROWS_MAX:
                return [r for r in rows if r.state == "firing"]
        return [r for r in self._store.active_alerts() if r.device_id == device_id]

    def _reconcile(self, candidates: Sequence[AlertCandidate], now: datetime | None,
                   owns: Callable[[AlertRow], bool], firing: Sequence[AlertRow]
                   ) -> Evaluation:
        now = now or self._clock()
        active = {r.alert_key: r for r in firing if owns(r)}
        notified = [c.key for c in candidates if self._fire(c, active.get(c.key), now)]
        wanted = {c.key for c in candidates}
        resolved = []
        for key, row in sorted(active.items()):
            if key not in wanted and self._store.alert_resolve(key, now):
                resolved.append(key)
                self.dispatch(_resolved(row, now, self._generator_url))
        return Evaluation(tuple(notified), tuple(resolved), len(wanted))

    def _fire(self, c: AlertCandidate, prev: AlertRow | None, now: datetime) -> bool:
        if not self._store.alert_fire(
                c.key, rule=c.rule, device_id=c.device_id, cert_sha256=c.cert_sha256,
                severity=int(c.severity), summary=c.summary, labels=c.labels, now=now,
                renotify_interval_s=self._renotify_interval_s):
            return False
        reason: Literal["new", "repeat", "severity"]
        if prev is None:
            reason, starts_at, replaces = "new", now, None
        elif prev.severity != c.severity:
            reason, starts_at, replaces = "severity", prev.started_at, prev.labels
        else:
            reason, starts_at, replaces = "repeat", prev.started_at, None
        self.dispatch(Notification(
            status="firing", reason=reason, key=c.key, rule=c.rule, device_id=c.device_id,
            cert_sha256=c.cert_sha256, severity=c.severity, category=c.category,
            summary=c.summary, labels=c.labels, starts_at=starts_at, at=now,
            replaces_labels=replaces, generator_url=self._generator_url))
        return True

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, n: Notification) -> None:
        """Hand `n` to every sink; never blocks (a full schedule drops and counts). Public
        for callers that notify outside the lifecycle, e.g. a "send a test alert" command."""
        seq = next(self._seq)
        for w in self._workers:
            w.submit(n, seq)
        for f in self._feeds:
            f.update(n, seq)

    def resend(self, now: datetime | None = None) -> None:
        """The Alertmanager cycle (every `resend_interval_s`, on every collector of a
        group: Alertmanager dedups by labels, and a collector cut off from it must not
        starve it): the store's active set, whoever fired it, to every feed, which
        posts it in one batch. If the store cannot be read, the feeds post what they
        hold, so a store outage does not make Alertmanager time the alerts out."""
        if not self._feeds:
            return
        now = now or self._clock()
        seq = next(self._seq)  # before the read: what happens after it is newer
        active: list[Notification] | None
        try:
            active = [self._active(row) for row in self._store.active_alerts()]
        except Exception as exc:  # noqa: BLE001 - the store is down: resend what is held
            log.warning("alert resend: cannot read the active alerts (%s); resending the "
                        "last set", exc)
            active = None
        for f in self._feeds:
            f.cycle(active, seq, now)

    def _active(self, row: AlertRow) -> Notification:
        c = _candidate_of(row)
        return Notification(
            status="firing", reason="repeat", key=c.key, rule=c.rule, device_id=c.device_id,
            cert_sha256=c.cert_sha256, severity=c.severity, category=c.category,
            summary=c.summary, labels=c.labels, starts_at=row.started_at,
            at=row.last_notified_at or row.updated_at, generator_url=self._generator_url)

    def stats(self) -> dict[str, SinkStats]:
        """Per human channel: the counters behind certmon_alert_notifications_total."""
        return {w.name: w.stats() for w in self._workers}

    def feed_stats(self) -> dict[str, FeedStats]:
        """Per Alertmanager receiver."""
        return {f.name: f.stats() for f in self._feeds}

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is due within `timeout` seconds, then stop the workers;
        whatever is left is counted as dropped (re-notify makes good firing alerts,
        Alertmanager ends them by `endsAt`, four resend intervals)."""
        deadline = time.monotonic() + timeout
        workers: list[NotifyWorker | AlertmanagerFeed] = [*self._workers, *self._feeds]
        for w in workers:  # all at once, so no slow sink eats the others' time
            w.close()
        for w in workers:
            w.join(deadline)

    def __enter__(self) -> AlertEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _candidate_of(row: AlertRow) -> AlertCandidate:
    """A stored firing alert as the candidate that fired it (for `renotify_due`)."""
    labels = dict(row.labels)
    try:
        scope = Scope(labels.get("scope", ""))
    except ValueError:  # written by a newer collector; the scope only guards resolving
        scope = Scope.FINDINGS
    return AlertCandidate(
        key=row.alert_key, rule=row.rule, device_id=row.device_id,
        cert_sha256=row.cert_sha256, severity=Severity(row.severity),
        category=labels.get("category", "certificate"), scope=scope, summary=row.summary,
        labels=labels)


def _resolved(row: AlertRow, now: datetime, generator_url: str | None) -> Notification:
    return Notification(
        status="resolved", reason="resolved", key=row.alert_key, rule=row.rule,
        device_id=row.device_id, cert_sha256=row.cert_sha256,
        severity=Severity(row.severity), category=row.labels.get("category", "certificate"),
        summary=row.summary, labels=row.labels, starts_at=row.started_at, at=now,
        ends_at=now, generator_url=generator_url)

