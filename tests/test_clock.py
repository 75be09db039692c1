"""Clock readers against committed samples, the clock rules, and SNTP over real UDP."""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import clocksync as cs
from certmon.clock import (
    UNKNOWN_BOOT_ID,
    Clock,
    FixedClock,
    OffsetClock,
    SystemClock,
    boot_id,
    utc_now,
)
from certmon.pki import FindingCode, Severity

DATA = Path(__file__).parent / "data" / "clock"
TRUE_NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
RELEASE = datetime(2026, 11, 1, tzinfo=UTC)
LP64_LE = ctypes.sizeof(ctypes.c_long) == 8 and sys.byteorder == "little"
lp64_only = pytest.mark.skipif(not LP64_LE, reason="samples are LP64 little-endian")


def text(name: str) -> str:
    return (DATA / name).read_text()


# ---------------------------------------------------------------- certmon.clock

def test_system_clock_is_aware_utc() -> None:
    assert SystemClock().now().utcoffset() == timedelta(0)
    assert utc_now().tzinfo is UTC


def test_offset_clock_two_days_behind() -> None:
    base = FixedClock(TRUE_NOW, monotonic_at_s=42.0)
    device = OffsetClock(base, timedelta(days=-2))
    assert device.now() == TRUE_NOW - timedelta(days=2)
    assert device.monotonic() == 42.0
    base.advance(60)
    assert device.now() == TRUE_NOW - timedelta(days=2) + timedelta(seconds=60)
    assert isinstance(device, Clock)


def test_fixed_clock_refuses_naive() -> None:
    with pytest.raises(ValueError, match="naive"):
        FixedClock(datetime(2026, 1, 1))


def test_boot_id(tmp_path: Path) -> None:
    path = tmp_path / "sys" / "kernel" / "random" / "boot_id"
    assert boot_id(tmp_path) == UNKNOWN_BOOT_ID
    path.parent.mkdir(parents=True)
    path.write_text("5F3C2B7E-9a41-4c0e-8d2f-1b6a7c9e0d13\n")
    assert boot_id(tmp_path) == "5f3c2b7e-9a41-4c0e-8d2f-1b6a7c9e0d13"
    path.write_text("garbage\n")
    assert boot_id(tmp_path) == UNKNOWN_BOOT_ID


# ---------------------------------------------------------------- adjtimex

@lp64_only
def test_timex_layout_matches_glibc_lp64() -> None:
    # Offsets from glibc's <bits/timex.h> on x86_64/aarch64: an independent check that
    # the ctypes definition is not merely self-consistent.
    assert cs.TIMEX_SIZE == 208
    offsets = {"offset": 8, "maxerror": 24, "esterror": 32, "status": 40, "time": 72,
               "tick": 88, "shift": 112, "tai": 160}
    for name, offset in offsets.items():
        assert getattr(cs._Timex, name).offset == offset


@lp64_only
def test_parse_captured_unsynced() -> None:
    raw = (DATA / "timex-unsynced-captured.bin").read_bytes()
    assert struct.unpack_from("<q", raw, 24)[0] == 16_000_000  # maxerror, read raw
    k = cs.parse_timex(raw, 5)
    assert not k.is_synced
    assert k.state == "TIME_ERROR"
    assert k.maxerror_us == 16_000_000
    assert k.flags == ("STA_UNSYNC",)


@lp64_only
def test_parse_synced_chrony() -> None:
    k = cs.parse_timex((DATA / "timex-synced-chrony.bin").read_bytes(), 0)
    assert k.is_synced and k.state == "TIME_OK"
    assert k.flags == ("STA_PLL", "STA_NANO")
    assert (k.maxerror_us, k.esterror_us, k.offset_ns, k.tai_s) == (25_000, 120, -1234, 37)
    assert k.freq_ppm == pytest.approx(-1234567 / 65536)


@lp64_only
def test_unsync_flag_ignored_like_systemd() -> None:
    # systemd's ntp_synced() looks at maxerror only: chrony without rtcsync leaves
    # STA_UNSYNC set (and adjtimex returns TIME_ERROR) on a well-synced clock.
    k = cs.parse_timex((DATA / "timex-unsync-flag-small-maxerror.bin").read_bytes(), 5)
    assert "STA_UNSYNC" in k.flags and k.state == "TIME_ERROR"
    assert k.is_synced


