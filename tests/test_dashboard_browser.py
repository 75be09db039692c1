"""The dashboard in a real headless Chromium against a 50-device seeded store.

Chromium runs with `--dump-dom` (the DOM after the page's scripts ran, virtual time
letting every fetch finish) and `--enable-logging=stderr`, which prints each console
message as `INFO:CONSOLE…`. The page logs nothing on purpose, so any console line is
a failure (an uncaught error, a failed resource, a CSP violation); app.js also copies
errors into `#errors`, which must stay empty. A screenshot is kept in artifacts/.
`test_demo_dashboard` runs the demo fleet (bench/demo.py) and screenshots its
dashboard, broker scans and all: with CERTMON_DOCS_IMG=1 it also writes
docs/img/dashboard.png, the README's picture.
Chromium missing: skipped, or a failure when CI is set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import missing
from kit.seed import Pki, seed_fleet

from collector.store import open_store
from collector.web import TrustRequirementView, WebServer, start_web

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
                  "--v=0", "--virtual-time-budget=5000", "--window-size=1400,2900"]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing("chromium not found (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebServer, dict[str, list[str]]]]:
    # The real clock: the page computes "x min ago" from the browser's own time.
    now = datetime.now(UTC).replace(microsecond=0)
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('dash')}/fleet.db")
    seeded = seed_fleet(store, now, n=50, seed=1)
    pki = Pki.build(now, 1)
    srv = start_web(store, "127.0.0.1:0", trust_requirements=[
        TrustRequirementView("Fleet Root CA 2", pki.new_root.sha256, "required"),
        TrustRequirementView("Legacy Root CA", pki.old_root.sha256, "retiring")])
    yield srv, seeded
    srv.stop()
    store.close()


def run_chromium(binary: str, tmp: Path, url: str, *extra: str) -> tuple[str, str]:
    profile = tmp / f"profile-{len(list(tmp.iterdir()))}"
    out = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, out.stderr


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


class Dom(HTMLParser):
    """Just enough of the DOM: elements by id, rows and SVG rects with their data-*."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.text_by_id: dict[str, str] = {}
        self.rows: list[dict[str, str | None]] = []
        self.rects: list[dict[str, str | None]] = []
        self.groups: list[dict[str, str | None]] = []
        self._open_ids: list[tuple[str, int]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.by_id[str(a["id"])] = a
            self._open_ids.append((str(a["id"]), len(self.stack)))
            self.text_by_id[str(a["id"])] = ""
        if tag == "tr" and a.get("data-device"):
            self.rows.append(a)
        if tag == "rect" and a.get("data-group"):
            self.rects.append({**a, "week": self.groups[-1].get("data-week") if self.groups else None})
        if tag == "g" and a.get("data-week"):
            self.groups.append(a)
        if tag not in ("br", "meta", "link", "input", "img", "rect", "line"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("rect", "line"):
            return
        if self.stack:
            self.stack.pop()
        while self._open_ids and self._open_ids[-1][1] >= len(self.stack):
            self._open_ids.pop()

    def handle_data(self, data: str) -> None:
        for ident, _ in self._open_ids:
            self.text_by_id[ident] += data


def test_dashboard_renders_without_errors(chromium: str, dashboard: tuple[WebServer, dict[str, list[str]]],
                                          tmp_path: Path) -> None:
    srv, seeded = dashboard
    html, stderr = run_chromium(chromium, tmp_path, srv.url + "/", "--dump-dom")
    assert console_lines(stderr) == [], "\n".join(console_lines(stderr))
    dom = Dom(html)
    assert "hidden" in dom.by_id["errors"], dom.text_by_id.get("errors")
    assert dom.text_by_id["errors"].strip() == ""
    assert dom.text_by_id["updated"].startswith("updated ")
    # The at-risk table (default filter) lists every seeded critical device, first.
    states = {str(r["data-device"]): r["data-state"] for r in dom.rows}
    for dev in seeded["critical"]:
        assert states.get(dev) == "critical", dev
    assert [r["data-state"] for r in dom.rows[:len(seeded["critical"])]] == \
        ["critical"] * len(seeded["critical"])
    assert not set(seeded["ok"]) & set(states)
    # The chart: critical client certs sit in the expired bar or the next two weeks.
    client = [r for r in dom.rects if r["data-group"] == "client"]
    expired = sum(int(str(r["data-count"])) for r in client if r["week"] == "expired")
    assert expired >= 1
    weeks = [str(g["data-week"]) for g in dom.groups]
    soon = {"expired", *weeks[1:3]}
    assert sum(int(str(r["data-count"])) for r in client if r["week"] in soon) >= len(seeded["critical"])
    # Tiles, readiness, brokers and alerts rendered from the API.
    tiles = dom.text_by_id["tiles"]
    assert f"{len(seeded['critical'])}Critical" in re.sub(r"\s+", "", tiles)
    assert "Fleet Root CA 2" in dom.text_by_id["req-table"]
    assert "differs from scan" in dom.text_by_id["seen-table"]
    assert seeded["critical"][0] in dom.text_by_id["alerts-active"]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    _, stderr = run_chromium(chromium, tmp_path, srv.url + "/", f"--screenshot={shot}")
    assert console_lines(stderr) == []
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_device_page_opens(chromium: str, dashboard: tuple[WebServer, dict[str, list[str]]],
                           tmp_path: Path) -> None:
    srv, seeded = dashboard
    dev = seeded["critical"][0]
    url = f"{srv.url}/#/device/{dev}"
    html, stderr = run_chromium(chromium, tmp_path, url, "--dump-dom")
    assert console_lines(stderr) == [], "\n".join(console_lines(stderr))
    dom = Dom(html)
    assert "hidden" in dom.by_id["overview"] and "hidden" not in dom.by_id["device-view"]
    text = dom.text_by_id["device"]
    assert dev in dom.text_by_id["device-title"] and "critical" in dom.text_by_id["device-title"]
    for expected in ("Certificates", f"CN={dev}", "Fleet Devices CA 1", "cert_expiry",
                     "status_change", "Full verified status"):
        assert expected in text, expected
    assert dom.text_by_id["errors"].strip() == ""
    shot = ARTIFACTS / "device.png"
    ARTIFACTS.mkdir(exist_ok=True)
    run_chromium(chromium, tmp_path, url, f"--screenshot={shot}")
    print(f"screenshot: {shot}")


def test_unknown_device_page_says_so(chromium: str, dashboard: tuple[WebServer, dict[str, list[str]]],
                                     tmp_path: Path) -> None:
    srv, _ = dashboard
    html, stderr = run_chromium(chromium, tmp_path, f"{srv.url}/#/device/nope", "--dump-dom")
    # A 404 from fetch() is logged by Chromium as a failed resource; that one is expected.
    others = [x for x in console_lines(stderr) if "404" not in x]
    assert others == []
    assert "Unknown device" in Dom(html).text_by_id["device"]


@pytest.mark.slow
def test_demo_dashboard(chromium: str, tmp_path: Path) -> None:
    """The demo's dashboard as a visitor sees it: the broker section gives each scanned
    endpoint's verdict (the one whose intermediate expires in 10 days: a warning) and
    the devices' view of the broker against the scan; the gateway that went dark leads
    with being offline. The demo runs as `make demo` runs it (tests never import bench/)."""
    demo = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "demo.py"), "--duration", "120",
         "--workdir", str(tmp_path / "demo"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert demo.stdout is not None
    try:
        lines: list[str] = []
        for line in demo.stdout:  # the overview is printed once the fleet has reported
            lines.append(line)
            if line.startswith("dashboard:"):
                url = line.split()[1]
                break
        else:
            pytest.fail("".join(lines))
        html, stderr = run_chromium(chromium, tmp_path, url, "--dump-dom")
        assert console_lines(stderr) == [], "\n".join(console_lines(stderr))
        dom = Dom(html)
        assert dom.text_by_id["errors"].strip() == ""
        scans = dom.text_by_id["scans-table"]
        assert re.search(r"warning\s*INTERMEDIATE_EXPIR", scans), scans
        assert "CLIENT_CERT_REQUIRED" in scans, scans  # the device listener: ok
        # ... and so not a failing scan: only the expiring intermediate is a problem.
        assert "0/2Scansfailing" in re.sub(r"\s+", "", dom.text_by_id["tiles"])
        assert "same as scan" in dom.text_by_id["seen-table"]
        states = {str(r["data-device"]): r for r in dom.rows}
        assert states["gw-0601"]["data-state"] == "offline"
        assert "DEVICE_OFFLINE" in dom.text_by_id["devices-table"]
        shot = ARTIFACTS / "demo-dashboard.png"
        ARTIFACTS.mkdir(exist_ok=True)
        _, stderr = run_chromium(chromium, tmp_path, url, f"--screenshot={shot}")
        assert console_lines(stderr) == []
        if os.environ.get("CERTMON_DOCS_IMG") == "1":
            shutil.copyfile(shot, REPO / "docs" / "img" / "dashboard.png")
        print(f"screenshot: {shot}")
    finally:
        demo.terminate()  # the demo stops everything it started on SIGTERM
        rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, rest
