"""What a batch of statuses changes: the store's pure decisions, shared by every backend.

Owns the order of a device's statuses (first sighting of the boot, boot_id, seq), the
per-batch change plan (`plan_batch`: device row updates, history rows, certificate
links) and the replay rule (`SeqWindow`, `judge_seqs`: per boot the highest seq and a
bitmap of the REORDER_WINDOW seqs below it). The SQL that reads the inputs and
writes the plan is `collector.store.sql`'s.
It must not touch a database, read the clock or judge certificates: it turns rows
already read under the device's lock into plain values to write.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from collector.store import CertLink, CertRole, CertRow, FindingRecord, StatusRecord


def detail_json(**kw: object) -> str:
    """A history row's detail: compact, keys sorted, so equal changes are equal text."""
    return json.dumps(kw, separators=(",", ":"), sort_keys=True)


def codes_of(findings: Sequence[FindingRecord]) -> list[str]:
    return sorted({f.code for f in findings})


@dataclass(slots=True)
class RowState:
    """What the batch planner needs of a device row, read under the device's lock;
    `plan_batch` advances it in place as it applies the batch's records in order."""

    device_id: str
    has_status: bool
    boot_id: str | None
    boot_first_seen_at: datetime | None
    seq: int | None
    severity: int
    codes: list[str]
    client_sha256: str | None
    trust_digest: str | None
    is_online: bool
    online_changed_at: datetime | None
    last_received_at: datetime | None


@dataclass(slots=True)
class BatchPlan:
    """Every write a batch implies, as plain values; the store turns it into SQL,
    sorted by key so that concurrent PostgreSQL writers lock rows in one order."""

    applied: dict[str, StatusRecord] = field(default_factory=dict)  # device → newest applied
    touched: dict[str, datetime] = field(default_factory=dict)  # device → last_received_at
    online_at: dict[str, datetime] = field(default_factory=dict)  # device → came back online
    history: list[tuple[str, datetime, str, str]] = field(default_factory=list)
    certs: dict[str, tuple[CertRow, datetime]] = field(default_factory=dict)
    # (device_id, sha256, role) → seen at; deletes run before upserts.
    link_upserts: dict[tuple[str, str, str], datetime] = field(default_factory=dict)
    link_deletes: set[tuple[str, str, str]] = field(default_factory=set)


def plan_batch(new: Sequence[StatusRecord], states: Mapping[str, RowState],
               boots: Mapping[tuple[str, str], datetime],
               links: dict[str, set[tuple[str, str]]]) -> BatchPlan:
    """Decide, for the new (non-replayed) records of a batch, what changes.

    "Newer" orders by (first-seen-at of the boot, boot_id, seq): boot ids are random,
    so the collector's own first sighting of a boot is the only order between boots.
    A reordered older status still counts as received but changes nothing else.
    `links[device]` is the device's current {(role, sha256)}.
    """
    plan = BatchPlan()

    def order(r: StatusRecord) -> tuple[datetime, str, int]:
        return (boots[(r.device_id, r.boot_id)], r.boot_id, r.seq)

    for rec in sorted(new, key=lambda r: (r.device_id, order(r))):
        st = states[rec.device_id]
        dev = rec.device_id
        if st.last_received_at is None or rec.received_at > st.last_received_at:
            st.last_received_at = rec.received_at
        plan.touched[dev] = st.last_received_at
        if st.has_status and st.boot_id is not None and st.seq is not None:
            current = (st.boot_first_seen_at or rec.received_at, st.boot_id, st.seq)
            if order(rec) <= current:
                continue  # older than what the device row shows: seen, not applied
        codes = codes_of(rec.findings)
        at = rec.received_at
        if not st.has_status:
            plan.history.append((dev, at, "first_status", detail_json(
                severity=rec.severity, codes=codes, client_sha256=rec.client_sha256,
                trust_digest=rec.trust_digest)))
        else:
            if rec.severity != st.severity or codes != st.codes:
                plan.history.append((dev, at, "status_change", detail_json(
                    severity=[st.severity, rec.severity], codes=[st.codes, codes])))
            if rec.client_sha256 != st.client_sha256:
                plan.history.append((dev, at, "cert_change", detail_json(
                    client_sha256=[st.client_sha256, rec.client_sha256])))
            if rec.trust_digest != st.trust_digest:
                plan.history.append((dev, at, "trust_change", detail_json(
                    trust_digest=[st.trust_digest, rec.trust_digest])))
        if not st.is_online and (st.online_changed_at is None or at >= st.online_changed_at):
            # A fresh status proves the device is up again (after silence or an LWT
            # that this status postdates). A first status says so itself.
            if st.has_status:
                plan.history.append((dev, at, "online_change",
                                     detail_json(online=True, cause="status")))
            plan.online_at[dev] = at
            st.is_online, st.online_changed_at = True, at
        st.has_status, st.boot_id, st.seq = True, rec.boot_id, rec.seq
        st.boot_first_seen_at = boots[(dev, rec.boot_id)]
        st.severity, st.codes = rec.severity, codes
        st.client_sha256, st.trust_digest = rec.client_sha256, rec.trust_digest
        plan.applied[dev] = rec
        plan_links(plan, rec.device_id, rec.certs, rec.replace_roles, at,
                   links.setdefault(dev, set()))
    return plan


