"""A FIFO or a device where a certificate, key or CRL belongs is a finding at once,
never a read that blocks for ever (an agent that stops reporting) or never ends."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from certmon import pki
from certmon.files import NotRegularFile, read_regular
from certmon.pki.crl import read_crls


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    os.mkfifo(path)  # opening it for reading would wait for a writer
    return path


def within(seconds: float, fn: object) -> object:
    """fn() on a thread; fails if it has not returned in `seconds` (a blocked read)."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())  # type: ignore[operator]
        except OSError as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, "blocked"
    return out[0]


def test_a_fifo_is_refused_without_waiting_for_a_writer(fifo: Path) -> None:
    refused = within(5, lambda: read_regular(fifo))
    assert isinstance(refused, NotRegularFile) and "not a regular file" in str(refused)
    bundle = within(5, lambda: pki.read_bundle(fifo))
    (finding,) = bundle.findings  # type: ignore[attr-defined]
    assert finding.code == pki.FindingCode.FILE_UNREADABLE
    assert "not a regular file" in finding.message and str(fifo) in finding.message
    facts, findings, key = within(5, lambda: pki.read_private_key(fifo))  # type: ignore[misc]
    assert facts is None and key is None
    assert findings[0].code == pki.FindingCode.KEY_UNREADABLE
    crls = within(5, lambda: read_crls(fifo, ()))
    assert "not a regular file" in crls.findings[0].message  # type: ignore[attr-defined]


def test_a_device_and_a_directory_are_refused(tmp_path: Path) -> None:
    bundle = within(5, lambda: pki.read_bundle("/dev/zero"))  # would never end
    assert "not a regular file" in bundle.findings[0].message  # type: ignore[attr-defined]
    with pytest.raises(IsADirectoryError):
        read_regular(tmp_path)
    assert "give the file, not its directory" in pki.read_bundle(tmp_path).findings[0].message


def test_a_regular_file_reads_as_before(tmp_path: Path) -> None:
    path = tmp_path / "x.pem"
    path.write_bytes(b"abc")
    assert read_regular(path) == b"abc"
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing.pem")


def test_a_socket_is_not_a_regular_file(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "ca.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    try:
        assert "not a regular file" in pki.read_bundle(path).findings[0].message
    finally:
        sock.close()


def test_the_agent_and_its_config_never_block_on_a_fifo(fifo: Path, tmp_path: Path) -> None:
    from agent.certstore import read_material
    from agent.config import AgentConfig
    from certmon.config import loads
    from certmon.errors import ConfigError

    material = within(5, lambda: read_material(fifo))
    assert "not a regular file" in material.trust_store.findings[0].message  # type: ignore[attr-defined]
    key = tmp_path / "k.pem"
    key.write_text("x")

    def load() -> object:
        try:
            return loads(AgentConfig, "", overrides={
                "mqtt.broker": "mqtts://127.0.0.1:8883", "tls.ca_bundle": str(fifo),
                "tls.cert": str(key), "tls.key": str(key)})
        except ConfigError as exc:
            return exc

    refused = within(5, load)
    assert isinstance(refused, ConfigError)
    assert "tls.ca_bundle" in str(refused) and "not a regular file" in str(refused)
