"""Build certmon's Debian packages with `dpkg-deb --build`: certmon-agent and certmon-collector.

Owns the package layout, the control files and the maintainer scripts. Each package is
self-contained under /opt/certmon/<role>/: a virtual environment whose bin/python is a
symlink to Debian's /usr/bin/python3.11 (Depends: python3.11) and whose site-packages
holds certmon and every dependency as prebuilt wheels for the *target* architecture,
fetched from PyPI (the only network access) with `pip --platform … --only-binary=:all:`.
Nothing runs pip on the device: every file is listed in the package, so `dpkg -S`,
`dpkg --verify` and `dpkg --purge` see all of them.

Must not: touch the source tree (the project is built from a copy, as several people
work in the tree at once), install anything on the build machine, or need network
beyond PyPI. Usage:

    python packaging/build_deb.py                     # both packages, host arch, into dist/
    python packaging/build_deb.py --arch arm64 --package agent --out /tmp/debs
    python packaging/build_deb.py --no-download       # offline: only build/wheelhouse-<arch>
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON_VERSION = "3.11"  # Debian 12's python3; the wheels' cp311 ABI is tied to it
TARGET_PYTHON = f"/usr/bin/python{PYTHON_VERSION}"
# Debian architecture → wheel platform machine. Debian 12 has glibc 2.36, so every
# manylinux tag up to 2_36 is acceptable there. armhf: PyPI lacks armv7l wheels of cffi
# and psutil; build them into the wheelhouse first (docs/arm.md), they are found there.
ARCHES = {"amd64": "x86_64", "arm64": "aarch64", "armhf": "armv7l"}
GLIBC_MAX_MINOR = 36
MAINTAINER = "certmon developers <certmon@example.invalid>"
SOURCE_FILES = ("pyproject.toml", "README.md", "certmon", "agent", "collector", "scanner")


@dataclass(frozen=True, slots=True)
class Role:
    """One binary package: what it installs and which console scripts it exposes."""

    name: str
    extra: str | None
    scripts: dict[str, str]  # command → "module:function"
    units: tuple[str, ...]
    config: str  # packaging/<config> installed as /etc/certmon/<role>.toml
    description: str


ROLES = {
    "agent": Role(
        name="certmon-agent", extra=None,
        scripts={"certmon-agent": "agent.cli:main"},
        units=("certmon-agent.service",),
        config="agent.example.toml",
        description="TLS certificate and clock reporting agent for IoT devices\n"
        " certmon-agent reports a device's client certificate, trust store, the broker\n"
        " chain it sees and its clock state to an MQTT broker, signed with the device key.",
    ),
    "collector": Role(
        name="certmon-collector", extra="collector",
        scripts={"certmon-collector": "collector.cli:main", "certmon-scan": "scanner.cli:main"},
        units=("certmon-collector.service", "certmon-scan.service", "certmon-scan.timer"),
        config="collector.example.toml",
        description="fleet TLS certificate monitoring collector and scanner\n"
        " certmon-collector verifies and stores the signed reports of certmon agents,\n"
        " raises alerts and serves a dashboard, a JSON API and Prometheus metrics.\n"
        " certmon-scan probes TLS endpoints (MQTT brokers) for their certificate chains.",
    ),
}


def project_version(repo: Path = REPO) -> str:
    """`__version__` from certmon/__init__.py, read as text (no import of the tree)."""
    text = (repo / "certmon" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise SystemExit("build_deb: no __version__ in certmon/__init__.py")
    return match.group(1)


def platform_args(arch: str) -> list[str]:
    """pip flags selecting CPython 3.11 wheels for a Debian 12 machine of `arch`.

    pip matches --platform literally (no "manylinux_2_28 implies 2_17" expansion), so
    every glibc level Debian 12 satisfies is listed."""
    machine = ARCHES[arch]
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MAX_MINOR, 16, -1)]
    tags += [f"manylinux2014_{machine}", f"linux_{machine}"]
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", PYTHON_VERSION]
    for abi in ("cp311", "abi3", "none"):
        args += ["--abi", abi]
    for tag in tags:
        args += ["--platform", tag]
    return args


def run(argv: Sequence[str | Path], **kwargs: object) -> None:
    print("+", " ".join(str(a) for a in argv), file=sys.stderr)
    subprocess.run([str(a) for a in argv], check=True, **kwargs)  # type: ignore[call-overload]


def build_project_wheel(work: Path) -> Path:
    """Build the certmon wheel from a copy of the sources (never in the shared tree)."""
    src = work / "src"
    src.mkdir()
    for name in SOURCE_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = work / "project-wheel"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, src])
    (wheel,) = out.glob("certmon-*.whl")
    return wheel


def fetch_wheels(project_wheel: Path, role: Role, arch: str, wheelhouse: Path,
                 *, download: bool) -> None:
    """Put every dependency wheel of `role` for `arch` into the wheelhouse (PyPI)."""
    if not download:
        if not any(wheelhouse.glob("*.whl")):
            raise SystemExit(f"build_deb: --no-download but {wheelhouse} has no wheels")
        return
    wheelhouse.mkdir(parents=True, exist_ok=True)
    # --find-links: wheels built for an arch PyPI lacks (armhf) count as downloaded.
    run([sys.executable, "-m", "pip", "download", "-q", "-d", wheelhouse,
         "--find-links", wheelhouse, *platform_args(arch), requirement(project_wheel, role)])
    # The project wheel is rebuilt each time; a copy left here could shadow a newer
    # build of the same version.
    for stale in wheelhouse.glob("certmon-*.whl"):
        stale.unlink()


def requirement(project_wheel: Path, role: Role) -> str:
    extra = f"[{role.extra}]" if role.extra else ""
    return f"certmon{extra} @ {project_wheel.resolve().as_uri()}"


def install_venv(project_wheel: Path, role: Role, arch: str, wheelhouse: Path,
                 prefix: Path, final_prefix: str) -> list[str]:
    """Lay out a venv at `prefix` that will live at `final_prefix`; return wheel names."""
    site = prefix / "lib" / f"python{PYTHON_VERSION}" / "site-packages"
    site.mkdir(parents=True)
    run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-compile",
         "--find-links", wheelhouse, "--find-links", project_wheel.parent,
         "--target", site, *platform_args(arch), requirement(project_wheel, role)])
    shutil.rmtree(site / "bin", ignore_errors=True)  # pip's scripts name the build python
    # Byte-code for the target (3.11 byte-code is the same on every 3.11.x and arch):
    # the units' ProtectSystem=strict forbids writing it at run time. checked-hash pyc
    # stay valid whatever mtimes dpkg gives the sources.
    compileall.compile_dir(site, quiet=1, workers=0, ddir=site_path(final_prefix),
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    bindir = prefix / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(TARGET_PYTHON)
    (bindir / "python").symlink_to("python3")
    (prefix / "pyvenv.cfg").write_text(
        f"home = {Path(TARGET_PYTHON).parent}\ninclude-system-site-packages = false\n"
        f"version = {PYTHON_VERSION}\n", encoding="utf-8")
    for command, target in role.scripts.items():
        module, func = target.split(":")
        script = bindir / command
        # -I: ignore PYTHON* variables and the user's site-packages; the service's
        # imports come from this venv only.
        script.write_text(f"#!{final_prefix}/bin/python3 -I\nimport sys\n\n"
                          f"from {module} import {func}\n\nsys.exit({func}())\n",
                          encoding="utf-8")
        script.chmod(0o755)
    return sorted(p.name for p in wheelhouse.glob("*.whl"))


def site_path(final_prefix: str) -> str:
    return f"{final_prefix}/lib/python{PYTHON_VERSION}/site-packages"


def min_glibc(wheel_names: Sequence[str], installed: Path) -> str | None:
    """Highest glibc any installed binary wheel needs, from its manylinux tag."""
    needed = None
    dist_infos = {p.name.split("-")[0].lower().replace("_", "-") for p in installed.iterdir()
                  if p.name.endswith(".dist-info")}
    for name in wheel_names:
        dist = name.split("-")[0].lower().replace("_", "-")
        if dist not in dist_infos:
            continue
        levels = [(2, 17) if m.group(0).startswith("manylinux2014") else
                  (int(m.group(1)), int(m.group(2)))
                  for m in re.finditer(r"manylinux_(\d+)_(\d+)_|manylinux2014_", name)]
        if levels:
            level = min(levels)
            needed = level if needed is None or level > needed else needed
    return f"{needed[0]}.{needed[1]}" if needed else None


def filtered_tmpfiles(role: Role) -> str:
    """The shared tmpfiles.d file, keeping only this package's lines."""
    other = {r.name for r in ROLES.values()} - {role.name}
    lines = (REPO / "systemd" / "certmon.tmpfiles.conf").read_text(encoding="utf-8")
    return "".join(line for line in lines.splitlines(keepends=True)
                   if not any(name in line for name in other))


