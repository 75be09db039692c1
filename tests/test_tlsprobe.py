"""certmon.tlsprobe against real peers on loopback: Mosquitto and Python TLS servers.

Every certificate is generated here with explicit validity; nothing is committed.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kit import broker as kit_broker
from kit import pki as kit_pki

from certmon import tlsprobe
from certmon.tlsprobe import ProbeTarget, probe, probe_many

MOSQUITTO = "/usr/sbin/mosquitto"
TIMEOUT_S = 1.5
NOW = dt.datetime.now(dt.UTC)


# --- PKI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """A kit.pki certificate and the files a peer loads it from."""

    issued: kit_pki.Issued
    cert_path: Path
    key_path: Path

    @property
    def cert(self) -> x509.Certificate:
        return self.issued.cert

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def issue(
    directory: Path,
    name: str,
    issuer: Written | None = None,
    *,
    is_ca: bool = False,
    not_before: dt.datetime = NOW - dt.timedelta(days=1),
    not_after: dt.datetime = NOW + dt.timedelta(days=30),
    chain: bool = False,
) -> Written:
    """One EC P-256 certificate with a fresh key; with ``chain`` the PEM file holds it
    followed by its intermediates (as served)."""
    factory = kit_pki.PKIFactory(NOW)
    opts: kit_pki.CertOptions = {"not_before": not_before, "not_after": not_after, "name": name}
    if is_ca:
        made = (factory.intermediate(issuer.issued, name, path_length=None, **opts) if issuer
                else factory.root(name, **opts))
    elif issuer:
        made = factory.leaf(issuer.issued, name, sans=("localhost",), usage=None, **opts)
    else:
        made = factory.self_signed_leaf(name, sans=("localhost",), usage=None, **opts)
    cert_path, key_path = made.write(directory, chain=chain)
    return Written(made, cert_path, key_path)


@dataclass
class Pki:
    root: Written
    intermediate: Written
    server: Written  # file holds leaf + intermediate, as a correctly configured broker serves
    expired: Written
    client: Written


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    root = issue(d, "root", is_ca=True)
    inter = issue(d, "intermediate", root, is_ca=True)
    server = issue(d, "server", inter, chain=True)
    expired = issue(
        d,
        "expired",
        root,
        not_before=NOW - dt.timedelta(days=60),
        not_after=NOW - dt.timedelta(days=30),
    )
    client = issue(d, "client", root)
    return Pki(root, inter, server, expired, client)


def free_port(family: socket.AddressFamily = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --- peers ---------------------------------------------------------------------------------


@dataclass
class Broker:
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@contextmanager
def mosquitto(directory: Path, listener_lines: list[str]) -> Iterator[Broker]:
    """One private Mosquitto with one TLS listener on 127.0.0.1; ready when it logs 'running'."""
    if not os.path.exists(MOSQUITTO):
        if os.environ.get("CI"):
            pytest.fail(f"{MOSQUITTO} missing")
        pytest.skip(f"{MOSQUITTO} missing")
    port = free_port()
    log_path = directory / f"mosquitto-{port}.log"
    conf = directory / f"mosquitto-{port}.conf"
    lines = ["per_listener_settings true", f"log_dest file {log_path}", "log_type all"]
    if os.geteuid() == 0:
        lines.append("user root")  # mosquitto drops to 'mosquitto' otherwise and cannot read tmp
    lines += [f"listener {port} 127.0.0.1", *listener_lines]
    if not any(line.startswith("allow_anonymous") for line in listener_lines):
        lines.append("allow_anonymous true")  # the 2.0 default is false
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 5
        while " running" not in (log_path.read_text() if log_path.exists() else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = log_path.read_text() if log_path.exists() else ""
                pytest.fail(f"mosquitto did not start:\n{log}")
            time.sleep(0.02)
        yield Broker(port, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def tls_listener(*lines: str, pki: Pki, cert: Written | None = None) -> list[str]:
    cert = cert or pki.server
    return [
        f"cafile {pki.root.cert_path}",
        f"certfile {cert.cert_path}",
        f"keyfile {cert.key_path}",
        *lines,
    ]


@dataclass
class PyServer:
    port: int
    server_names: list[str | None]


@contextmanager
def py_tls_server(
    ctx: ssl.SSLContext, host: str = "127.0.0.1", family: socket.AddressFamily = socket.AF_INET
) -> Iterator[PyServer]:
    """A threaded stdlib TLS server: handshake, read until EOF, close."""
    names: list[str | None] = []

    def record_sni(_sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _c: object) -> None:
        names.append(name)

    ctx.sni_callback = record_sni
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen()
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(TIMEOUT_S)
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    while conn.recv(1024):
                        pass
            except (OSError, ssl.SSLError):
                raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield PyServer(listener.getsockname()[1], names)
    finally:
        stop.set()
        thread.join()
        listener.close()


def server_context(cert: Written) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert_path, cert.key_path)
    return ctx


# --- chain, version, cipher ---------------------------------------------------------------


@pytest.mark.broker
def test_full_chain_captured_in_order_sent_from_mosquitto(pki: Pki, tmp_path: Path) -> None:
    with mosquitto(tmp_path, tls_listener(pki=pki)) as broker:
        result = probe(ProbeTarget("127.0.0.1", broker.port, timeout_s=TIMEOUT_S))
    assert result.error is None, result.error
    assert result.presented_der == (pki.server.der, pki.intermediate.der)
    assert result.address == "127.0.0.1"
    assert result.tls_version == "TLSv1.3"
    assert result.cipher and result.cipher.startswith("TLS_")
    assert result.alpn is None
    assert result.client_cert_requested is False
    assert result.connect_s is not None and result.handshake_s is not None
    assert result.handshake_s < TIMEOUT_S


def test_expired_server_cert_still_yields_der(pki: Pki) -> None:
    with py_tls_server(server_context(pki.expired)) as server:
        result = probe(ProbeTarget("localhost", server.port, timeout_s=TIMEOUT_S))
    assert result.error is None, result.error
    assert result.presented_der == (pki.expired.der,)
    # 'localhost' may resolve to ::1 first, where nothing listens: the next address is tried.
    assert result.address == "127.0.0.1"
    assert server.server_names == ["localhost"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI makes the SHA-1 cert")
def test_weak_rsa1024_sha1_cert_over_tls10_is_observed(tmp_path: Path) -> None:
    # cryptography refuses to sign with SHA-1, so the openssl CLI makes this one.
    cert, key = tmp_path / "weak.crt", tmp_path / "weak.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:1024", "-sha1", "-nodes", "-subj",
         "/CN=weak", "-days", "2", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # the server side needs it too, to load an RSA-1024 key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 is deprecated: the point
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.load_cert_chain(cert, key)
    weak_der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    with py_tls_server(ctx) as server:
        result = probe(ProbeTarget("127.0.0.1", server.port, timeout_s=TIMEOUT_S))
    assert result.error is None, result.error
    assert result.tls_version == "TLSv1"
    assert result.presented_der == (weak_der,)


def test_alpn_negotiated_when_server_supports_it(pki: Pki) -> None:
    ctx = server_context(pki.server)
    ctx.set_alpn_protocols(["x-amzn-mqtt-ca", "mqtt"])
    with py_tls_server(ctx) as server:
        offered = probe(
            ProbeTarget("127.0.0.1", server.port, alpn=("x-amzn-mqtt-ca",), timeout_s=TIMEOUT_S)
        )
        silent = probe(ProbeTarget("127.0.0.1", server.port, timeout_s=TIMEOUT_S))
    assert offered.alpn == "x-amzn-mqtt-ca"
    assert silent.alpn is None


def test_sni_follows_host_unless_ip_literal(pki: Pki) -> None:
    with py_tls_server(server_context(pki.server)) as server:
        probe(ProbeTarget("127.0.0.1", server.port, timeout_s=TIMEOUT_S))
        probe(ProbeTarget("127.0.0.1", server.port, servername="broker.example", timeout_s=1))
    assert server.server_names == [None, "broker.example"]


# --- mTLS and MQTT -----------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("mqtt", [True, False])
def test_tls13_mtls_broker_without_client_cert_is_classified(
    pki: Pki, tmp_path: Path, mqtt: bool
) -> None:
    # TLS 1.3: our handshake completes; the broker's refusal arrives afterwards (an alert,
    # or a reset that swallowed it) and must still read as a client-certificate problem.
    with mosquitto(tmp_path, tls_listener("require_certificate true", pki=pki)) as broker:
        result = probe(ProbeTarget("127.0.0.1", broker.port, mqtt=mqtt, timeout_s=TIMEOUT_S))
    assert result.tls_version == "TLSv1.3"
    assert result.error_kind == "client_cert_required", result.error
    assert result.client_cert_requested is True
    assert result.mqtt_connack is None
    # Facts survive the failure: the broker's chain was seen before it refused us.
    assert result.presented_der == (pki.server.der, pki.intermediate.der)


@pytest.mark.parametrize("mqtt", [True, False])
def test_tls12_mtls_server_without_client_cert_fails_in_handshake(pki: Pki, mqtt: bool) -> None:
    # Mosquitto 2.0's tls_version is a floor, so a stdlib server stands in for a 1.2-only
    # broker: there the refusal is a handshake alert.
    ctx = server_context(pki.server)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki.root.cert_path)
    with py_tls_server(ctx) as server:
        result = probe(ProbeTarget("127.0.0.1", server.port, mqtt=mqtt, timeout_s=TIMEOUT_S))
    assert result.error_kind == "client_cert_required", result.error
    assert result.tls_version is None  # no session was established
    assert result.client_cert_requested is True
    assert result.presented_der == (pki.server.der, pki.intermediate.der)


@pytest.mark.broker
def test_untrusted_client_cert_is_rejected_not_required(pki: Pki, tmp_path: Path) -> None:
    rogue = issue(tmp_path, "rogue")  # self-signed, not under the broker's CA
    target = ProbeTarget(
        "127.0.0.1",
        0,
        client_cert=str(rogue.cert_path),
        client_key=str(rogue.key_path),
        mqtt=True,
        timeout_s=TIMEOUT_S,
    )
    with mosquitto(tmp_path, tls_listener("require_certificate true", pki=pki)) as broker:
        result = probe(replace(target, port=broker.port))
    assert result.error_kind == "client_cert_rejected", result.error


@pytest.mark.broker
def test_mtls_listener_with_client_cert_accepts_and_disconnects_cleanly(
    pki: Pki, tmp_path: Path
) -> None:
    lines = tls_listener("require_certificate true", pki=pki)
    target = ProbeTarget(
        "127.0.0.1",
        0,
        client_cert=str(pki.client.cert_path),
        client_key=str(pki.client.key_path),
        mqtt=True,
        mqtt_client_id="certmon-test",
        timeout_s=TIMEOUT_S,
    )
    with mosquitto(tmp_path, lines) as broker:
        result = probe(replace(target, port=broker.port))
        plain = probe(replace(target, port=broker.port, mqtt=False))
        time.sleep(0.1)  # let the broker write its log lines
        log = broker.log()
    assert result.error is None, result.error
    assert result.mqtt_connack == 0
    assert result.client_cert_requested is True
    assert plain.error is None, plain.error
    assert "Client certmon-test disconnected." in log
    assert "protocol error" not in log.lower()


@pytest.mark.broker
def test_mqtt_refused_by_broker_is_connack_not_tls_failure(pki: Pki, tmp_path: Path) -> None:
    lines = tls_listener("allow_anonymous false", pki=pki)
    with mosquitto(tmp_path, lines) as broker:
        result = probe(ProbeTarget("127.0.0.1", broker.port, mqtt=True, timeout_s=TIMEOUT_S))
        time.sleep(0.1)
        log = broker.log()
    assert result.error_kind == "mqtt_refused"
    assert result.mqtt_connack == 5
    assert result.mqtt_error == "not authorized"
    assert result.presented_der  # TLS itself was fine
    assert "Sending CONNACK to 127.0.0.1 (0, 5)" in log
    assert "protocol error" not in log.lower()


def test_tls_server_that_is_not_mqtt_gives_no_connack(pki: Pki) -> None:
    with py_tls_server(server_context(pki.server)) as server:
        target = ProbeTarget("127.0.0.1", server.port, mqtt=True, timeout_s=0.5)
        result = probe(target)
    assert result.error_kind == "mqtt_timeout"
    assert result.mqtt_connack is None
    assert result.presented_der == (pki.server.der, pki.intermediate.der)


def test_unreadable_client_cert_and_bad_port_are_data(tmp_path: Path) -> None:
    result = probe(ProbeTarget("127.0.0.1", 1, client_cert=str(tmp_path / "missing.pem")))
    assert result.error_kind == "client_cert_unusable"
    assert probe(ProbeTarget("127.0.0.1", 70000)).error_kind == "bad_target"


def test_connect_packet_golden_bytes() -> None:
    assert tlsprobe.encode_connect("certmon-scan") == bytes.fromhex(
        "101800044d5154540402000a000c636572746d6f6e2d7363616e"
    )
    long_id = "x" * 200  # remaining length needs two bytes (varint)
    assert tlsprobe.encode_connect(long_id)[:3] == b"\x10\xd4\x01"
    assert tlsprobe.DISCONNECT == b"\xe0\x00"


# --- failures as data, concurrency ---------------------------------------------------------


def test_connection_refused() -> None:
    result = probe(ProbeTarget("127.0.0.1", free_port(), timeout_s=TIMEOUT_S))
    assert result.error_kind == "connect_refused"
    assert result.presented_der == ()
    assert result.client_cert_requested is None


def test_dns_failure_is_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # No real lookup: tests talk only to loopback.
    def fail(*_args: object, **_kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    result = probe(ProbeTarget("broker.invalid", timeout_s=TIMEOUT_S))
    assert result.error_kind == "dns"


def test_black_hole_times_out_alone_in_probe_many(pki: Pki) -> None:
    # Accepts TCP (the kernel completes it from the backlog) but never answers the handshake.
    with (
        socket.create_server(("127.0.0.1", 0)) as hole,
        py_tls_server(server_context(pki.server)) as server,
    ):
        timeout_s = 1.0
        holes = [ProbeTarget("127.0.0.1", hole.getsockname()[1], timeout_s=timeout_s)] * 3
        good = [ProbeTarget("127.0.0.1", server.port, timeout_s=timeout_s)] * 4
        started = time.monotonic()
        results = probe_many([*holes, *good, ProbeTarget("127.0.0.1", free_port())])
        elapsed = time.monotonic() - started
    assert [r.error_kind for r in results] == ["handshake_timeout"] * 3 + [None] * 4 + [
        "connect_refused"
    ]
    assert all(r.target == t for r, t in zip(results, [*holes, *good], strict=False))
    assert timeout_s * 0.9 < elapsed < timeout_s * 1.8  # parallel, not 3 x timeout
    for r in results[3:7]:
        assert r.connect_s is not None and r.handshake_s is not None
        assert r.connect_s + r.handshake_s < 0.5


def test_probe_many_keeps_at_most_concurrency_probes_in_flight() -> None:
    with socket.create_server(("127.0.0.1", 0)) as hole:
        timeout_s = 0.3
        holes = [ProbeTarget("127.0.0.1", hole.getsockname()[1], timeout_s=timeout_s)] * 3
        started = time.monotonic()
        one_at_a_time = probe_many(holes, concurrency=1)
        serial_s = time.monotonic() - started
        started = time.monotonic()
        together = probe_many(holes, concurrency=3)
        parallel_s = time.monotonic() - started
    assert [r.error_kind for r in one_at_a_time + together] == ["handshake_timeout"] * 6
    assert serial_s >= 3 * timeout_s * 0.95  # one after the other
    assert parallel_s < 2.5 * timeout_s  # side by side, with room for a loaded machine


def test_probe_many_looks_names_up_beside_its_loop_and_a_failed_lookup_is_data(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # probe_many polls every probe's socket from one thread; a name lookup cannot be
    # polled, so it runs on a resolver thread. Here one lookup answers only once
    # another probe's handshake has reached the server: a lookup that blocked the loop
    # would wait for that in vain.
    real = socket.getaddrinfo
    with py_tls_server(server_context(pki.server)) as server:
        def lookup(host: str, *args: object, **kwargs: object) -> object:
            if host == "broker.invalid":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            if host == "late.test":
                assert kit_broker.wait_until(lambda: server.server_names, 5.0)
                return real("127.0.0.1", *args, **kwargs)  # type: ignore[arg-type]
            return real(host, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(socket, "getaddrinfo", lookup)
        late, invalid, literal = probe_many([
            ProbeTarget("late.test", server.port, timeout_s=TIMEOUT_S),
            ProbeTarget("broker.invalid", server.port, timeout_s=TIMEOUT_S),
            ProbeTarget("127.0.0.1", server.port, timeout_s=TIMEOUT_S)])
    assert literal.error is None and literal.presented_der[0] == pki.server.der
    assert invalid.error_kind == "dns" and "broker.invalid" in (invalid.error or "")
    assert late.error is None and late.presented_der[0] == pki.server.der
    assert server.server_names[0] is None  # the literal's handshake (no SNI) came first
    assert "late.test" in server.server_names


def test_ipv6_loopback(pki: Pki) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with py_tls_server(server_context(pki.server), "::1", socket.AF_INET6) as server:
        result = probe(ProbeTarget("::1", server.port, timeout_s=TIMEOUT_S))
        bracketed = probe(ProbeTarget("[::1]", server.port, timeout_s=TIMEOUT_S))
    assert result.error is None, result.error
    assert result.address == "::1"
    assert bracketed.address == "::1"
    assert server.server_names == [None, None]


# --- a port that does not speak TLS ----------------------------------------------------------


def test_plain_mqtt_port_is_named_not_a_tls_failure(tmp_path: Path) -> None:
    """`certmon-scan 127.0.0.1:1883`: Mosquitto resets a ClientHello on a plain listener;
    the follow-up plain CONNECT gets a CONNACK, so the probe says what the port is."""
    with mosquitto(tmp_path, []) as broker:
        for mqtt in (False, True):
            result = probe(ProbeTarget("127.0.0.1", broker.port, mqtt=mqtt, timeout_s=TIMEOUT_S))
            assert result.error_kind == "not_tls", result
            assert result.error == (
                f"127.0.0.1:{broker.port} does not speak TLS: it answers MQTT without TLS "
                "(CONNACK 0 to a plain CONNECT); use mqtt:// for it, or the broker's TLS "
                "listener (usually port 8883)")
            assert result.presented_der == () and result.tls_version is None
        time.sleep(0.1)
        log = broker.log()
    # The ClientHello is the broker's "protocol error"; the plain CONNECT ends cleanly.
    assert log.count("Sending CONNACK to certmon-scan (0, 0)") == 2
    assert log.count("Received DISCONNECT from certmon-scan") == 2


@contextmanager
def raw_server(reply: bytes | None) -> Iterator[int]:
    """A TCP server that sends `reply` on connect (a banner, like SSH) then closes, or,
    with None, closes at once without a word."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(3)

        def serve() -> None:
            for _ in range(2):  # the handshake attempt and the plain-CONNECT follow-up
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    if reply is not None:
                        conn.sendall(reply)
                        time.sleep(0.05)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        thread.join(5)


def test_a_banner_instead_of_tls_is_not_tls_and_a_silent_close_stays_a_handshake_failure() -> None:
    with raw_server(b"SSH-2.0-OpenSSH_9.2p1\r\n") as port:
        result = probe(ProbeTarget("127.0.0.1", port, timeout_s=TIMEOUT_S))
    assert result.error_kind == "not_tls"
    assert "answered the ClientHello with non-TLS data" in (result.error or "")
    with raw_server(None) as port:
        result = probe(ProbeTarget("127.0.0.1", port, timeout_s=TIMEOUT_S))
    # Nothing says "not TLS" here (no CONNACK, no bytes): no claim either way.
    assert result.error_kind == "handshake_failed"