def test_maxerror_boundary_is_16s() -> None:
    def at(maxerror_us: int) -> bool:
        tx = cs._Timex(maxerror=maxerror_us)
        return cs.parse_timex(bytes(tx), 0).is_synced

    assert at(15_999_999) and not at(16_000_000)


def test_parse_timex_rejects_wrong_size() -> None:
    with pytest.raises(ValueError, match="bytes"):
        cs.parse_timex(b"\0" * 10, 0)


@pytest.mark.skipif(sys.platform != "linux", reason="adjtimex is Linux")
def test_read_adjtimex_smoke() -> None:
    k = cs.read_adjtimex()
    assert k is not None  # works unprivileged; synced or not depends on the machine
    assert k.state.startswith("TIME_")


# ---------------------------------------------------------------- timesyncd

@pytest.mark.parametrize(("span", "seconds"), [
    ("-1.234ms", -1.234e-3), ("+2d 12.500ms", 172800.0125), ("34min 8s", 2048.0),
    ("0", 0.0), ("27us", 27e-6), ("1month 2w", 2_629_800 + 1_209_600), ("5s", 5.0),
    ("1y", 31_557_600.0), ("bogus", None), ("", None), ("3s junk", None),
])
def test_parse_timespan(span: str, seconds: float | None) -> None:
    got = cs.parse_timespan_s(span)
    assert got == (None if seconds is None else pytest.approx(seconds))


def test_timesyncd_synced() -> None:
    ts = cs.timesyncd_from_outputs(text("timedatectl-show-synced.txt"),
                                   text("timesync-status-synced.txt"))
    assert ts is not None
    assert ts.ntp_synchronized is True and ts.ntp_enabled is True
    assert (ts.server_address, ts.server_name) == ("192.0.2.10", "0.debian.pool.ntp.org")
    assert (ts.leap, ts.stratum, ts.packet_count) == ("normal", 2, 57)
    assert ts.offset_s == pytest.approx(-1.234e-3)
    assert ts.delay_s == pytest.approx(9.368e-3)


def test_timesyncd_behind_and_no_packets() -> None:
    behind = cs.timesyncd_from_outputs(text("timedatectl-show-unsynced.txt"),
                                       text("timesync-status-behind-2d.txt"))
    assert behind is not None and behind.ntp_synchronized is False
    assert behind.offset_s == pytest.approx(172800.0125)
    empty = cs.timesyncd_from_outputs(None, text("timesync-status-no-packets.txt"))
    assert empty is not None
    assert (empty.server_address, empty.offset_s, empty.packet_count) == (None, None, 0)
    assert empty.ntp_synchronized is None
    assert cs.timesyncd_from_outputs(None, None) is None


# ---------------------------------------------------------------- chrony

def test_chrony_normal() -> None:
    c = cs.parse_chrony_tracking(text("chronyc-tracking-normal.csv"))
    assert c is not None and c.is_synced
    assert (c.ref_id, c.ref_name, c.stratum, c.leap_status) == (
        "C0000201", "192.0.2.1", 3, "Normal")
    assert c.offset_s == pytest.approx(-12.345e-6)
    assert c.ref_at is not None and c.ref_at.tzinfo is UTC
    assert c.update_interval_s == 64.5


@pytest.mark.parametrize("name", ["chronyc-tracking-unsynchronised.csv",
                                  "chronyc-tracking-local.csv"])
def test_chrony_not_synced(name: str) -> None:
    c = cs.parse_chrony_tracking(text(name))
    assert c is not None and not c.is_synced


def test_chrony_garbage() -> None:
    assert cs.parse_chrony_tracking("506 Cannot talk to daemon\n") is None
    assert cs.parse_chrony_tracking("a,b,c,d,e,f,g,h,i,j,k,l,m,n\n") is None


# ---------------------------------------------------------------- evaluation

def state(**kw: object) -> cs.ClockState:
    base = cs.ClockState(kernel=None, timesyncd=None, chrony=None, sntp=None,
                         wall_now=TRUE_NOW, boot_id="b", monotonic_s=1.0)
    return replace(base, **kw)  # type: ignore[arg-type]