def stage_files(root: Path, role: Role, final_prefix: str) -> None:
    systemd = REPO / "systemd"
    unitdir = root / "lib" / "systemd" / "system"  # Debian 12 packages still use /lib
    unitdir.mkdir(parents=True)
    for unit in role.units:
        shutil.copy2(systemd / unit, unitdir / unit)
    sysusers = root / "usr" / "lib" / "sysusers.d"
    sysusers.mkdir(parents=True)
    shutil.copy2(systemd / "certmon.sysusers.conf", sysusers / f"{role.name}.conf")
    tmpfiles = root / "usr" / "lib" / "tmpfiles.d"
    tmpfiles.mkdir(parents=True)
    (tmpfiles / f"{role.name}.conf").write_text(filtered_tmpfiles(role), encoding="utf-8")
    etc = root / "etc" / "certmon"
    etc.mkdir(parents=True)
    shutil.copy2(REPO / "packaging" / role.config, etc / conffile_name(role))
    usrbin = root / "usr" / "bin"
    usrbin.mkdir(parents=True)
    for command in role.scripts:
        (usrbin / command).symlink_to(f"{final_prefix}/bin/{command}")
    doc = root / "usr" / "share" / "doc" / role.name
    doc.mkdir(parents=True)
    shutil.copy2(systemd / "README.md", doc / "README.md")
    shutil.copy2(REPO / "packaging" / role.config, doc / role.config)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        "Upstream-Name: certmon\n\nFiles: *\nCopyright: certmon developers\n"
        "License: Apache-2.0\n On Debian systems the full text of the Apache License 2.0\n"
        " is in /usr/share/common-licenses/Apache-2.0.\n\n"
        "Files: opt/certmon/*/lib/*\nCopyright: the respective upstream authors\n"
        "License: various\n Bundled Python distributions; each one's licence is in its\n"
        " *.dist-info directory under /opt/certmon.\n", encoding="utf-8")


