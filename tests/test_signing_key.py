"""A dedicated status-signing key (`tls.signing_cert` / `tls.signing_key`), end to end.

Some fleets keep the TLS key for the broker and sign reports with a second key (a
separate lifetime, or one day a key that never leaves a secure element). The agent
must then sign with that key and publish its certificate on the cert topic; the
collector verifies identity and chain for it exactly as for a TLS certificate, and
stores the device's client certificate beside it in its own role.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import DeviceCreds, Fleet
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from kit.broker import wait_until
from kit.mqttprobe import MqttProbe

from certmon import wire as p
from collector.store import CertRole


def agent_toml(fleet: Fleet, creds: DeviceCreds, signing_cert: Path, signing_key: Path,
               tmp: Path) -> Path:
    """An agent config with a dedicated signing pair beside the TLS pair."""
    config = tmp / "agent.toml"
    config.write_text(f"""
[mqtt]
broker = "mqtts://127.0.0.1:{fleet.mtls_port}"
[tls]
ca_bundle = "{creds.ca_bundle_path}"
cert = "{creds.cert_path}"
key = "{creds.key_path}"
signing_cert = "{signing_cert}"
signing_key = "{signing_key}"
[agent]
state_dir = "{tmp / 'state'}"
""")
    return config


def agent_once(fleet: Fleet, creds: DeviceCreds, signing_cert: Path, signing_key: Path,
               tmp: Path) -> subprocess.CompletedProcess[str]:
    config = agent_toml(fleet, creds, signing_cert, signing_key, tmp)
    return subprocess.run([sys.executable, "-m", "agent.cli", "once", "--config", str(config),
                           "--timeout-s", "20"], capture_output=True, text=True, timeout=60)


def clear_retained(fleet: Fleet, creds: DeviceCreds) -> None:
    """Empty the device's retained topics: the broker is shared by the whole session and
    a later collector must not meet these statuses (or their rejections) again."""
    probe = MqttProbe(f"clear-{creds.device_id}", ca_certs=str(creds.ca_bundle_path),
                      certfile=str(creds.cert_path), keyfile=str(creds.key_path))
    probe.connect(fleet.mtls_port)
    try:
        for kind in p.TopicKind:
            info = probe.client.publish(p.device_topic(p.DEFAULT_PREFIX, creds.device_id, kind),
                                        b"", qos=1, retain=True)
            info.wait_for_publish(5)
    finally:
        probe.client.disconnect()
        probe.client.loop_stop()


def signing_pair(fleet: Fleet, cn: str, tmp: Path, issuer: Any = None) -> tuple[Path, Path]:
    leaf = fleet.pki.leaf(issuer or fleet.devices_ca, cn, days=120, name=f"{cn}-signing")
    return leaf.write(tmp / "signing", chain=True)


def test_statuses_are_signed_with_the_dedicated_key_and_the_collector_stores_them(
    fleet_broker: Fleet, collector: Any, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("gw-signer", tmp_path / "tls", days=300)
    signing_cert, signing_key = signing_pair(fleet_broker, "gw-signer", tmp_path)
    probe_creds = fleet_broker.collector_credentials(tmp_path / "probe", cn="collector")
    probe = MqttProbe("test-signing-watch", ca_certs=str(probe_creds.ca_bundle_path),
                      certfile=str(probe_creds.cert_path), keyfile=str(probe_creds.key_path))
    probe.connect(fleet_broker.operations_port)
    probe.subscribe(p.device_topic_filter(p.DEFAULT_PREFIX))
    try:
        done = agent_once(fleet_broker, creds, signing_cert, signing_key, tmp_path)
        assert done.returncode == 0, done.stderr

        def last(kind: p.TopicKind) -> bytes | None:
            topic = p.device_topic(p.DEFAULT_PREFIX, "gw-signer", kind)
            found = [m for t, m, _ in list(probe.messages) if t == topic]
            return found[-1] if found else None

        assert wait_until(lambda: last(p.TopicKind.STATUS) and last(p.TopicKind.CERT), 10)
        signer = x509.load_pem_x509_certificates(signing_cert.read_bytes())[0]
        tls_leaf = x509.load_pem_x509_certificates(creds.cert_path.read_bytes())[0]
        parsed = p.parse_jws(last(p.TopicKind.STATUS) or b"", p.MAX_STATUS_JWS_BYTES)
        assert parsed.cert_sha256 == signer.fingerprint(hashes.SHA256()).hex()
        p.verify_jws(parsed, signer.public_key())  # the signing key, not the TLS key
        status = p.decode_status(parsed.payload)
        assert status.client is not None
        assert status.client.sha256 == tls_leaf.fingerprint(hashes.SHA256()).hex()
        cert_msg = p.decode_message(p.CertMessage, last(p.TopicKind.CERT) or b"")
        assert cert_msg.certificates()[0] == signer
        assert cert_msg.certificates(client=True)[0] == tls_leaf

        store = collector.store
        # Other tests' devices have retained statuses on this broker too: wait for ours.
        assert wait_until(lambda: (row := store.device("gw-signer")) is not None
                          and row.status_json is not None, 10), dict(collector.ingestor.rejected)
        roles = {(link.role, link.cert.sha256) for link in store.device_certs("gw-signer")}
        assert (CertRole.SIGNING, parsed.cert_sha256) in roles
        assert (CertRole.CLIENT, status.client.sha256) in roles
        assert store.device("gw-signer").client_sha256 == status.client.sha256
    finally:
        probe.client.disconnect()
        probe.client.loop_stop()
        clear_retained(fleet_broker, creds)


def test_a_signing_cert_outside_the_fleet_ca_or_naming_another_device_is_rejected(
    fleet_broker: Fleet, collector: Any, tmp_path: Path
) -> None:
    # A signing certificate from a CA the collector does not trust as a fleet CA.
    rogue_root = fleet_broker.pki.root("rogue signing root", name="rogue-signing-root")
    outsider = fleet_broker.device_credentials("gw-outsider", tmp_path / "o", days=300)
    cert, key = signing_pair(fleet_broker, "gw-outsider", tmp_path / "o", issuer=rogue_root)
    assert agent_once(fleet_broker, outsider, cert, key, tmp_path / "o").returncode == 0
    # A fleet-issued signing certificate, but for another device id.
    borrower = fleet_broker.device_credentials("gw-borrower", tmp_path / "b", days=300)
    cert, key = signing_pair(fleet_broker, "gw-lender", tmp_path / "b")
    assert agent_once(fleet_broker, borrower, cert, key, tmp_path / "b").returncode == 0

    try:
        rejected = collector.ingestor.rejected
        assert wait_until(lambda: rejected["untrusted_cert"] >= 2
                          and rejected["identity_mismatch"] >= 2, 10), dict(rejected)
        for device_id in ("gw-outsider", "gw-borrower"):
            row = collector.store.device(device_id)  # known as online (broker-attested),
            assert row is None or row.status_json is None  # but no status of theirs stored
    finally:
        clear_retained(fleet_broker, outsider)
        clear_retained(fleet_broker, borrower)


def test_check_with_a_config_judges_the_signing_pair_too(
    fleet_broker: Fleet, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("gw-check-signer", tmp_path / "tls", days=300)
    signing_cert, _ = signing_pair(fleet_broker, "gw-check-signer", tmp_path)
    # The TLS key is not the signing certificate's key.
    config = agent_toml(fleet_broker, creds, signing_cert, creds.key_path, tmp_path)
    done = subprocess.run([sys.executable, "-m", "agent.cli", "check", "--config", str(config),
                           "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    mismatch = [f for f in json.loads(done.stdout)["findings"] if f["code"] == "KEY_MISMATCH"]
    assert len(mismatch) == 1 and str(signing_cert) in mismatch[0]["message"]


def test_a_client_certificate_renewed_under_the_same_signing_key_replaces_the_stored_one(
    tmp_path: Path
) -> None:
    # The signing certificate outlives the TLS one: the collector must follow the
    # client certificate's renewal although every status has the same signer.
    import dataclasses
    from datetime import UTC, datetime

    from kit.fleet import make_ca, make_device, status

    from certmon.mqtt import Incoming
    from collector.ingest import Ingestor
    from collector.store import open_store
    from collector.verify import CertCache

    now = datetime.now(UTC)
    root = make_ca("signing-renewal root", now)
    signer = make_device(root, "gw-renew", now, days=3000)
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    store.migrate()
    ingest = Ingestor(store, CertCache([root.cert]), now=lambda: now)
    try:
        for seq, tls in enumerate([make_device(root, "gw-renew-tls-1", now, days=90),
                                   make_device(root, "gw-renew-tls-2", now, days=90)], 1):
            body = dataclasses.replace(status(tls, seq, now), device_id="gw-renew")
            token = p.sign_jws(p.encode_status(body), signer.key, signer.cert)
            cert_msg = p.cert_message("gw-renew", [signer.cert], [tls.cert, *tls.chain])
            ingest.process([
                Incoming(p.cert_topic(p.DEFAULT_PREFIX, "gw-renew"), p.encode_message(cert_msg),
                         False, 1),
                Incoming(p.status_topic(p.DEFAULT_PREFIX, "gw-renew"), token, False, 1)])
            assert ingest.accepted == seq, dict(ingest.rejected)
            clients = [link.cert.sha256 for link in store.device_certs("gw-renew")
                       if link.role == CertRole.CLIENT]
            assert clients == [tls.cert.fingerprint(hashes.SHA256()).hex()]
    finally:
        store.close()
