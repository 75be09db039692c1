"""A Debian root of another architecture (arm64, armhf), run under qemu-user on the host.

Owns: building such a root with debootstrap from deb.debian.org (once per cache
directory: a stamp file names what it holds), copying it for one test, and running a
command chrooted in it under `qemu-<cpu>-static`. Programs in the root run through
the host's binfmt_misc handler when one is registered (binfmt-support does that
when qemu-user-static is installed); otherwise through a *private* binfmt_misc
instance in a new user and mount namespace (Linux >= 6.7), so the host's handlers
are never touched. /proc, /dev and /sys are bind-mounted in a private mount
namespace and vanish with the command.

Must not: register a handler on the host, leave a mount behind, reach anything but
the Debian mirror and (the host's pip, for sdists) PyPI, or import the rest of the kit: the namespace steps need a
single-threaded process (unshare(CLONE_NEWUSER) refuses a threaded one, and pytest
runs brokers and collectors in threads), so `run_in_root` starts this file as a
script: `python tests/kit/foreignroot.py ROOT ARCH -- ARGV...`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ARCHES", "RootSpec", "build_wheels", "copy_root", "ensure_root", "run_in_root"]

MIRROR = "http://deb.debian.org/debian"
# Debian architecture -> qemu's cpu name (qemu-<cpu>-static, /usr/share/binfmts/qemu-<cpu>).
ARCHES = {"arm64": "aarch64", "armhf": "arm"}
STAMP = ".certmon-foreign-root"
ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
}
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1
ID_RANGE = 65536  # uids/gids mapped 1:1 into the private namespace (Debian's system ids)


@dataclass(frozen=True, slots=True)
class RootSpec:
    """What a cached root holds: its stamp must match, or it is rebuilt."""

    arch: str
    suite: str = "bookworm"
    include: tuple[str, ...] = ("python3.11", "ca-certificates")

    def stamp(self) -> str:
        return f"{self.suite} {self.arch} minbase +{','.join(self.include)}\n"


def ensure_root(cache: Path, spec: RootSpec, log: Path) -> Path:
    """The cached root for `spec` under `cache`, built first if missing or stale.

    Built in a sibling directory and renamed, so an interrupted build never looks
    finished. debootstrap's first stage runs on the host (download, unpack); the
    second stage (every maintainer script) runs in the root under qemu."""
    root = cache / f"{spec.suite}-{spec.arch}"
    stamp = root / STAMP
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == spec.stamp():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{root.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with log.open("a", encoding="utf-8") as out:
        subprocess.run(
            ["debootstrap", "--foreign", f"--arch={spec.arch}", "--variant=minbase",
             f"--include={','.join(spec.include)}", spec.suite, str(partial), MIRROR],
            stdout=out, stderr=subprocess.STDOUT, check=True, timeout=900)
        # container=lxc: debootstrap then skips its mknod checks, which a user
        # namespace (the private binfmt_misc case) refuses.
        done = run_in_root(partial, spec.arch, ["/debootstrap/debootstrap", "--second-stage"],
                           timeout=1800, env={"container": "lxc"})
        out.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap --second-stage failed ({done.returncode}); see {log}")
        # The downloaded .debs are no longer needed: the cached root stays small.
        for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
    (partial / STAMP).write_text(spec.stamp(), encoding="utf-8")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


def copy_root(cached: Path, target: Path) -> Path:
    """A throw-away copy of a cached root (owners, modes and links kept)."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(cached), str(target)], check=True,
                   timeout=300)
    return target