def kernel(synced: bool) -> cs.KernelClock:
    return cs.parse_timex(bytes(cs._Timex(maxerror=25_000 if synced else 16_000_000)),
                          0 if synced else 5)


def codes(findings: Sequence[object]) -> list[tuple[FindingCode, Severity]]:
    return [(f.code, f.severity) for f in findings]  # type: ignore[attr-defined]


def test_all_good() -> None:
    chrony = cs.parse_chrony_tracking(text("chronyc-tracking-normal.csv"))
    v, findings = cs.evaluate_clock(state(kernel=kernel(True), chrony=chrony),
                                    newest_not_before=TRUE_NOW - timedelta(days=3),
                                    release_date=RELEASE)
    assert findings == []
    assert v.synced is True and v.plausible and v.source is cs.ClockSource.CHRONY
    assert v.maxerror_s == pytest.approx(0.025)
    assert v.to_json() == {
        "synced": True, "source": "chrony", "offset_s": pytest.approx(-12.345e-6),
        "maxerror_s": 0.025, "plausible": True, "wall_at": "2026-11-26T12:00:00.000Z",
        "boot_id": "b", "monotonic_s": 1.0}


def test_device_two_days_behind() -> None:
    """The demo fleet's device: wall clock 2 days behind, chrony measuring +172800 s."""
    device = OffsetClock(FixedClock(TRUE_NOW), timedelta(days=-2))
    now = device.now()
    chrony = cs.parse_chrony_tracking(text("chronyc-tracking-behind-2d.csv"))
    cert_not_before = now + timedelta(days=1)  # issued yesterday, true time
    v, findings = cs.evaluate_clock(state(kernel=kernel(True), chrony=chrony, wall_now=now),
                                    newest_not_before=cert_not_before, release_date=RELEASE)
    assert (FindingCode.CLOCK_BEHIND, Severity.CRITICAL) in codes(findings)
    assert v.offset_s == pytest.approx(172800.0, abs=1e-3)
    assert "behind" in next(f.message for f in findings if f.code is FindingCode.CLOCK_BEHIND)
    assert cs.explains_not_yet_valid(v, cert_not_before, now)
    # A certificate valid only from 3 days after the device's time is not explained.
    v_ok = replace(v, plausible=True)
    assert not cs.explains_not_yet_valid(v_ok, now + timedelta(days=3), now)


def test_clock_in_1970_is_implausible() -> None:
    epoch = datetime(1970, 1, 1, 0, 0, 5, tzinfo=UTC)
    v, findings = cs.evaluate_clock(state(kernel=kernel(False), wall_now=epoch),
                                    newest_not_before=None, release_date=RELEASE)
    assert not v.plausible and v.synced is False
    assert codes(findings) == [(FindingCode.CLOCK_IMPLAUSIBLE, Severity.CRITICAL),
                               (FindingCode.CLOCK_UNSYNCED, Severity.WARNING)]
    assert "1970-01-01T00:00:05.000Z" in findings[0].message
    assert "maxerror 16.000 s" in findings[1].message
    assert cs.explains_not_yet_valid(v, RELEASE, epoch)


def test_unsynced_kernel_but_chrony_synced_is_fine() -> None:
    chrony = cs.parse_chrony_tracking(text("chronyc-tracking-normal.csv"))
    v, findings = cs.evaluate_clock(state(kernel=kernel(False), chrony=chrony),
                                    newest_not_before=None, release_date=RELEASE)
    assert v.synced is True and findings == []


def test_nothing_known() -> None:
    v, findings = cs.evaluate_clock(state(), newest_not_before=None, release_date=RELEASE)
    assert (v.synced, v.source, v.offset_s, v.maxerror_s) == (None, None, None, None)
    assert findings == []
    # No evidence about the clock: a future certificate stays a certificate problem.
    assert not cs.explains_not_yet_valid(v, TRUE_NOW + timedelta(hours=1), TRUE_NOW)