def plan_links(plan: BatchPlan, device_id: str, certs: Sequence[CertLink],
               replace_roles: frozenset[CertRole], at: datetime,
               current: set[tuple[str, str]]) -> None:
    """Replace the device's set for each role mentioned; `current` is updated in place."""
    roles = {str(link.role) for link in certs} | {str(r) for r in replace_roles}
    wanted = {(str(link.role), link.cert.sha256) for link in certs}
    for role, sha in sorted(current):
        if role in roles and (role, sha) not in wanted:
            plan.link_deletes.add((device_id, sha, role))
            plan.link_upserts.pop((device_id, sha, role), None)
            current.discard((role, sha))
    for link in certs:
        sha, role = link.cert.sha256, str(link.role)
        prev = plan.certs.get(sha)
        if prev is None or at > prev[1]:
            # Keep whichever copy carries the DER; facts of one sha256 never differ.
            plan.certs[sha] = (link.cert if prev is None or link.cert.der else prev[0], at)
        plan.link_upserts[(device_id, sha, role)] = at
        plan.link_deletes.discard((device_id, sha, role))
        current.add((role, sha))


# How many seqs below a boot's highest are remembered one by one. Statuses of one
# device reorder by at most what its agent sends in one go: a spool flushed after an
# outage (agent.spool_max_messages, default 1000) split across a share group, where one
# collector stalls while another stores the later ones. 1024 covers that default in
# 128 bytes per boot; a status further below the highest is judged a replay.
REORDER_WINDOW = 1024
_ALL = (1 << REORDER_WINDOW) - 1


@dataclass(slots=True)
class SeqWindow:
    """A boot's replay guard: its highest seq and which of the REORDER_WINDOW seqs
    below it were seen (bit i: seq high - 1 - i)."""

    high: int | None  # None: no status of this boot yet
    bits: int = 0

    @classmethod
    def from_row(cls, high: int | None, blob: bytes | None) -> SeqWindow:
        # A NULL bitmap (migrated from status_seen, or compacted by prune_seen):
        # nothing is known one by one below the highest, so all of it counts as seen.
        return cls(high, _ALL if blob is None else int.from_bytes(blob, "little") & _ALL)

    def blob(self) -> bytes:
        return self.bits.to_bytes(REORDER_WINDOW // 8, "little")

    def admit(self, seq: int) -> bool:
        """Whether `seq` is new to this boot; if so it is marked seen."""
        if self.high is None or seq > self.high:
            if self.high is not None:
                shift = seq - self.high
                self.bits = ((self.bits << shift) | (1 << (shift - 1))) & _ALL \
                    if shift <= REORDER_WINDOW else 0
            self.high = seq
            return True
        index = self.high - 1 - seq
        if index < 0 or index >= REORDER_WINDOW or self.bits >> index & 1:
            return False  # the highest itself, seen in the window, or older than it
        self.bits |= 1 << index
        return True

    def seqs(self) -> list[int]:
        """The seqs this window knows as seen (the tests' inspection)."""
        if self.high is None:
            return []
        return sorted([self.high] + [self.high - 1 - i for i in range(REORDER_WINDOW)
                                     if self.bits >> i & 1 and self.high - 1 - i >= 0])


def judge_seqs(batch: Sequence[StatusRecord],
               windows: dict[tuple[str, str], SeqWindow]) -> list[bool]:
    """Per record, whether it is new, in batch order: a later copy inside the batch is
    judged against the window the earlier one advanced. `windows` (read under the
    devices' locks; absent: a boot never seen) is advanced in place."""
    out = []
    for rec in batch:
        window = windows.setdefault((rec.device_id, rec.boot_id), SeqWindow(None))
        out.append(window.admit(rec.seq))
    return out
