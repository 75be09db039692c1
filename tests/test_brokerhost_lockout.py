"""The failure certmon's CRL rule forecasts is real: with `crlfile` set, Mosquitto
refuses a valid client once the CRL's nextUpdate has passed, and accepts the very
same client with a fresh CRL. One broker, restarted between the two CRLs; the client
is certmon's own TLS probe doing a full MQTT CONNECT with its certificate.

The forecast: judged at a moment when the expiring CRL was still current, certmon
named the instant from which the broker refuses every client; the broker, started
after that instant, refuses.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import MosquittoFactory
from kit.broker import Listener, wait_until
from kit.pki import Issued, PKIFactory, write_bundle, write_crls
from OpenSSL import crypto

from agent.brokerhost import mosquitto
from agent.brokerhost.inventory import inspect_broker
from certmon import pki
from certmon.pki.crl import crl_findings, read_crls
from certmon.tlsprobe import ProbeTarget, probe

NOW = datetime.now(UTC).replace(microsecond=0)


def test_expired_crl_locks_out_a_valid_client_and_certmon_said_when(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    factory = PKIFactory(NOW)
    root = factory.root("Lockout Root")
    server = factory.leaf(root, "broker.test", usage="server", sans=["127.0.0.1"])
    client = factory.leaf(root, "gw-valid", usage="client")  # valid, never revoked
    cert, key = server.write(tmp_path / "server")
    client_cert, client_key = client.write(tmp_path / "client")
    cafile = write_bundle(tmp_path / "ca.pem", [root])
    crlfile = tmp_path / "devices.crl"
    fresh = factory.crl(root, this_update=NOW - timedelta(hours=1),
                        next_update=NOW + timedelta(days=2))
    lapsed_at = NOW - timedelta(hours=1)
    lapsed = factory.crl(root, this_update=NOW - timedelta(days=8), next_update=lapsed_at,
                         number=2)
    write_crls(crlfile, [fresh])
    broker = mosquitto_factory([Listener(
        tls=True, certfile=cert, keyfile=key, cafile=cafile, require_certificate=True,
        extra=f"crlfile {crlfile}")])

    def connect() -> tuple[int | None, str | None]:
        seen = probe(ProbeTarget(host="127.0.0.1", port=broker.port, mqtt=True,
                                 client_cert=str(client_cert), client_key=str(client_key),
                                 mqtt_client_id="gw-valid", timeout_s=5.0))
        return seen.mqtt_connack, seen.error_kind

    assert connect() == (0, None), broker.log_text()

    write_crls(crlfile, [lapsed])
    broker.restart()
    connack, error_kind = connect()
    assert connack is None and error_kind == "client_cert_rejected", broker.log_text()
    # The broker logs the refusal as it closes the socket: waited for, not read once.
    assert wait_until(lambda: "certificate verify failed" in broker.log_text(), 5), \
        broker.log_text()

    # certmon's forecast, made two days before the broker refused: the instant.
    cas = pki.read_bundle(cafile).certs
    facts = read_crls(crlfile, cas).crls[0]
    before = crl_findings(facts, NOW - timedelta(days=2), pki.Policy())
    assert [(f.code, f.severity) for f in before] == [
        (pki.FindingCode.CRL_EXPIRING, pki.Severity.CRITICAL)]
    assert (f"a broker using it refuses every client from {pki.iso_utc(lapsed_at)}"
            in before[0].message)
    after = crl_findings(facts, NOW, pki.Policy())
    assert [f.code for f in after] == [pki.FindingCode.CRL_EXPIRED]

    # And back: a fresh CRL lets the same client in again.
    write_crls(crlfile, [fresh])
    broker.restart()
    assert connect() == (0, None), broker.log_text()


def test_a_trusted_ca_without_a_crl_locks_out_its_clients_and_certmon_says_so(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    """With crlfile set, OpenSSL needs a CRL from the issuer of every client
    certificate: a second CA added to cafile without its CRL locks out its clients."""
    factory = PKIFactory(NOW)
    old_ca, new_ca = factory.root("Old Devices CA"), factory.root("New Devices CA")
    server = factory.leaf(old_ca, "broker.test", usage="server")
    cert, key = server.write(tmp_path / "server")
    cafile = write_bundle(tmp_path / "ca.pem", [old_ca, new_ca])
    crlfile = write_crls(tmp_path / "devices.crl", [factory.crl(
        old_ca, this_update=NOW - timedelta(hours=1), next_update=NOW + timedelta(days=60))])
    broker = mosquitto_factory([Listener(
        tls=True, certfile=cert, keyfile=key, cafile=cafile, require_certificate=True,
        extra=f"crlfile {crlfile}")])

    def connects(issuer: Issued, name: str) -> bool:
        c, k = factory.leaf(issuer, name).write(tmp_path / name)
        seen = probe(ProbeTarget(host="127.0.0.1", port=broker.port, mqtt=True,
                                 client_cert=str(c), client_key=str(k), mqtt_client_id=name))
        return seen.mqtt_connack == 0

    assert connects(old_ca, "gw-old")
    assert not connects(new_ca, "gw-new"), broker.log_text()
    report = inspect_broker(mosquitto.read_config(broker.conf_path), NOW, pki.Policy(),
                            prober=None)
    (missing,) = [f for f in report.findings if f.code == pki.FindingCode.CRL_MISSING]
    assert missing.subject == "CN=New Devices CA" and missing.severity == pki.Severity.WARNING
    assert missing.message.startswith(f"{broker.conf_path}:")
    # Its CRL added: its clients connect, and certmon is content.
    write_crls(crlfile, [
        factory.crl(old_ca, this_update=NOW - timedelta(hours=1),
                    next_update=NOW + timedelta(days=60)),
        factory.crl(new_ca, this_update=NOW - timedelta(hours=1),
                    next_update=NOW + timedelta(days=60))])
    broker.restart()
    assert connects(new_ca, "gw-new-2")
    report = inspect_broker(mosquitto.read_config(broker.conf_path), NOW, pki.Policy(),
                            prober=None)
    assert report.findings == ()


def test_a_capath_ca_without_its_hashed_name_is_invisible_and_certmon_says_so(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    """OpenSSL looks capath certificates up by `<subject hash>.N` only: a CA copied in
    without `openssl rehash` is not there for it, and its clients are refused."""
    factory = PKIFactory(NOW)
    root = factory.root("Capath Root")
    cert, key = factory.leaf(root, "broker.test", usage="server").write(tmp_path / "server")
    capath = tmp_path / "capath"
    write_bundle(capath / "capath-root.pem", [root])
    broker = mosquitto_factory([Listener(
        tls=True, certfile=cert, keyfile=key, require_certificate=True,
        extra=f"capath {capath}")])
    client_cert, client_key = factory.leaf(root, "gw-capath").write(tmp_path / "client")

    def connects() -> bool:
        seen = probe(ProbeTarget(host="127.0.0.1", port=broker.port, mqtt=True,
                                 client_cert=str(client_cert), client_key=str(client_key),
                                 mqtt_client_id="gw-capath"))
        return seen.mqtt_connack == 0

    def findings() -> list[pki.Finding]:
        return list(inspect_broker(mosquitto.read_config(broker.conf_path), NOW,
                                   pki.Policy(), prober=None).findings)

    assert not connects(), broker.log_text()
    (unhashed,) = findings()
    digest = f"{crypto.X509.from_cryptography(root.cert).subject_name_hash():08x}"
    assert f"is not under its hashed name {digest}.0" in unhashed.message
    (capath / f"{digest}.0").symlink_to("capath-root.pem")  # what `openssl rehash` does
    broker.restart()
    assert connects()
    assert findings() == []