def build_wheels(cached: Path, arch: str, requirements: Sequence[str], out: Path, *,
                 build_requirements: Sequence[str], build_packages: Sequence[str],
                 log: Path) -> list[Path]:
    """Wheels of `requirements` built from their sdists in a copy of `cached` (its
    Python, its libc, Debian's compiler from `build_packages`), copied into `out`.

    For what PyPI has no wheel of on `arch` (armhf: cffi, psutil). The host's pip
    downloads the sdists and the build backend (`build_requirements`), so the root
    needs no route or CA for PyPI; pip in the root builds offline from them. The copy
    is thrown away: the cached root stays what a device has."""
    work = cached.parent / f"{cached.name}.wheels"
    shutil.rmtree(work, ignore_errors=True)
    copy_root(cached, work)
    downloads = work / "build" / "downloads"
    steps = [
        ["/usr/bin/apt-get", "update", "-q"],
        ["/usr/bin/apt-get", "install", "-y", "-q", "--no-install-recommends", *build_packages],
        ["/usr/bin/python3.11", "-m", "venv", "/build/venv"],
        ["/build/venv/bin/pip", "wheel", "-q", "--no-index", "--find-links", "/build/downloads",
         "--no-deps", "-w", "/build/wheels", *requirements],
    ]
    try:
        with log.open("a", encoding="utf-8") as written:
            for argv in (["pip", "download", "sdists"], *steps):
                if argv[0] == "pip":
                    done = subprocess.run(
                        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                         str(downloads), "--no-binary", ":all:", *requirements],
                        capture_output=True, text=True, timeout=600)
                    if done.returncode == 0:
                        done = subprocess.run(
                            [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                             "--only-binary", ":all:", "-d", str(downloads),
                             *build_requirements], capture_output=True, text=True, timeout=600)
                else:
                    done = run_in_root(work, arch, argv, timeout=1800)
                written.write(f"+ {' '.join(argv)}\n{done.stdout}{done.stderr}")
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}); see {log}")
        out.mkdir(parents=True, exist_ok=True)
        built = []
        for wheel in sorted((work / "build/wheels").glob("*.whl")):
            built.append(Path(shutil.copy2(wheel, out / wheel.name)))
        return built
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_in_root(root: Path, arch: str, argv: Sequence[str], *, timeout: float = 300,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv` chrooted in `root` (its programs under qemu); output captured."""
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return subprocess.run(
        [sys.executable, __file__, str(root), arch, *extra, "--", *argv],
        capture_output=True, text=True, timeout=timeout)


# --- the script half: runs in its own single-threaded process ------------------------


def host_handler(cpu: str) -> bool:
    """True when the host's binfmt_misc runs `cpu` binaries with a fixed interpreter
    (flag F: opened at registration, so the root needs no copy of qemu)."""
    entry = Path(f"/proc/sys/fs/binfmt_misc/qemu-{cpu}")
    try:
        lines = entry.read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags:")), "")
    return bool(lines) and lines[0] == "enabled" and "F" in flags


def registration(cpu: str) -> str:
    """The binfmt_misc register line for qemu-<cpu>-static, from the magic and mask
    qemu-user-static ships in /usr/share/binfmts/ (what binfmt-support registers)."""
    fields = dict(line.split(" ", 1) for line in
                  Path(f"/usr/share/binfmts/qemu-{cpu}").read_text(encoding="utf-8").splitlines()
                  if " " in line)
    interpreter = shutil.which(f"qemu-{cpu}-static") or f"/usr/bin/qemu-{cpu}-static"
    return f":qemu-{cpu}:M:{fields.get('offset', '0')}:{fields['magic']}:{fields['mask']}:" \
           f"{interpreter}:F"


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _libc_call("mount", source and source.encode(), target.encode(),
               fstype and fstype.encode(), ctypes.c_ulong(flags), None)


def _child(root: Path, cpu: str, private: bool, ready_w: int, go_r: int,
           argv: list[str], env: dict[str, str]) -> None:
    _libc_call("prctl", PR_SET_PDEATHSIG, 9, 0, 0, 0)  # the test's timeout kills us too
    _libc_call("unshare", CLONE_NEWNS | (CLONE_NEWUSER if private else 0))
    os.write(ready_w, b"u")
    if os.read(go_r, 1) != b"g":
        raise RuntimeError("the parent could not map our ids")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    if private:
        try:
            _mount("binfmt_misc", "/proc/sys/fs/binfmt_misc", "binfmt_misc", 0)
        except OSError as exc:
            raise RuntimeError(
                "no qemu handler in the host's binfmt_misc and no private instance "
                f"either ({exc}; Linux < 6.7?): apt-get install binfmt-support "
                "qemu-user-static registers the host's") from exc
        Path("/proc/sys/fs/binfmt_misc/register").write_text(registration(cpu),
                                                             encoding="ascii")
    for sub in ("proc", "dev", "sys"):
        (root / sub).mkdir(exist_ok=True)
        _mount(f"/{sub}", str(root / sub), None, MS_BIND | MS_REC)
    os.chroot(root)
    os.chdir("/")
    os.execve(argv[0], argv, env)


def enter(root: Path, arch: str, argv: list[str], env: dict[str, str]) -> int:
    """Fork; the child unshares, the parent (still outside) maps its ids, the child
    mounts, chroots and execs `argv`. Returns the command's exit code."""
    cpu = ARCHES[arch]
    private = not host_handler(cpu)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            _child(root, cpu, private, ready_w, go_r, argv, env)
        except BaseException as exc:  # reported; the forked child must never return
            print(f"foreignroot: {exc}", file=sys.stderr)
        os._exit(125)
    # Our copies of the child's ends closed: a child that dies early reads as EOF here
    # instead of a read that never returns.
    os.close(ready_w)
    os.close(go_r)
    ok = b"g"
    if os.read(ready_r, 1) == b"u" and private:
        try:
            # Identity maps: root in the root is root on the host, as with a chroot.
            Path(f"/proc/{pid}/uid_map").write_text(f"0 0 {ID_RANGE}\n", encoding="ascii")
            Path(f"/proc/{pid}/gid_map").write_text(f"0 0 {ID_RANGE}\n", encoding="ascii")
        except OSError as exc:
            print(f"foreignroot: mapping ids: {exc}", file=sys.stderr)
            ok = b"x"
    with contextlib.suppress(BrokenPipeError):  # the child is gone; waitpid says how
        os.write(go_w, ok)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(args: list[str]) -> int:
    sep = args.index("--")
    root, arch, *assignments = args[:sep]
    env = dict(ROOT_ENV)
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        env[key] = value
    return enter(Path(root).resolve(), arch, args[sep + 1:], env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
