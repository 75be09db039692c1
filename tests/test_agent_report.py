"""agent.report: the device's material judged at `now`, with the clock taken into account.

The story: a gateway's wall clock fell two days behind (fake-hwclock restored an old
date). Its client certificate was renewed yesterday, so by the device's clock it is
"not yet valid". That is a clock problem, and the report must say so — not send
someone to re-issue a perfectly good certificate.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from kit.pki import PKIFactory, write_bundle

from agent.certstore import read_material
from agent.clocksync import ChronyTracking, ClockState, evaluate_clock
from agent.report import check_device, newest_not_before
from certmon import pki

TRUE_NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DEVICE_NOW = TRUE_NOW - timedelta(days=2)
RELEASE = datetime(2026, 1, 1, tzinfo=UTC)


def material_renewed_yesterday(tmp_path: Path) -> object:
    factory = PKIFactory(TRUE_NOW)
    root = factory.root("Fleet Root", not_before=TRUE_NOW - timedelta(days=400))
    inter = factory.intermediate(root, "Fleet Devices", not_before=TRUE_NOW - timedelta(days=300))
    leaf = factory.leaf(inter, "gw-0193", not_before=TRUE_NOW - timedelta(days=1), days=90)
    cert, key = leaf.write(tmp_path, chain=True)
    bundle = write_bundle(tmp_path / "ca.pem", [root])
    return read_material(bundle, cert, key)


def chrony(offset_s: float) -> ChronyTracking:
    return ChronyTracking("C0A80001", "192.0.2.1", 2, TRUE_NOW, offset_s, 0.0, 0.0, 0.0, 0.0,
                          0.0, 0.01, 0.01, 64.0, "Normal")


def verdict_for(material: object, offset_s: float | None) -> tuple[object, list[pki.Finding]]:
    state = ClockState(kernel=None, timesyncd=None,
                       chrony=chrony(offset_s) if offset_s is not None else None,
                       sntp=None, wall_now=DEVICE_NOW, boot_id="b", monotonic_s=10.0)
    return evaluate_clock(state, newest_not_before=newest_not_before(material),  # type: ignore[arg-type]
                          release_date=RELEASE)


def test_without_clock_knowledge_it_looks_like_a_certificate_problem(tmp_path: Path) -> None:
    material = material_renewed_yesterday(tmp_path)
    result = check_device(material, DEVICE_NOW, pki.Policy())  # type: ignore[arg-type]
    codes = {f.code for f in result.findings}
    assert pki.FindingCode.CERT_NOT_YET_VALID in codes
    assert result.chain_now is not None and not result.chain_now.is_valid


def test_clock_two_days_behind_is_a_clock_finding_not_a_certificate_one(tmp_path: Path) -> None:
    material = material_renewed_yesterday(tmp_path)
    verdict, clock_findings = verdict_for(material, offset_s=2 * 86400.0)
    result = check_device(material, DEVICE_NOW, pki.Policy(), clock=verdict)  # type: ignore[arg-type]
    codes = {f.code for f in result.findings} | {f.code for f in clock_findings}
    assert pki.FindingCode.CERT_NOT_YET_VALID not in codes
    assert pki.FindingCode.CHAIN_INVALID not in codes
    assert {pki.FindingCode.CLOCK_BEHIND, pki.FindingCode.CLOCK_IMPLAUSIBLE} & codes
    # The chain is judged at the corrected time, and is fine.
    assert result.chain_now is not None and result.chain_now.is_valid
    assert result.chain_now.checked_at == DEVICE_NOW + timedelta(days=2)


def test_implausible_clock_without_an_offset_still_reclassifies(tmp_path: Path) -> None:
    material = material_renewed_yesterday(tmp_path)
    verdict, clock_findings = verdict_for(material, offset_s=None)
    assert [f.code for f in clock_findings] == [pki.FindingCode.CLOCK_IMPLAUSIBLE]
    result = check_device(material, DEVICE_NOW, pki.Policy(), clock=verdict)  # type: ignore[arg-type]
    assert pki.FindingCode.CERT_NOT_YET_VALID not in {f.code for f in result.findings}
    assert result.chain_now is not None and result.chain_now.is_valid


def test_a_genuinely_future_certificate_on_a_good_clock_stays_a_certificate_finding(
    tmp_path: Path,
) -> None:
    factory = PKIFactory(TRUE_NOW)
    root = factory.root("Future Root", not_before=TRUE_NOW - timedelta(days=10))
    leaf = factory.leaf(root, "gw-future", not_before=TRUE_NOW + timedelta(days=5))
    cert, key = leaf.write(tmp_path)
    material = read_material(write_bundle(tmp_path / "ca.pem", [root]), cert, key)
    state = ClockState(None, None, chrony(0.2), None, TRUE_NOW, "b", 1.0)
    # The clock is synced and right: nothing about it explains the certificate.
    verdict, _ = evaluate_clock(state, newest_not_before=TRUE_NOW - timedelta(days=10),
                                release_date=RELEASE)
    result = check_device(material, TRUE_NOW, pki.Policy(), clock=verdict)
    assert pki.FindingCode.CERT_NOT_YET_VALID in {f.code for f in result.findings}
