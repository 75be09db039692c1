"""A private PostgreSQL server for fault tests: one a test may stop and start again.

Owns: finding the server binaries (`find_pg_bin`: /usr/lib/postgresql/<newest>/bin,
or $CERTMON_TEST_PG_BIN), creating a throw-away cluster (`initdb`, trust auth, fsync
off) in a temporary directory, and running it with `pg_ctl` on a free loopback port
(`PostgresServer.start/stop`), as the `postgres` user when we are root (initdb refuses
to run as root), with its log attached to failures.

Must not: touch the machine's own server (5432) or any cluster it did not create, or
listen beyond 127.0.0.1 (no Unix socket outside its own directory either).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ["PostgresServer", "find_pg_bin"]


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl (the newest installed major version)."""
    explicit = os.environ.get("CERTMON_TEST_PG_BIN")
    if explicit:
        return Path(explicit) if (Path(explicit) / "pg_ctl").exists() else None
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """`with PostgresServer(bin_dir) as pg:` → a running server; `pg.url` for the store.
    `stop()` is a fast shutdown (`pg_ctl stop -m fast`: clients are disconnected, as
    when an operator restarts the database); `start()` again on the same port."""

    def __init__(self, bin_dir: Path, database: str = "certmon") -> None:
        self.bin = bin_dir
        self.database = database
        self.port = _free_port()
        self._user = "postgres" if os.geteuid() == 0 else None
        # Not pytest's tmp_path: its parents are 0700 root, which `postgres` cannot enter.
        self.dir = Path(tempfile.mkdtemp(prefix="certmon-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *argv: str, timeout_s: float = 60) -> None:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              check=False, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): "
                               f"{done.stderr.strip()}\n{self.log_text()[-2000:]}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def init(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--no-sync")
        return self

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.dir} -c fsync=off "
                   "-c full_page_writes=off -c synchronous_commit=off")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w",
                  "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def is_running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self) -> None:
        import psycopg

        url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')

    def __enter__(self) -> PostgresServer:
        try:
            self.init()
            self.start()
            self.create_database()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.is_running():
            try:
                self.stop()
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
