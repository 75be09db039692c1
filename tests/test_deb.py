"""The .deb packages: built by packaging/build_deb.py, inspected, installed and purged.

Install approach: the host's own dpkg (`dpkg -i`, then `dpkg --purge`), only as root and
only when certmon-agent is not already installed by someone else. A debootstrap chroot
was the alternative; it costs minutes and a mirror, while the package touches only
/opt/certmon, /usr/bin/certmon-agent, /etc/certmon, unit/sysusers/tmpfiles files and
the `certmon` system user (which stays after purge, as Debian policy wants). The build
needs PyPI for the dependency wheels (pip's cache makes reruns fast); the arm64 package
is built and its native code checked for AArch64 here, and executed under qemu in a
Debian 12 arm64 root by `make test-arm64` (tests/test_arm.py, docs/arm.md).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from certmon import __version__

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ELF_MACHINE = {"amd64": 62, "arm64": 183}  # e_machine: EM_X86_64, EM_AARCH64


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} not installed (Debian: apt-get install dpkg)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def build(tmp: Path, arch: str) -> Path:
    need("dpkg-deb")
    done = subprocess.run(
        [sys.executable, str(REPO / "packaging" / "build_deb.py"), "--package", "agent",
         "--arch", arch, "--out", str(tmp / "dist"), "--wheelhouse", str(tmp / "wheels")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    deb = tmp / "dist" / f"certmon-agent_{__version__}_{arch}.deb"
    assert deb.is_file(), done.stdout
    return deb


@pytest.fixture(scope="module")
def amd64_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.uname().machine != "x86_64":
        pytest.skip("the install test builds for the host, amd64")
    return build(tmp_path_factory.mktemp("deb-amd64"), "amd64")


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), field], capture_output=True,
                          text=True, check=True).stdout.strip()


def elf_machines(root: Path) -> set[int]:
    machines = set()
    for path in root.rglob("*.so*"):
        if path.is_file() and not path.is_symlink():
            head = path.read_bytes()[:20]
            if head[:4] == b"\x7fELF":
                machines.add(int.from_bytes(head[18:20], "little"))
    return machines


def test_agent_deb_control_and_layout(amd64_deb: Path, tmp_path: Path) -> None:
    assert deb_field(amd64_deb, "Package") == "certmon-agent"
    assert deb_field(amd64_deb, "Version") == __version__
    assert deb_field(amd64_deb, "Architecture") == "amd64"
    assert "python3.11" in deb_field(amd64_deb, "Depends")
    info = subprocess.run(["dpkg-deb", "--info", str(amd64_deb), "conffiles"],
                          capture_output=True, text=True, check=True).stdout
    assert info.split() == ["/etc/certmon/agent.toml"]
    listing = subprocess.run(["dpkg-deb", "--contents", str(amd64_deb)], capture_output=True,
                             text=True, check=True).stdout
    for needed in ("./lib/systemd/system/certmon-agent.service",
                   "./usr/lib/sysusers.d/certmon-agent.conf",
                   "./usr/lib/tmpfiles.d/certmon-agent.conf",
                   "./opt/certmon/agent/pyvenv.cfg",
                   "./usr/bin/certmon-agent -> /opt/certmon/agent/bin/certmon-agent",
                   "./opt/certmon/agent/bin/python3 -> /usr/bin/python3.11"):
        assert needed in listing, needed
    assert "collector" not in deb_field(amd64_deb, "Description")
    # The agent stays small: no collector-only distributions (their code is in the one
    # certmon wheel, e.g. collector/alerts/sinks/apprise.py, but not their libraries).
    for library in ("psycopg", "apprise", "prometheus_client", "waitress"):
        assert f"/site-packages/{library}/" not in listing, library
    root = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(amd64_deb), str(root)], check=True)
    shipped = root / "lib" / "systemd" / "system" / "certmon-agent.service"
    assert shipped.read_bytes() == (REPO / "systemd" / "certmon-agent.service").read_bytes()
    assert (root / "etc/certmon/agent.toml").read_bytes() == \
        (REPO / "packaging/agent.example.toml").read_bytes()
    assert "certmon-collector" not in (root / "usr/lib/tmpfiles.d/certmon-agent.conf").read_text()
    assert elf_machines(root) == {ELF_MACHINE["amd64"]}
    # One certmon wheel for both packages: it carries every role package, so the
    # collector's certmon-scan (scanner.cli) has its code, as a console script of it.
    site = root / "opt/certmon/agent/lib/python3.11/site-packages"
    for package in ("certmon", "agent", "collector", "scanner"):
        assert (site / package / "py.typed").is_file(), package


def test_every_packaged_command_is_built_from_shipped_sources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each role's console scripts name a module of a package the build copies, and
    match pyproject's [project.scripts] (the installed commands)."""
    spec = importlib.util.spec_from_file_location("build_deb", REPO / "packaging/build_deb.py")
    assert spec is not None and spec.loader is not None
    build_deb = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "build_deb", build_deb)  # its dataclasses look it up
    spec.loader.exec_module(build_deb)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    packaged = {c: t for role in build_deb.ROLES.values() for c, t in role.scripts.items()}
    assert packaged == scripts
    for target in packaged.values():
        module = target.split(":")[0]
        assert module.split(".")[0] in build_deb.SOURCE_FILES, target
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), target
    assert build_deb.ROLES["collector"].scripts["certmon-scan"] == "scanner.cli:main"