def test_synced_clock_and_future_cert_is_a_cert_problem() -> None:
    v, findings = cs.evaluate_clock(state(kernel=kernel(True)),
                                    newest_not_before=TRUE_NOW + timedelta(days=1),
                                    release_date=RELEASE)
    assert v.plausible and findings == []
    assert not cs.explains_not_yet_valid(v, TRUE_NOW + timedelta(days=1), TRUE_NOW)


def test_unsynced_clock_and_future_cert_is_a_clock_problem() -> None:
    nb = TRUE_NOW + timedelta(days=1)
    v, findings = cs.evaluate_clock(state(kernel=kernel(False)), newest_not_before=nb,
                                    release_date=RELEASE)
    assert not v.plausible
    assert FindingCode.CLOCK_IMPLAUSIBLE in [f.code for f in findings]
    assert cs.explains_not_yet_valid(v, nb, TRUE_NOW)


@pytest.mark.parametrize(("offset_s", "expected"), [
    (-400.0, (FindingCode.CLOCK_AHEAD, Severity.WARNING)),
    (-7200.0, (FindingCode.CLOCK_AHEAD, Severity.CRITICAL)),
    (400.0, (FindingCode.CLOCK_BEHIND, Severity.WARNING)),
    (200.0, None),
])
def test_sntp_offset_thresholds(offset_s: float, expected: object) -> None:
    sample = cs.SntpSample("ntp", offset_s, 0.01, 2, TRUE_NOW)
    v, findings = cs.evaluate_clock(state(kernel=kernel(True), sntp=sample),
                                    newest_not_before=None, release_date=RELEASE)
    assert v.source is cs.ClockSource.SNTP
    assert codes(findings) == ([] if expected is None else [expected])


def test_timesyncd_offset_counts_only_while_unsynchronised() -> None:
    # Right after timesyncd steps the clock at boot it still shows the pre-step "+2d".
    behind = cs.timesyncd_from_outputs(text("timedatectl-show-unsynced.txt"),
                                       text("timesync-status-behind-2d.txt"))
    assert behind is not None
    stepped = replace(behind, ntp_synchronized=True)
    _, after_step = cs.evaluate_clock(state(timesyncd=stepped), newest_not_before=None,
                                      release_date=RELEASE)
    assert after_step == []
    v, findings = cs.evaluate_clock(state(timesyncd=behind), newest_not_before=None,
                                    release_date=RELEASE)
    assert v.source is cs.ClockSource.TIMESYNCD
    assert codes(findings) == [(FindingCode.CLOCK_UNSYNCED, Severity.WARNING),
                               (FindingCode.CLOCK_BEHIND, Severity.CRITICAL)]


@given(offset_s=st.floats(-1e6, 1e6), ahead_s=st.floats(1, 1e6))
def test_explains_iff_valid_at_corrected_time(offset_s: float, ahead_s: float) -> None:
    v = cs.ClockVerdict(synced=True, source=cs.ClockSource.SNTP, offset_s=offset_s,
                        maxerror_s=None, plausible=True, wall_at=TRUE_NOW, boot_id="b",
                        monotonic_s=0.0)
    nb = TRUE_NOW + timedelta(seconds=ahead_s)
    # Compared as timedeltas: both sides round to microseconds the same way.
    expected = timedelta(seconds=offset_s) >= timedelta(seconds=ahead_s)
    assert cs.explains_not_yet_valid(v, nb, TRUE_NOW) == expected
    assert not cs.explains_not_yet_valid(v, TRUE_NOW - timedelta(seconds=1), TRUE_NOW)


# ---------------------------------------------------------------- SNTP on loopback