def conffile_name(role: Role) -> str:
    return role.config.replace(".example", "")


def maintainer_scripts(role: Role) -> dict[str, str]:
    """postinst/prerm/postrm in the shape dh_installsystemd and dh_installsysusers emit."""
    services = [u for u in role.units if u.endswith(".service") and u != "certmon-scan.service"]
    enable = " ".join(services + [u for u in role.units if u.endswith(".timer")])
    main = services[0]
    command = next(iter(role.scripts))
    return {
        "postinst": f"""#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # The `certmon` system user (sysusers.d; useradd where systemd-sysusers is absent).
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers {role.name}.conf
    elif ! getent passwd certmon >/dev/null; then
        useradd --system --user-group --home-dir / --shell /usr/sbin/nologin \\
            --comment "certmon TLS certificate monitoring" certmon
    fi
    if command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles --create {role.name}.conf || true
    fi
fi
if [ "$1" = configure ] || [ "$1" = abort-upgrade ] || [ "$1" = abort-deconfigure ] \\
        || [ "$1" = abort-remove ]; then
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        for unit in {enable}; do
            deb-systemd-helper unmask "$unit" >/dev/null || true
            if deb-systemd-helper --quiet was-enabled "$unit"; then
                deb-systemd-helper enable "$unit" >/dev/null || true
            else
                deb-systemd-helper update-state "$unit" >/dev/null || true
            fi
        done
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        # Start (or restart on upgrade) only a configured installation: the shipped
        # /etc/certmon/{conffile_name(role)} names example hosts and files.
        if /usr/bin/{command} check-config --config /etc/certmon/{conffile_name(role)} \\
                >/dev/null 2>&1; then
            deb-systemd-invoke restart {main} >/dev/null || true
        fi
    fi
fi
exit 0
""",
        "prerm": f"""#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    deb-systemd-invoke stop {" ".join(role.units)} >/dev/null || true
fi
exit 0
""",
        "postrm": f"""#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = remove ] || [ "$1" = purge ]; then
    # Byte-code written at run time by root-run commands is not in the package.
    rm -rf /opt/certmon/{role.name.removeprefix("certmon-")}
    rmdir /opt/certmon 2>/dev/null || true
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        for unit in {enable}; do deb-systemd-helper mask "$unit" >/dev/null || true; done
    fi
fi
if [ "$1" = purge ]; then
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        for unit in {enable}; do
            deb-systemd-helper purge "$unit" >/dev/null || true
            deb-systemd-helper unmask "$unit" >/dev/null || true
        done
    fi
    # State (sequence numbers, spool, SQLite store). The `certmon` user stays, as
    # Debian policy asks: files elsewhere may still belong to it.
    rm -rf /var/lib/{role.name} /var/lib/private/{role.name}
    rmdir /etc/certmon 2>/dev/null || true
fi
exit 0
""",
    }