def test_agent_deb_installs_runs_and_purges(amd64_deb: Path) -> None:
    need("dpkg")
    if os.geteuid() != 0:
        pytest.skip("dpkg -i needs root")
    if subprocess.run(["dpkg", "-s", "certmon-agent"], capture_output=True).returncode == 0:
        pytest.skip("certmon-agent is already installed on this machine; not touching it")
    if not Path("/usr/bin/python3.11").exists():
        pytest.skip("Depends: python3.11 is not installed (apt-get install python3.11)")
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    if not Path(bundle).is_file():
        pytest.skip(f"{bundle} missing (apt-get install ca-certificates)")
    installed = subprocess.run(["dpkg", "-i", str(amd64_deb)], capture_output=True, text=True,
                               timeout=120)
    try:
        assert installed.returncode == 0, installed.stdout + installed.stderr
        check = subprocess.run(["/usr/bin/certmon-agent", "check", "--ca-bundle", bundle],
                               capture_output=True, text=True, timeout=60)
        # Nagios codes: the system bundle may hold expired CAs (CRITICAL) — any verdict
        # is fine, a crash (1 with a traceback, or 3) is not.
        assert check.returncode in (0, 1, 2), check.stderr
        assert "finding(s)" in check.stdout and "Traceback" not in check.stderr
        probe = subprocess.run(
            ["/opt/certmon/agent/bin/python3", "-I", "-c",
             "import sys, agent, cryptography; print(sys.prefix, sys.base_prefix, agent.__file__)"],
            capture_output=True, text=True, check=True, timeout=60)
        prefix, base, module = probe.stdout.split()
        assert prefix == "/opt/certmon/agent" and base == "/usr"
        assert module.startswith("/opt/certmon/agent/lib/python3.11/site-packages/")
        assert subprocess.run(["/usr/bin/certmon-agent", "--version"], capture_output=True,
                              text=True).stdout.strip() == f"certmon {__version__}"
        # The shipped example is not a working config: check-config says so with 78.
        config = subprocess.run(["/usr/bin/certmon-agent", "check-config", "--config",
                                 "/etc/certmon/agent.toml"], capture_output=True, text=True)
        assert config.returncode == 78, config.stderr
        assert subprocess.run(["getent", "passwd", "certmon"]).returncode == 0
        verify = subprocess.run(["dpkg", "--verify", "certmon-agent"], capture_output=True,
                                text=True)
        assert verify.returncode == 0 and not verify.stdout, verify.stdout
    finally:
        purged = subprocess.run(["dpkg", "--purge", "certmon-agent"], capture_output=True,
                                text=True, timeout=120)
    assert purged.returncode == 0, purged.stderr
    for gone in ("/opt/certmon/agent", "/usr/bin/certmon-agent", "/etc/certmon/agent.toml",
                 "/lib/systemd/system/certmon-agent.service", "/var/lib/certmon-agent",
                 "/etc/systemd/system/multi-user.target.wants/certmon-agent.service"):
        assert not os.path.lexists(gone), gone
    assert subprocess.run(["dpkg", "-s", "certmon-agent"], capture_output=True).returncode != 0


def test_arm64_agent_deb_carries_aarch64_code(tmp_path: Path) -> None:
    """Built with aarch64 wheels from PyPI; inspected only (no aarch64 interpreter here)."""
    deb = build(tmp_path, "arm64")
    assert deb_field(deb, "Architecture") == "arm64"
    root = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    site = root / "opt/certmon/agent/lib/python3.11/site-packages"
    assert (site / "cryptography").is_dir() and (site / "agent" / "cli.py").is_file()
    assert elf_machines(root) == {ELF_MACHINE["arm64"]}