@contextmanager
def sntp_server(shift_s: float, *, stratum: int = 2) -> Iterator[int]:
    """Answer one request with the real time shifted by `shift_s`, like a server whose
    clock is right while ours is `shift_s` behind."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5.0)

    def serve() -> None:
        try:
            data, peer = sock.recvfrom(512)
        except OSError:
            return
        t = cs.unix_to_ntp(utc_now().timestamp() + shift_s)
        reply = bytes([0x24, stratum, 6, 0xEC]) + bytes(20) + data[40:48] + t + t
        sock.sendto(reply, peer)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        thread.join()
        sock.close()


def test_sntp_loopback_measures_shift() -> None:
    with sntp_server(3600.0) as port:
        sample = cs.sntp_offset("127.0.0.1", port, timeout_s=5.0)
    assert sample is not None
    assert sample.offset_s == pytest.approx(3600.0, abs=0.5)
    assert 0 <= sample.delay_s < 0.5 and sample.stratum == 2


def test_sntp_loopback_kiss_of_death_rejected() -> None:
    with sntp_server(0.0, stratum=0) as port:
        assert cs.sntp_offset("127.0.0.1", port, timeout_s=5.0) is None


def test_sntp_reply_validation() -> None:
    nonce = b"\x01" * 8
    t = cs.unix_to_ntp(TRUE_NOW.timestamp() + 10)
    good = bytes([0x24, 2]) + bytes(22) + nonce + t + t
    kw = {"server": "s", "t1": TRUE_NOW, "t4": TRUE_NOW}
    sample = cs.parse_sntp_reply(good, nonce, **kw)  # type: ignore[arg-type]
    assert sample is not None and sample.offset_s == pytest.approx(10.0, abs=1e-6)
    for bad in (good[:47], good[:24] + b"\x02" * 8 + good[32:],  # short, wrong origin
                bytes([0xE4]) + good[1:],  # leap 3: server unsynchronised
                bytes([0x23]) + good[1:]):  # mode 3: not a server reply
        assert cs.parse_sntp_reply(bad, nonce, **kw) is None  # type: ignore[arg-type]


def test_ntp_timestamp_roundtrip_and_era() -> None:
    for unix_s in (0.0, 1_795_737_600.25, 2_085_978_496.5):  # the last is after 2036
        assert cs.ntp_to_unix_s(cs.unix_to_ntp(unix_s)) == pytest.approx(unix_s, abs=1e-6)


# ---------------------------------------------------------------- I/O shell

def test_collect_with_injected_runner(tmp_path: Path) -> None:
    outputs = {
        ("chronyc", "-n", "-c", "tracking"): text("chronyc-tracking-behind-2d.csv"),
        ("timedatectl", "show"): text("timedatectl-show-unsynced.txt"),
        ("timedatectl", "timesync-status"): text("timesync-status-behind-2d.txt"),
    }
    calls: list[tuple[str, ...]] = []

    def runner(argv: Sequence[str]) -> str | None:
        calls.append(tuple(argv))
        return outputs.get(tuple(argv))

    device = OffsetClock(FixedClock(TRUE_NOW, monotonic_at_s=7.0), timedelta(days=-2))
    s = cs.collect_clock_state(runner=runner, proc_root=tmp_path, clock=device,
                               adjtimex=lambda: None)
    assert set(calls) == set(outputs)
    assert s.wall_now == TRUE_NOW - timedelta(days=2) and s.monotonic_s == 7.0
    assert s.boot_id == UNKNOWN_BOOT_ID and s.kernel is None and s.sntp is None
    assert s.chrony is not None and s.chrony.offset_s == pytest.approx(172800.0, abs=1e-3)
    assert s.timesyncd is not None and s.timesyncd.ntp_synchronized is False


def test_collect_with_nothing_installed(tmp_path: Path) -> None:
    s = cs.collect_clock_state(runner=lambda argv: None, proc_root=tmp_path,
                               clock=FixedClock(TRUE_NOW), adjtimex=lambda: None)
    assert (s.kernel, s.timesyncd, s.chrony, s.sntp) == (None, None, None, None)


def test_collect_with_sntp(tmp_path: Path) -> None:
    with sntp_server(-120.0) as port:
        s = cs.collect_clock_state(runner=lambda argv: None, proc_root=tmp_path,
                                   clock=SystemClock(), sntp_servers=("127.0.0.1",),
                                   sntp_port=port, sntp_timeout_s=5.0)
    assert s.sntp is not None and s.sntp.offset_s == pytest.approx(-120.0, abs=0.5)


def test_run_command_missing_binary() -> None:
    assert cs.run_command(["/nonexistent/certmon-no-such-tool"]) is None
    assert cs.run_command([sys.executable, "-c", "print('hi')"]) == "hi\n"
    assert cs.run_command([sys.executable, "-c", "raise SystemExit(1)"]) is None
