"""The agent's ARM .deb, installed in a Debian 12 root of its architecture, run under qemu.

Story: packaging/build_deb.py builds certmon-agent_<version>_<arch>.deb → a Debian 12
(bookworm, minbase + python3.11 + ca-certificates) root of that architecture, built by
debootstrap from deb.debian.org and cached under build/foreign-roots/ → `dpkg -i` in a
copy of it → `certmon-agent check` and `certmon-agent once` from that install, every
program under qemu-<cpu>-static (kit.foreignroot) → the session's real Mosquitto on
loopback (TLS, generated PKI, the documented device listener) → a real collector on
the host verifies the signed status and stores it. Each step prints the architecture
it ran under.

armhf (32-bit Debian armhf: ARMv7, as on a Raspberry Pi 2 and later): PyPI has an
armv7l wheel of cryptography but none of cffi (which cryptography needs) or psutil, so
those two are built from their sdists in a copy of the armhf root with Debian's
compiler, once, into build/wheelhouse-armhf; build_deb.py then finds them there
(docs/arm.md has the measured attempt and the commands).

Slow (minutes from cold): marker `arm`, deselected by pyproject's addopts; run it with
`make test-arm64` / `make test-armhf` (`pytest -m arm -k <arch> -s tests/test_arm.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet, missing
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from kit.broker import wait_until
from kit.foreignroot import ARCHES, RootSpec, build_wheels, copy_root, ensure_root, run_in_root

from certmon import __version__

pytestmark = [pytest.mark.arm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CERTMON_FOREIGN_ROOTS", REPO / "build" / "foreign-roots"))
# What `uname -m` says in the root, and the ELF e_machine of its python3.11.
UNAME = {"arm64": "aarch64", "armhf": "armv7l"}
ELF_MACHINE = {"arm64": (183, "EM_AARCH64"), "armhf": (40, "EM_ARM")}
ELF_CLASS = {"arm64": 64, "armhf": 32}
# armhf: built from sdists (no armv7l wheel on PyPI), with what Debian compiles them.
ARMHF_SDISTS = ("cffi>=2.0.0", "psutil>=5.9")
ARMHF_BUILD_BACKEND = ("setuptools>=77.0.3",)  # cffi's [build-system] floor; psutil's is 43
ARMHF_BUILD_PACKAGES = ("gcc", "libc6-dev", "python3.11-dev", "python3.11-venv",
                        "libffi-dev", "pkg-config")


@dataclass(frozen=True, slots=True)
class Installed:
    """certmon-agent installed with dpkg in a throw-away copy of an `arch` root."""

    arch: str
    root: Path
    deb: Path

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run_in_root(self.root, self.arch, list(argv), timeout=timeout)


def need_tools(arch: str) -> None:
    if os.geteuid() != 0:
        missing("the foreign root needs root (debootstrap, chroot, dpkg in the root)")
    for tool in ("debootstrap", "dpkg-deb", f"qemu-{ARCHES[arch]}-static"):
        if shutil.which(tool) is None:
            missing(f"{tool} not installed (apt-get install debootstrap qemu-user-static)")


def elf_header(path: Path) -> tuple[int, int]:
    """(class bits, e_machine) of an ELF file."""
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", path
    return (64 if head[4] == 2 else 32), int.from_bytes(head[18:20], "little")


def in_root(root: Path, link: Path) -> Path:
    """`link` (a path inside the root) with its absolute symlinks resolved in the root."""
    path = link
    for _ in range(10):
        if not path.is_symlink():
            return path
        target = Path(os.readlink(path))
        path = root / target.relative_to("/") if target.is_absolute() else path.parent / target
    raise AssertionError(f"symlink loop at {link}")


def timed(label: str, started: float) -> None:
    print(f"[{label}: {time.monotonic() - started:.1f} s]")


def armhf_wheelhouse(cached_root: Path) -> Path:
    """build/wheelhouse-armhf with cffi and psutil built for armv7l (once)."""
    wheelhouse = REPO / "build" / "wheelhouse-armhf"
    have = {p.name.split("-")[0].lower() for p in wheelhouse.glob("*linux_armv7l.whl")}
    if not {"cffi", "psutil"} <= have:
        started = time.monotonic()
        built = build_wheels(cached_root, "armhf", ARMHF_SDISTS, wheelhouse,
                             build_requirements=ARMHF_BUILD_BACKEND,
                             build_packages=ARMHF_BUILD_PACKAGES,
                             log=CACHE / "armhf-wheels.log")
        timed(f"armhf: built {', '.join(p.name for p in built)} under qemu-arm", started)
    return wheelhouse


@pytest.fixture(scope="module", params=sorted(UNAME))
def installed(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    arch = request.param
    need_tools(arch)
    tmp = tmp_path_factory.mktemp(f"arm-{arch}")
    started = time.monotonic()
    cached = ensure_root(CACHE, RootSpec(arch), CACHE / f"{arch}-debootstrap.log")
    timed(f"{arch}: Debian 12 root ready ({cached})", started)
    if arch == "armhf":
        armhf_wheelhouse(cached)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(REPO / "packaging" / "build_deb.py"), "--package", "agent",
         "--arch", arch, "--out", str(tmp / "dist")],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    deb = tmp / "dist" / f"certmon-agent_{__version__}_{arch}.deb"
    timed(f"{arch}: built {deb.name}", started)
    started = time.monotonic()
    root = copy_root(cached, tmp / "root")
    try:
        shutil.copy2(deb, root / "tmp" / deb.name)
        setup = Installed(arch, root, deb)
        dpkg = setup.run("/usr/bin/dpkg", "-i", f"/tmp/{deb.name}")
        assert dpkg.returncode == 0, dpkg.stdout + dpkg.stderr
        timed(f"{arch}: copied the root and ran dpkg -i under qemu", started)
        yield setup
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_install_runs_under_the_target_architecture(installed: Installed) -> None:
    arch = installed.arch
    field = subprocess.run(["dpkg-deb", "--field", str(installed.deb), "Architecture"],
                           capture_output=True, text=True, check=True)
    assert field.stdout.strip() == arch
    status = installed.run("/usr/bin/dpkg-query", "-W", "-f", "${Status} ${Architecture}",
                           "certmon-agent", "python3.11")
    assert status.stdout == f"install ok installed {arch}install ok installed {arch}", status
    # The postinst made the service user (useradd: a minbase root has no systemd-sysusers).
    assert installed.run("/usr/bin/getent", "passwd", "certmon").returncode == 0
    uname = installed.run("/bin/uname", "-m")
    assert uname.returncode == 0, uname.stderr
    python = in_root(installed.root, installed.root / "opt/certmon/agent/bin/python3")
    assert python == installed.root / "usr/bin/python3.11"
    bits, machine = elf_header(python)
    assert (bits, machine) == (ELF_CLASS[arch], ELF_MACHINE[arch][0])
    # The venv's own interpreter, with the bundled native code loaded.
    probe = installed.run(
        "/opt/certmon/agent/bin/python3", "-I", "-c",
        "import json, platform, sys, _cffi_backend, psutil, cryptography, agent\n"
        "from cryptography.hazmat.bindings import _rust\n"
        "print(json.dumps({'machine': platform.machine(), 'prefix': sys.prefix,"
        " 'cryptography': cryptography.__version__, 'psutil': psutil.__version__,"
        " 'rust': _rust.__file__, 'agent': agent.__file__,"
        " 'rss': psutil.Process().memory_info().rss}))")
    assert probe.returncode == 0, probe.stderr
    facts = json.loads(probe.stdout)
    assert facts["machine"] == UNAME[arch] == uname.stdout.strip()
    assert facts["prefix"] == "/opt/certmon/agent"
    assert facts["rust"].startswith("/opt/certmon/agent/lib/python3.11/site-packages/")
    rust_bits, rust_machine = elf_header(installed.root / facts["rust"].lstrip("/"))
    assert (rust_bits, rust_machine) == (bits, machine)
    assert facts["rss"] > 0
    print(f"{arch}: uname -m in the root → {uname.stdout.strip()}; /usr/bin/python3.11 is "
          f"ELF{bits} {ELF_MACHINE[arch][1]} ({machine}); platform.machine() → "
          f"{facts['machine']}; cryptography {facts['cryptography']} ({rust_machine}), "
          f"psutil {facts['psutil']}, all under qemu-{ARCHES[arch]}-static")


def test_check_runs_from_the_install(installed: Installed) -> None:
    """`certmon-agent check` on the root's own Debian CA bundle: exit 0 on a healthy
    Debian 12 (its expired roots are "stale CA in the bundle"), as on the host."""
    check = installed.run("/usr/bin/certmon-agent", "check", "--ca-bundle",
                          "/etc/ssl/certs/ca-certificates.crt")
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr
    assert "finding(s)" in check.stdout and "Traceback" not in check.stderr
    version = installed.run("/usr/bin/certmon-agent", "--version")
    assert version.stdout.strip() == f"certmon {__version__}"
    summary = next(line for line in check.stdout.splitlines() if "finding(s)" in line)
    print(f"{installed.arch}: certmon-agent check exit {check.returncode}: {summary.strip()}")


def write_device(installed: Installed, fleet: Fleet, device_id: str, tmp: Path) -> Path:
    """Device credentials and an agent.toml in the root's /etc/certmon (the conffile
    replaced, as an operator does)."""
    creds = fleet.device_credentials(device_id, tmp, days=300)
    etc = installed.root / "etc/certmon"
    shutil.copy2(creds.ca_bundle_path, etc / "ca.pem")
    shutil.copy2(creds.cert_path, etc / "client.pem")
    shutil.copy2(creds.key_path, etc / "client.key")
    (etc / "client.key").chmod(0o600)
    (etc / "agent.toml").write_text(f"""
