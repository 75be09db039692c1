"""Keys that never leave the hardware (issue 16): a P-256 key generated on a SoftHSM2
token signs certmon's JWS through certmon.pki.token, the signature verifies under the
certificate's key, a token key that does not match its certificate is KEY_MISMATCH,
and a wrong PIN, a missing module or a missing key is a clear finding that never
shows the PIN. A fresh token per test (softhsm2-util, its own token directory)."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import missing
from kit.pki import PKIFactory
from kit.softhsm import PIN, SoftHsm, Token, find_module

from certmon import pki as cpki
from certmon import wire as p
from certmon.errors import PKIError
from certmon.pki.token import TokenKey, load_token_key, parse_token_uri


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    module = find_module()
    if module is None:
        missing("SoftHSM2 not installed (apt install softhsm2)")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        missing("python-pkcs11 not installed (pip install 'certmon[pkcs11]')")
    return SoftHsm(tmp_path_factory.mktemp("softhsm"), module)


@pytest.fixture
def token(hsm: SoftHsm) -> Token:
    return hsm.token()


@pytest.fixture
def loaded(token: Token) -> Iterator[tuple[cpki.KeyFacts, TokenKey]]:
    facts, findings, key = load_token_key(token.uri(), module_path=token.module,
                                          pin_file=token.pin_file)
    assert findings == [] and key is not None and facts is not None
    yield facts, key
    key.close()


@pytest.fixture
def key(loaded: tuple[cpki.KeyFacts, TokenKey]) -> TokenKey:
    return loaded[1]


def test_a_status_signed_on_the_token_verifies_under_its_certificate(
        pki: PKIFactory, loaded: tuple[cpki.KeyFacts, TokenKey]) -> None:
    facts_of_key, key = loaded
    root = pki.root("token test root")
    leaf = pki.leaf(root, "gw-hsm-01", key=key)  # the certificate of the token's key
    token = p.sign_jws(b'{"device_id":"gw-hsm-01"}', key, leaf.cert)
    parsed = p.parse_jws(token, p.MAX_STATUS_JWS_BYTES)
    assert parsed.alg == "ES256"
    p.verify_jws(parsed, leaf.cert.public_key())  # raises on a bad signature
    facts = cpki.facts_from_cert(leaf.cert)
    # The facts load_token_key returned, not ones rebuilt here.
    assert facts_of_key.mode is None and facts_of_key.key_bits == 256
    assert cpki.key_findings(facts_of_key, facts,
                             cpki.spki_sha256(leaf.cert.public_key())) == []


def test_a_token_key_that_is_not_the_certificates_is_key_mismatch(
        pki: PKIFactory, loaded: tuple[cpki.KeyFacts, TokenKey]) -> None:
    facts, key = loaded
    root = pki.root("token test root")
    other = pki.leaf(root, "gw-hsm-01")  # a file key's certificate
    assert facts.mode is None  # no file: no permission finding
    (finding,) = cpki.key_findings(facts, cpki.facts_from_cert(other.cert),
                                  cpki.spki_sha256(other.cert.public_key()))
    assert finding.code == cpki.FindingCode.KEY_MISMATCH
    with pytest.raises(PKIError, match="does not match"):
        p.sign_jws(b"{}", key, other.cert)  # caught on the device, not at the collector


def test_the_key_never_leaves_the_token(key: TokenKey) -> None:
    from cryptography.hazmat.primitives import serialization

    with pytest.raises(TypeError, match="stays on its token"):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    with pytest.raises(TypeError, match="stays on its token"):
        key.private_numbers()
    with pytest.raises(TypeError, match="stays on its token"):
        pickle.dumps(key)


def test_wrong_pin_missing_module_missing_key_are_findings_without_the_pin(
        hsm: SoftHsm, token: Token, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("0000-not-it\n")
    cases = {
        "the PIN is incorrect": load_token_key(token.uri(), module_path=token.module,
                                               pin_file=wrong),
        "cannot load PKCS#11 module": load_token_key(
            token.uri(), module_path=str(tmp_path / "no-such-module.so"),
            pin_file=token.pin_file),
        "no such key pair": load_token_key(
            token.uri().replace("object=status-signing", "object=absent"),
            module_path=token.module, pin_file=token.pin_file),
        "no such token": load_token_key(token.uri().replace(token.label, "t-absent"),
                                   module_path=token.module, pin_file=token.pin_file),
        "cannot read the PIN file": load_token_key(token.uri(), module_path=token.module,
                                                   pin_file=tmp_path / "absent.pin"),
        "no PKCS#11 module": load_token_key(token.uri(), pin_file=token.pin_file),
        "needs a PIN": load_token_key(token.uri(), module_path=token.module),
    }
    for expected, (facts, findings, loaded) in cases.items():
        assert facts is None and loaded is None, expected
        (finding,) = findings
        assert finding.code == cpki.FindingCode.KEY_UNREADABLE, expected
        assert expected in finding.message, (expected, finding.message)
        assert PIN not in finding.message and "0000-not-it" not in finding.message
    assert PIN not in caplog.text


def test_module_and_pin_may_come_from_the_uri(token: Token) -> None:
    uri = token.uri(**{"module-path": token.module, "pin-source": f"file:{token.pin_file}"})
    facts, findings, loaded = load_token_key(uri)
    assert findings == [] and loaded is not None and facts is not None
    loaded.close()


def test_uris_certmon_cannot_honour_are_refused_by_name() -> None:
    assert parse_token_uri("pkcs11:token=a%20b;id=%01%02").id == b"\x01\x02"
    assert parse_token_uri("pkcs11:token=a%20b;object=k").token == "a b"
    for uri, why in (("pkcs11:token=t", "names no key"),
                     ("pkcs11:object=k;slot-id=1", "unsupported pkcs11 URI attribute .slot-id."),
                     ("pkcs11:object=k;type=cert", "type must be private"),
                     ("pkcs11:object=k?pin-value=1234", "use pin-source"),
                     ("pkcs11:object=k;object=j", "given twice")):
        with pytest.raises(ValueError, match=why):
            parse_token_uri(uri)
    facts, findings, _ = load_token_key("pkcs11:object=k?pin-value=1234")
    assert facts is None and "1234" not in findings[0].message


def test_no_log_line_carries_the_pin(token: Token, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        _, _, loaded = load_token_key(token.uri(), module_path=token.module,
                                      pin_file=token.pin_file)
        assert loaded is not None
        loaded.sign(b"x", pki_ecdsa())
        loaded.close()
    assert PIN not in caplog.text


def pki_ecdsa() -> object:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.ECDSA(hashes.SHA256())


def test_a_second_login_is_refused_not_accepted_unchecked(
        token: Token, key: TokenKey, tmp_path: Path) -> None:
    """PKCS#11 logs in per process: with a key of the token loaded, a load with a
    wrong PIN (or none) would succeed unchecked. It is a finding instead, and the
    loaded key keeps signing."""
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("0000-not-it\n")
    wrong.chmod(0o600)
    for pin_file in (wrong, token.pin_file):
        facts, findings, again = load_token_key(token.uri(), module_path=token.module,
                                                pin_file=pin_file)
        assert facts is None and again is None
        assert "already logged in by this process" in findings[0].message
    key.sign(b"still", pki_ecdsa())  # type: ignore[arg-type]


def test_a_closed_or_inherited_key_refuses_to_sign(token: Token) -> None:
    import os

    _facts, _, key = load_token_key(token.uri(), module_path=token.module,
                                   pin_file=token.pin_file)
    assert key is not None
    pid = os.fork()
    if pid == 0:  # a forked child must load its own: the session is the parent's
        try:
            key.sign(b"x", pki_ecdsa())  # type: ignore[arg-type]
            os._exit(1)
        except PKIError as exc:
            os._exit(0 if "loaded in another process" in str(exc) else 2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    key.close()
    with pytest.raises(PKIError, match="session is closed"):
        key.sign(b"x", pki_ecdsa())  # type: ignore[arg-type]


def test_a_key_by_id_on_a_token_by_serial(hsm: SoftHsm, token: Token) -> None:
    import pkcs11

    serial = pkcs11.lib(token.module).get_token(token_label=token.label).serial
    serial = serial.decode() if isinstance(serial, bytes) else serial
    id_hex = "".join(f"%{b:02x}" for b in token.key_id)
    facts, findings, key = load_token_key(
        f"pkcs11:serial={serial.strip()};id={id_hex}", module_path=token.module,
        pin_file=token.pin_file)
    assert findings == [] and key is not None and facts is not None
    key.close()


def test_pin_files_no_pin_and_pin_sources_said_without_the_pin(
        token: Token, tmp_path: Path) -> None:
    _, findings, key = load_token_key(token.uri(), module_path=token.module)
    assert key is None and "needs a PIN" in findings[0].message
    loose = tmp_path / "loose.pin"
    loose.write_text(PIN)
    loose.chmod(0o644)
    _, findings, key = load_token_key(token.uri(), module_path=token.module,
                                          pin_file=loose)
    assert key is not None and [f.code for f in findings] == [cpki.FindingCode.KEY_PERMISSIONS]
    key.close()
    # A PIN typed where its file belongs is not shown back.
    _facts, findings, key = load_token_key(token.uri(**{"pin-source": "/4711-certmon"}),
                                          module_path=token.module)
    assert key is None and "4711-certmon" not in findings[0].message
    with pytest.raises(ValueError, match="absolute path"):
        parse_token_uri("pkcs11:object=k?pin-source=pin.txt")
    assert parse_token_uri("pkcs11:object=k?pin-source=file:///run/p").pin_source == "/run/p"
    assert parse_token_uri("PKCS11:object=k").object == "k"


def device_with_token_signing_cert(fleet: Any, token: Token, device: str,
                                   tmp_path: Path) -> tuple[Any, Any]:
    """A device's TLS credentials, and a signing certificate the fleet CA issued for the
    token's public key (loaded, used and closed here: the agent logs in itself)."""
    creds = fleet.device_credentials(device, tmp_path / "tls", days=300)
    _, _, on_token = load_token_key(token.uri(), module_path=token.module,
                                    pin_file=token.pin_file)
    assert on_token is not None
    signing = fleet.pki.leaf(fleet.devices_ca, device, key=on_token, days=120,
                             name=f"{device}-signing")
    on_token.close()
    return creds, signing