def write_control(root: Path, role: Role, version: str, arch: str, wheels: Sequence[str],
                  final_prefix: str) -> None:
    debian = root / "DEBIAN"
    debian.mkdir()
    size_kib = sum(p.lstat().st_size for p in root.rglob("*") if not p.is_dir()) // 1024 + 1
    depends = [f"python{PYTHON_VERSION}"]
    glibc = min_glibc(wheels, root / site_path(final_prefix).lstrip("/"))
    if glibc:
        depends.append(f"libc6 (>= {glibc})")
    (debian / "control").write_text(
        f"Package: {role.name}\nVersion: {version}\nArchitecture: {arch}\n"
        f"Maintainer: {MAINTAINER}\nInstalled-Size: {size_kib}\n"
        f"Depends: {', '.join(depends)}\nRecommends: systemd\n"
        f"Section: net\nPriority: optional\nDescription: {role.description}\n",
        encoding="utf-8")
    (debian / "conffiles").write_text(f"/etc/certmon/{conffile_name(role)}\n", encoding="utf-8")
    for name, text in maintainer_scripts(role).items():
        (debian / name).write_text(text, encoding="utf-8")
        (debian / name).chmod(0o755)
    sums = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        # Like dh_md5sums: conffiles are tracked through DEBIAN/conffiles instead.
        if (path.is_file() and not path.is_symlink() and relative.parts[0] not in
                ("DEBIAN", "etc")):
            digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
            sums.append(f"{digest}  {relative}\n")
    (debian / "md5sums").write_text("".join(sums), encoding="utf-8")


def build(role_key: str, arch: str, out: Path, *, wheelhouse: Path | None = None,
          download: bool = True, work: Path | None = None) -> Path:
    """Build one package; returns the .deb path."""
    role = ROLES[role_key]
    version = project_version()
    wheelhouse = wheelhouse or REPO / "build" / f"wheelhouse-{arch}"
    with tempfile.TemporaryDirectory(prefix="certmon-deb-", dir=work) as tmp:
        tmpdir = Path(tmp)
        project_wheel = build_project_wheel(tmpdir)
        fetch_wheels(project_wheel, role, arch, wheelhouse, download=download)
        root = tmpdir / "root"
        final_prefix = f"/opt/certmon/{role_key}"
        wheels = install_venv(project_wheel, role, arch, wheelhouse,
                              root / final_prefix.lstrip("/"), final_prefix)
        stage_files(root, role, final_prefix)
        write_control(root, role, version, arch, wheels, final_prefix)
        out.mkdir(parents=True, exist_ok=True)
        deb = out / f"{role.name}_{version}_{arch}.deb"
        run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", root, deb],
            stdout=subprocess.DEVNULL)
    return deb


def host_arch() -> str:
    machine = os.uname().machine
    for arch, wheel_machine in ARCHES.items():
        if wheel_machine == machine:
            return arch
    raise SystemExit(f"build_deb: unsupported host machine {machine}; pass --arch")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHES), default=None,
                        help="Debian architecture (default: the build machine's)")
    parser.add_argument("--package", choices=["agent", "collector", "all"], default="all")
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--wheelhouse", type=Path, default=None,
                        help="dependency wheels (default build/wheelhouse-<arch>)")
    parser.add_argument("--no-download", action="store_true",
                        help="use only the wheelhouse; no network at all")
    args = parser.parse_args(argv)
    arch = args.arch or host_arch()
    keys = list(ROLES) if args.package == "all" else [args.package]
    for key in keys:
        print(build(key, arch, args.out, wheelhouse=args.wheelhouse,
                    download=not args.no_download))
    return 0


if __name__ == "__main__":
    sys.exit(main())