[mqtt]
broker = "mqtts://127.0.0.1:{fleet.mtls_port}"
[tls]
ca_bundle = "/etc/certmon/ca.pem"
cert = "/etc/certmon/client.pem"
key = "/etc/certmon/client.key"
[agent]
state_dir = "/var/lib/certmon-agent"
""", encoding="utf-8")
    return creds.cert_path


def test_once_sends_a_status_the_collector_verifies_and_stores(
    installed: Installed, fleet_broker: Fleet, collector: Any, tmp_path: Path
) -> None:
    device_id = f"gw-{installed.arch}"
    cert_path = write_device(installed, fleet_broker, device_id, tmp_path)
    config = installed.run("/usr/bin/certmon-agent", "check-config", "--config",
                           "/etc/certmon/agent.toml")
    assert config.returncode == 0, config.stderr
    started = time.monotonic()
    once = installed.run("/usr/bin/certmon-agent", "once", "--config",
                         "/etc/certmon/agent.toml", "--timeout-s", "60", timeout=120)
    assert once.returncode == 0, once.stdout + once.stderr
    timed(f"{installed.arch}: certmon-agent once (acknowledged)", started)

    store = collector.store
    assert wait_until(lambda: (row := store.device(device_id)) is not None
                      and row.status_json is not None, 20), dict(collector.ingestor.rejected)
    row = store.device(device_id)
    leaf = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    assert row.client_sha256 == leaf.fingerprint(hashes.SHA256()).hex()
    status = json.loads(row.status_json)
    assert status["device_id"] == device_id and status["seq"] == row.seq
    assert status["agent"]["version"] == __version__
    assert status["agent"]["rss_bytes"] > 0  # psutil's native code ran on the target arch
    # The broker chain the agent's own TLS session saw: the fleet broker's server cert
    # (a chain entry names its certificate by a SHA-256 prefix).
    server_sha = fleet_broker.server.cert.fingerprint(hashes.SHA256()).hex()
    assert status["broker"]["port"] == fleet_broker.mtls_port
    assert server_sha.startswith(status["broker"]["chain"][0]["ref"])
    ours = [s for s in store.rejection_samples(limit=500) if f"/{device_id}/" in s.topic]
    assert ours == []
    print(f"{installed.arch}: collector verified and stored status seq={row.seq} of "
          f"{device_id} (signed under qemu-{ARCHES[installed.arch]}-static; worst finding "
          f"{row.worst_code or 'none'})")