def test_an_agent_signs_its_status_on_the_token_and_the_collector_verifies_it(
        hsm: SoftHsm, token: Token, fleet_broker: Any, collector: Any, tmp_path: Path) -> None:
    """The must-show: `tls.signing_key_uri` names the token key; `certmon-agent once`
    signs the status on SoftHSM2, the collector verifies it through the real broker
    against the signing certificate the fleet CA issued for the token's public key."""
    import subprocess
    import sys

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from kit.broker import wait_until

    from collector.store import CertRole

    device = "gw-hsm-e2e"
    creds, signing = device_with_token_signing_cert(fleet_broker, token, device, tmp_path)
    signing_cert = tmp_path / "signing.crt"
    signing_cert.write_bytes(signing.cert_pem() + fleet_broker.devices_ca.cert_pem())

    def agent(command: str, pin_file: Path) -> subprocess.CompletedProcess[str]:
        config = tmp_path / f"agent-{command}.toml"
        config.write_text(f"""
[mqtt]
broker = "mqtts://127.0.0.1:{fleet_broker.mtls_port}"
[tls]
ca_bundle = "{creds.ca_bundle_path}"
cert = "{creds.cert_path}"
key = "{creds.key_path}"
signing_cert = "{signing_cert}"
signing_key_uri = "{token.uri()}"
pkcs11_module = "{token.module}"
pkcs11_pin_file = "{pin_file}"
[agent]
state_dir = "{tmp_path / 'state'}"
""")
        extra = ["--timeout-s", "20"] if command == "once" else ["--json"]
        return subprocess.run([sys.executable, "-m", "agent.cli", command, "--config",
                               str(config), *extra], capture_output=True, text=True,
                              timeout=60)

    done = agent("once", token.pin_file)
    assert done.returncode in (0, 1), done.stderr  # 1: a warning (no clock sync here)
    assert PIN not in done.stdout + done.stderr
    store = collector.store
    assert wait_until(lambda: (row := store.device(device)) is not None
                      and row.status_json is not None, 15), dict(collector.ingestor.rejected)
    signer_sha = x509.load_pem_x509_certificate(signing.cert_pem()).fingerprint(
        hashes.SHA256()).hex()
    assert (CertRole.SIGNING, signer_sha) in {
        (link.role, link.cert.sha256) for link in store.device_certs(device)}

    # A wrong PIN: a clear finding from `check`, never the PIN, never a traceback.
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("0000-not-it\n")
    wrong.chmod(0o600)
    checked = agent("check", wrong)
    assert "token login failed: the PIN is incorrect" in checked.stdout, checked.stderr
    assert "0000-not-it" not in checked.stdout + checked.stderr
    # UNKNOWN, as for any input the check could not look at (docs/check.md).
    assert "Traceback" not in checked.stderr and checked.returncode == 3
    # ... and the agent keeps reporting: signed with its TLS key, the status says why
    # the signing key is missing, and the collector stores it (an alert, not silence).
    seq_before = store.device(device).seq  # type: ignore[union-attr]
    again = agent("once", wrong)
    assert again.returncode == 0, again.stderr  # `once`: delivered
    assert wait_until(lambda: (row := store.device(device)) is not None
                      and row.seq is not None and row.seq > seq_before, 15), \
        dict(collector.ingestor.rejected)
    row = store.device(device)
    assert row is not None and any(
        f.code == "KEY_UNREADABLE" and "token login failed" in f.message for f in row.findings)
    assert "0000-not-it" not in (row.status_json or "")


