"""No secret ever reaches a log, even at DEBUG, even on error paths.

The whole story runs as real subprocesses with `-v` (DEBUG logging): a collector
(with an HTTP basic-auth password file configured), `certmon-agent once`, `show` and
`check`, `certmon-agent run` until the collector has stored a status from it and then
SIGTERM, plus error paths where a careless message would quote a file: the private
key given where the certificate is expected, and a garbage key. Everything any of
them printed (stdout and stderr) is searched for private-key material — PEM headers,
the key's base64 body and its DER in base64 (in 32-character pieces, so re-wrapped
text is caught), the private scalar in hex and decimal — and for the password.
"""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import threading
from pathlib import Path

from conftest import DeviceCreds, Fleet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kit.broker import wait_until

from collector.store import open_store

PASSWORD = "correct-horse-battery-staple-9f3b"


def key_material(path: Path) -> list[str]:
    """Strings whose presence in a log would leak the key at `path`."""
    pem = path.read_bytes()
    key = serialization.load_pem_private_key(pem, None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    b64 = base64.b64encode(der).decode()
    body = [line for line in pem.decode().splitlines() if not line.startswith("-----")]
    pieces = [b64[i:i + 32] for i in range(0, len(b64) - 32, 4)]
    found = [*body, *pieces]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        scalar = key.private_numbers().private_value
        found += [f"{scalar:x}", f"{scalar:X}", str(scalar), f"{scalar:064x}"]
    return found


def run(argv: list[str], timeout: float = 60) -> str:
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=timeout)
    return f"$ {' '.join(argv)} (exit {done.returncode})\n{done.stdout}{done.stderr}"


class Drained:
    """A long-running program's output, read as it comes. At DEBUG the collector (and
    its link process, on the same pipe) writes more than a pipe holds: unread, the
    writer blocks in its log call, the link's network thread with it, and nothing is
    stored any more — the test would be measuring its own harness."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self, timeout: float = 30) -> str:
        self.proc.wait(timeout)
        self.thread.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return "".join(self.lines)


def stored_seq(db: Path, device_id: str) -> int:
    if not db.exists():
        return 0
    store = open_store(f"sqlite:///{db}")
    try:
        row = store.device(device_id)
    except Exception:  # not migrated yet
        return 0
    finally:
        store.close()
    return 0 if row is None else row.seq


def test_nothing_secret_is_logged_in_a_full_story_at_debug(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    device = fleet_broker.device_credentials("gw-secret", tmp_path / "device")
    col = fleet_broker.collector_credentials(tmp_path / "collector")
    (tmp_path / "fleet-ca.pem").write_bytes(fleet_broker.root.cert_pem())
    (tmp_path / "password").write_text(PASSWORD + "\n")
    db = tmp_path / "certmon.db"
    (tmp_path / "collector.toml").write_text(f"""
[mqtt]
broker = "mqtts://127.0.0.1:{fleet_broker.operations_port}"
client_id = "collector-secrets"
session_expiry_s = 0

[tls]
ca_bundle = "{col.ca_bundle_path}"
cert = "{col.cert_path}"
key = "{col.key_path}"
fleet_ca = ["fleet-ca.pem"]

[store]
url = "sqlite:///{db}"

[web]
listen = "127.0.0.1:0"
basic_auth_user = "ops"
basic_auth_password_file = "password"
""")
    agent_flags = ["--broker", f"mqtts://127.0.0.1:{fleet_broker.mtls_port}",
                   "--ca-bundle", str(device.ca_bundle_path), "--cert", str(device.cert_path),
                   "--key", str(device.key_path), "--state-dir", str(tmp_path / "state"), "-v"]
    logs: list[str] = []
    collector = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "run", "-v", "--config",
         str(tmp_path / "collector.toml")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    collector_out = Drained(collector)
    agent = None
    try:
        logs.append(run(["collector.cli", "check-config", "-v", "--config",
                         str(tmp_path / "collector.toml")]))
        assert wait_until(lambda: db.exists(), 20)
        logs.append(run(["agent.cli", "once", *agent_flags, "--timeout-s", "20"]))
        assert wait_until(lambda: stored_seq(db, "gw-secret") == 1, 20), logs[-1]
        logs.append(run(["agent.cli", "show", *agent_flags]))
        logs.append(run(["agent.cli", "check", "--ca-bundle", str(device.ca_bundle_path),
                         "--cert", str(device.cert_path), "--key", str(device.key_path),
                         "--json"]))
        # Error paths: the key where the certificate belongs, and a broken key.
        logs.append(run(["agent.cli", "check", "--ca-bundle", str(device.ca_bundle_path),
                         "--cert", str(device.key_path), "--key", str(device.key_path)]))
        logs.append(run(["agent.cli", "show", *agent_flags[:4], "--cert", str(device.key_path),
                         "--key", str(device.key_path), "--state-dir", str(tmp_path / "s2"),
                         "-v"]))
        broken = tmp_path / "broken.key"
        broken.write_bytes(device.key_path.read_bytes()[:-80] + b"\n-----END PRIVATE KEY-----\n")
        logs.append(run(["agent.cli", "once", *agent_flags[:6], "--key", str(broken),
                         "--state-dir", str(tmp_path / "s3"), "--timeout-s", "3", "-v"]))
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", *agent_flags, "--interval-s", "10"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        agent_out = Drained(agent)
        assert wait_until(lambda: stored_seq(db, "gw-secret") >= 2, 30), \
            "".join(agent_out.lines[-40:]) + "".join(collector_out.lines[-40:])
        agent.send_signal(signal.SIGTERM)
        logs.append("$ agent run\n" + agent_out.text(20))
        assert agent.returncode == 0, logs[-1]
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            Drained.text(agent_out, 20)
        collector.send_signal(signal.SIGTERM)
        logs.append("$ collector run\n" + collector_out.text(30))
    text = "\n".join(logs)
    assert "DEBUG" in text  # the programs did log at DEBUG
    assert "PRIVATE KEY" not in text
    assert PASSWORD not in text
    secrets = key_material(device.key_path) + key_material(col.key_path)
    flat = "".join(text.split())  # catches base64 re-wrapped over several lines
    leaked = [s for s in secrets if s in text or s in flat]
    assert not leaked, f"{len(leaked)} pieces of key material in the logs, e.g. {leaked[0]!r}"


def test_key_material_detection_works(tmp_path: Path, fleet_broker: Fleet) -> None:
    """The detector itself: a log that quotes three lines of a key is caught."""
    creds: DeviceCreds = fleet_broker.device_credentials("gw-detector", tmp_path)
    pem_lines = creds.key_path.read_text().splitlines()
    log = "INFO something\n" + "\n".join(pem_lines[1:4]) + "\n"
    assert any(s in log or s in "".join(log.split()) for s in key_material(creds.key_path))