def test_the_token_settings_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from certmon.config import loads
    from certmon.errors import ConfigError

    pem = tmp_path / "x.pem"
    pem.write_text("x")
    base = {"mqtt.broker": "mqtts://127.0.0.1:8883", "tls.ca_bundle": str(pem),
            "tls.cert": str(pem), "tls.key": str(pem), "tls.signing_cert": str(pem)}
    cases = {
        "needs a module": {"tls.signing_key_uri": "pkcs11:object=k"},
        "not both": {"tls.signing_key_uri": "pkcs11:object=k", "tls.signing_key": str(pem),
                     "tls.pkcs11_module": str(pem)},
        "names no key": {"tls.signing_key_uri": "pkcs11:token=t",
                         "tls.pkcs11_module": str(pem)},
    }
    for why, extra in cases.items():
        with pytest.raises(ConfigError, match=why):
            loads(AgentConfig, "", overrides={**base, **extra})
    ok = loads(AgentConfig, "", overrides={**base, "tls.signing_key_uri":
                                           f"pkcs11:object=k?module-path={pem}"})
    assert ok.tls.signing_key_uri is not None and ok.tls.watched()[-1] == pem


def test_the_signing_certificate_may_live_on_the_token(
        hsm: SoftHsm, token: Token, fleet_broker: Any, collector: Any, tmp_path: Path) -> None:
    """No `tls.signing_cert`: the agent reads the key's certificate (same CKA_ID) and
    the CA certificates stored beside it on the token, and signs with that chain."""
    import subprocess
    import sys

    from cryptography.hazmat.primitives import serialization
    from kit.broker import wait_until
    from kit.softhsm import store_certificates

    device = "gw-hsm-cert"
    creds, signing = device_with_token_signing_cert(fleet_broker, token, device, tmp_path)
    der = serialization.Encoding.DER
    store_certificates(token, signing.cert.public_bytes(der),
                       [fleet_broker.devices_ca.cert.public_bytes(der)])
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[mqtt]
broker = "mqtts://127.0.0.1:{fleet_broker.mtls_port}"
[tls]
ca_bundle = "{creds.ca_bundle_path}"
cert = "{creds.cert_path}"
key = "{creds.key_path}"
signing_key_uri = "{token.uri()}"
pkcs11_module = "{token.module}"
pkcs11_pin_file = "{token.pin_file}"
[agent]
state_dir = "{tmp_path / 'state'}"
""")
    done = subprocess.run([sys.executable, "-m", "agent.cli", "once", "--config", str(config),
                           "--timeout-s", "20"], capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr
    store = collector.store
    assert wait_until(lambda: (row := store.device(device)) is not None
                      and row.status_json is not None, 15), dict(collector.ingestor.rejected)
    from collector.store import CertRole

    roles = {link.role for link in store.device_certs(device)}
    assert CertRole.SIGNING in roles


def test_no_certificate_anywhere_is_a_finding(token: Token, tmp_path: Path) -> None:
    from agent.certstore import read_material

    pem = tmp_path / "ca.pem"
    pem.write_text("")
    material = read_material(pem, signing_key_uri=token.uri(), pkcs11_module=token.module,
                             pkcs11_pin_file=token.pin_file)
    assert material.signing is not None and material.signer() is None  # nothing to sign with
    (finding,) = material.signing.bundle.findings
    assert "no certificate stored on the token" in finding.message
