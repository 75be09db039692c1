"""`certmon-agent check --broker-config`: a broker host's config as its inventory, its
files judged, and what each TLS listener serves compared with its certfile on disk.

The CLI tests run the command as a user would (a subprocess) against a real Mosquitto
started here, on free loopback ports, with a PKI whose dates derive from the real
now (the command reads the clock); the reader and rule tests inject `now`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import MosquittoFactory
from cryptography.hazmat.primitives import serialization
from kit.broker import Listener, Mosquitto
from kit.pki import PKIFactory, write_bundle, write_crls
from OpenSSL import crypto

from agent.brokerhost import mosquitto
from agent.brokerhost.inventory import inspect_broker, worst
from agent.brokerhost.served import ServedCert, served_findings
from certmon import pki

NOW = datetime.now(UTC).replace(microsecond=0)
POLICY = pki.Policy()


def check(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "check", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def codes(findings: tuple[pki.Finding, ...] | list[pki.Finding]) -> set[pki.FindingCode]:
    return {f.code for f in findings}


# --- the config reader ---------------------------------------------------------------


def test_listeners_bridges_and_include_dir_are_read_as_mosquitto_does(tmp_path: Path) -> None:
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    main = tmp_path / "mosquitto.conf"
    main.write_text("# main\nper_listener_settings true\ncafile /pki/default-ca.pem\n"
                    f"include_dir {conf_d}\n")
    (conf_d / "20-bridge.conf").write_text(
        "connection cloud\naddress cloud.example:8883 backup.example:8883\n"
        "bridge_cafile /pki/cloud-ca.pem\nbridge_certfile /pki/bridge.crt\n"
        "bridge_keyfile /pki/bridge.key\n"
        # The latest listener's (the socket one): listener settings follow the
        # listener, not the bridge.
        "crlfile /pki/devices.crl\n")
    (conf_d / "10-listener.conf").write_text(
        "listener 8883 0.0.0.0\n  certfile /pki/broker.crt\nkeyfile /pki/broker.key\n"
        "cafile /pki/devices.pem\nrequire_certificate true\n\nlistener 0 /run/m.sock\n")
    (conf_d / "ignored.txt").write_text("garbage\n")
    config = mosquitto.read_config(main)
    assert config.per_listener_settings
    assert config.files_read == (str(main), str(conf_d / "10-listener.conf"),
                                 str(conf_d / "20-bridge.conf"))
    default, tls, sock, bridge = config.endpoints
    assert (default.name, default.port, default.file("cafile")) == (
        "default listener 1883", 1883, mosquitto.FileRef("cafile", "cafile",
                                                         "/pki/default-ca.pem", f"{main}:3"))
    assert (tls.host, tls.port, tls.require_certificate, tls.is_tls) == (None, 8883, True, True)
    assert [(f.directive, f.at) for f in tls.files] == [
        ("certfile", f"{conf_d}/10-listener.conf:2"), ("keyfile", f"{conf_d}/10-listener.conf:3"),
        ("cafile", f"{conf_d}/10-listener.conf:4")]
    assert (sock.port, sock.is_tls) == (None, False)
    assert sock.file("crlfile") == mosquitto.FileRef(
        "crlfile", "crlfile", "/pki/devices.crl", f"{conf_d}/20-bridge.conf:6")
    assert (bridge.kind, bridge.name, bridge.host, bridge.port) == (
        "bridge", "bridge cloud", "cloud.example", 8883)
    assert [(f.role, f.path) for f in bridge.files] == [
        ("cafile", "/pki/cloud-ca.pem"), ("certfile", "/pki/bridge.crt"),
        ("keyfile", "/pki/bridge.key")]
    assert config.findings == ()


def test_syntax_it_does_not_know_is_a_finding_naming_file_and_line(tmp_path: Path) -> None:
    main = tmp_path / "mosquitto.conf"
    main.write_text("listener 8883\ncertfile = /pki/broker.crt\nlistener eight\ncertfile\n"
                    "bridge_cafile /x.pem\ninclude_dir /nonexistent.d\nfrobnicate yes\n"
                    "keyfile=/pki/broker.key\n")
    config = mosquitto.read_config(main)
    messages = [f.message for f in config.findings]
    assert messages[0] == f"{main}:2: certfile: Mosquitto's syntax is `name value`, without '='"
    assert messages[1].startswith(f"{main}:3: listener: the port is not a number")
    assert messages[2].startswith(f"{main}:4: certfile has no value")
    assert messages[3].startswith(f"{main}:5: bridge_cafile outside a bridge")
    assert messages[4].startswith(f"{main}:6: include_dir: No such file")
    assert messages[5].startswith(f"{main}:7: 'frobnicate' is not a Mosquitto 2 directive")
    assert messages[6].startswith(f"{main}:8: keyfile: Mosquitto's syntax")
    assert not any("/pki/broker" in m for m in messages)  # values are never echoed
    assert [f.severity for f in config.findings] == [
        pki.Severity.WARNING, pki.Severity.WARNING, pki.Severity.WARNING, pki.Severity.WARNING,
        pki.Severity.CRITICAL, pki.Severity.OK, pki.Severity.WARNING]
    # Read as Mosquitto reads it: the path is "= /pki/broker.crt".
    assert config.endpoints[0].file("certfile").path == "= /pki/broker.crt"  # type: ignore[union-attr]
    missing = mosquitto.read_config(tmp_path / "absent.conf")
    assert [(f.code, f.severity) for f in missing.findings] == [
        (pki.FindingCode.FILE_UNREADABLE, pki.Severity.UNKNOWN)]
    done = check("--broker-config", tmp_path / "absent.conf")
    assert done.returncode == 3 and "Traceback" not in done.stderr
    assert f"cannot read Mosquitto config {tmp_path / 'absent.conf'}" in done.stdout


def test_no_finding_echoes_a_value_so_a_password_never_reaches_the_report(
    tmp_path: Path,
) -> None:
    main = tmp_path / "mosquitto.conf"
    main.write_text("connection up\naddress up.example:8883\nremote_password = s3cret-pw\n"
                    "remote_password=s3cret-pw2\nport s3cret-pw3\n")
    config = mosquitto.read_config(main)
    messages = [f.message for f in config.findings]
    assert messages[0] == (f"{main}:3: remote_password: Mosquitto's syntax is "
                           "`name value`, without '='")
    assert messages[1].startswith(f"{main}:4: remote_password: ")
    assert messages[2] == f"{main}:5: port: the value is not a port number"
    assert len(messages) == 3
    done = check("--broker-config", main, "--json")
    assert "remote_password" in done.stdout and "Traceback" not in done.stderr
    assert "s3cret" not in done.stdout + done.stderr


def test_a_conf_d_including_itself_is_read_once(tmp_path: Path) -> None:
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    for n in range(8):  # each one includes conf.d again: 8^8 reads before the fix
        (conf_d / f"{n}.conf").write_text(f"include_dir {conf_d}\n")
    main = tmp_path / "mosquitto.conf"
    main.write_text(f"include_dir {tmp_path / '.' / 'conf.d'}\n")
    config = mosquitto.read_config(main)
    assert len(config.files_read) == 9  # the main file and each conf.d file once
    loops = [f for f in config.findings if "already being read" in f.message]
    assert len(loops) == 8 and loops[0].message.startswith(f"{conf_d / '0.conf'}:1: ")


def test_a_fifo_or_a_huge_conf_is_a_finding_and_not_read(tmp_path: Path) -> None:
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    os.mkfifo(conf_d / "a-fifo.conf")  # opening it for reading would block forever
    (conf_d / "b-huge.conf").write_bytes(b"# x\n" * (mosquitto.MAX_CONF_BYTES // 4 + 1))
    (conf_d / "c-ok.conf").write_text("listener 8883\n")
    main = tmp_path / "mosquitto.conf"
    main.write_text(f"include_dir {conf_d}\n")
    config = mosquitto.read_config(main)
    assert config.files_read == (str(main), str(conf_d / "c-ok.conf"))
    messages = [f.message for f in config.findings]
    assert messages == [
        f"{main}:1: {conf_d / 'a-fifo.conf'} is not a regular file; not read (Mosquitto "
        "would block on a FIFO or device)",
        f"{main}:1: {conf_d / 'b-huge.conf'} is larger than {mosquitto.MAX_CONF_BYTES} "
        "bytes: not a Mosquitto config; not read"]
    assert [e.port for e in config.endpoints] == [8883]


# --- broken files: findings naming the config line, never a traceback ---------------


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("brokerhost")
    factory = PKIFactory(NOW)
    root = factory.root("Broker Host Root")
    devices = factory.root("Broker Host Devices")
    server = factory.leaf(root, "broker.test", usage="server", sans=["127.0.0.1"], days=200)
    out: dict[str, Path] = {"root": root.write(tmp / "root")[0],
                            "devices_ca": write_bundle(tmp / "devices-ca.pem", [devices])}
    out["cert"], out["key"] = server.write(tmp / "server")
    capath = tmp / "capath"
    capath.mkdir()
    # As c_rehash leaves it for one CA (hashed name); the other only under its own name.
    write_bundle(capath / f"{crypto.X509.from_cryptography(devices.cert).subject_name_hash():08x}.0",
                 [devices])
    write_bundle(capath / "root.pem", [root])
    (capath / "README").write_text("hashed links made by c_rehash\n")
    out["capath"] = capath
    out["not_crl"] = out["devices_ca"]
    out["der_crl"] = tmp / "devices.crl.der"
    out["der_crl"].write_bytes(factory.crl(
        devices, this_update=NOW, next_update=NOW + timedelta(days=90)).public_bytes(
            serialization.Encoding.DER))
    return out


def test_broken_inputs_give_clear_findings_naming_file_and_line(
    tmp_path: Path, material: dict[str, Path]
) -> None:
    conf = tmp_path / "mosquitto.conf"
    unreadable = tmp_path / "a-file" / "key.pem"  # ENOTDIR: unreadable even for root
    (tmp_path / "a-file").write_text("")
    conf.write_text(
        "listener 18883 127.0.0.1\n"
        f"certfile {material['cert']}\n"
        f"keyfile {unreadable}\n"
        f"capath {material['capath']}\n"
        f"crlfile {material['not_crl']}\n"
        "listener 18884 127.0.0.1\n"
        f"certfile {tmp_path / 'gone.crt'}\n"
        f"cafile {material['capath']}\n"
        f"capath {material['cert']}\n"
        "tls_ciphers_of_the_future on\n"
        f"crlfile {material['der_crl']}\n")
    done = check("--broker-config", conf, "--json")
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    messages = [f["message"] for f in report["findings"]]

    def one(prefix: str) -> str:
        hits = [m for m in messages if m.startswith(prefix)]
        assert len(hits) == 1, (prefix, messages)
        return hits[0]

    assert "is not a Mosquitto 2 directive" in one(f"{conf}:10: ")
    assert "cannot read private key" in one(f"{conf}:3: keyfile: ")
    assert "holds certificates, not a CRL" in one(f"{conf}:5: crlfile: ")
    assert "No such file" in one(f"{conf}:7: certfile: ")
    assert "Is a directory" in one(f"{conf}:8: cafile: ")
    assert "is not a directory" in one(f"{conf}:9: capath: ")
    assert "Mosquitto reads crlfile as PEM only" in one(
        f"{conf}:11: crlfile: {material['der_crl']} is DER")
    # The capath directory is read: both CAs in it, the README skipped.
    first = report["endpoints"][0]
    capath = next(f for f in first["files"] if f["directive"] == "capath")
    assert sorted(c["common_name"] for c in capath["certs"]) == [
        "Broker Host Devices", "Broker Host Root"]
    (unhashed,) = capath["findings"]
    assert unhashed["message"].startswith(
        f"{conf}:4: capath: capath {material['capath']}: CA Broker Host Root is not under "
        "its hashed name")
    assert done.returncode == 2
    # The same, as a table.
    table = check("--broker-config", conf)
    assert "Traceback" not in table.stderr and table.returncode == 2
    assert f"  capath           {material['capath']}  ({conf}:4)" in table.stdout


# --- against a running Mosquitto ----------------------------------------------------


def _broker(factory: MosquittoFactory, cert: Path, key: Path, cafile: Path,
            crlfile: Path | None = None) -> Mosquitto:
    extra = f"crlfile {crlfile}" if crlfile else ""
    return factory([Listener(tls=True, certfile=cert, keyfile=key, cafile=cafile,
                             require_certificate=True, extra=extra)])


def test_renewed_on_disk_but_not_reloaded_names_both_fingerprints(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    factory = PKIFactory(NOW)
    root = factory.root("Reload Root")
    old = factory.leaf(root, "broker.test", usage="server", days=20, name="old")
    new = factory.leaf(root, "broker.test", usage="server", days=90, name="new")
    cert, key = tmp_path / "broker.crt", tmp_path / "broker.key"
    cert.write_bytes(old.cert_pem())
    key.write_bytes(old.key_pem())
    os.chmod(key, 0o600)
    cafile = write_bundle(tmp_path / "ca.pem", [root])
    broker = _broker(mosquitto_factory, cert, key, cafile)
    served_before = check("--broker-config", broker.conf_path, "--json")
    assert pki.FindingCode.BROKER_CERT_NOT_RELOADED.value not in served_before.stdout
    # certbot's deploy step without the restart: the files change, the process does not.
    cert.write_bytes(new.cert_pem())
    key.write_bytes(new.key_pem())
    done = check("--broker-config", broker.conf_path, "--json")
    report = json.loads(done.stdout)
    drift = [f for f in report["findings"] if f["code"] == "BROKER_CERT_NOT_RELOADED"]
    assert len(drift) == 1, done.stdout
    old_facts = pki.parse_bundle(old.cert_pem(), "old").certs[0].facts
    new_facts = pki.parse_bundle(new.cert_pem(), "new").certs[0].facts
    for facts in (old_facts, new_facts):
        assert facts.sha256 in drift[0]["message"]
        assert pki.iso_utc(facts.not_after) in drift[0]["message"]
    assert drift[0]["severity"] == "WARNING"  # the served one has 20 days: warn, not crit
    assert report["endpoints"][0]["served"]["leaf"]["sha256"] == old_facts.sha256
    assert done.returncode == 1, done.stdout
    # The file check alone says all is well: the new certificate is fine.
    assert {f["code"] for f in report["findings"]} == {"BROKER_CERT_NOT_RELOADED"}
    broker.restart()
    assert check("--broker-config", broker.conf_path).returncode == 0


def test_not_reloaded_is_critical_inside_the_critical_window() -> None:
    factory = PKIFactory(NOW)
    root = factory.root("Reload Root")
    served = pki.parse_bundle(factory.leaf(root, "b", days=3, name="s3").cert_pem(),
                              "tls").certs[0].facts
    disk = pki.parse_bundle(factory.leaf(root, "b", days=90, name="d90").cert_pem(),
                            "/etc/b.crt").certs[0].facts
    endpoint = mosquitto.Endpoint("listener", "listener 8883", "m.conf:4", None, 8883,
                                  files=(mosquitto.FileRef("certfile", "certfile", "/etc/b.crt",
                                                           "m.conf:5"),))
    found = served_findings(endpoint, disk, ServedCert("127.0.0.1:8883", "TLSv1.3", served),
                            NOW, POLICY)
    assert [(f.code, f.severity) for f in found] == [
        (pki.FindingCode.BROKER_CERT_NOT_RELOADED, pki.Severity.CRITICAL)]
    assert found[0].message.startswith("m.conf:4: listener 8883 serves b sha256 ")
    assert served_findings(endpoint, served, ServedCert("x", None, served), NOW, POLICY) == []


@pytest.mark.parametrize(("next_update", "code", "exit_code"), [
    (timedelta(days=2), "CRL_EXPIRING", 2),
    (timedelta(days=20), "CRL_EXPIRING", 1),
    (timedelta(hours=-2), "CRL_EXPIRED", 2),
])
def test_crlfile_next_update_in_the_output_and_the_exit_code(
    tmp_path: Path, mosquitto_factory: MosquittoFactory,
    next_update: timedelta, code: str, exit_code: int,
) -> None:
    factory = PKIFactory(NOW)
    root = factory.root("CRL Broker Root")
    server = factory.leaf(root, "broker.test", usage="server", days=365)
    cert, key = server.write(tmp_path)
    cafile = write_bundle(tmp_path / "ca.pem", [root])
    at = NOW + next_update
    crlfile = write_crls(tmp_path / "devices.crl", [
        factory.crl(root, this_update=at - timedelta(days=30), next_update=at)])
    broker = _broker(mosquitto_factory, cert, key, cafile, crlfile)
    done = check("--broker-config", broker.conf_path, "--json")
    report = json.loads(done.stdout)
    crl_file = next(f for f in report["endpoints"][0]["files"] if f["role"] == "crlfile")
    assert crl_file["crls"][0]["next_update"] == pki.iso_utc(at)
    line = broker.conf_path.read_text().splitlines().index(f"crlfile {crlfile}") + 1
    assert crl_file["at"] == f"{broker.conf_path}:{line}"
    assert [f["code"] for f in report["findings"]] == [code]
    assert pki.iso_utc(at) in report["findings"][0]["message"]
    assert done.returncode == exit_code
    table = check("--broker-config", broker.conf_path)
    assert f"crl   nextUpdate {pki.iso_utc(at)}" in table.stdout
    assert table.returncode == exit_code


def test_thresholds_and_no_probe_when_nothing_listens(tmp_path: Path,
                                                       material: dict[str, Path]) -> None:
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener 1 127.0.0.1\ncertfile {material['cert']}\n"
                    f"keyfile {material['key']}\ncafile {material['devices_ca']}\n")
    config = mosquitto.read_config(conf)
    quiet = inspect_broker(config, NOW, POLICY, prober=None)
    assert quiet.findings == () and worst(quiet) == pki.Severity.OK
    probed = inspect_broker(config, NOW, POLICY)
    assert [f.code for f in probed.findings] == [pki.FindingCode.PROBE_FAILED]
    assert probed.findings[0].message.startswith(f"{conf}:1: listener 1 127.0.0.1: no TLS")
    # The certificate has 200 days: --warn-days 250 makes it a warning.
    assert "BROKER_CERT_EXPIRING" in check("--broker-config", conf, "--warn-days", "250",
                                           "--crit-days", "1").stdout


def test_config_policy_sets_the_thresholds_and_flags_override_it(
    tmp_path: Path, material: dict[str, Path]
) -> None:
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener 1 127.0.0.1\ncertfile {material['cert']}\n")
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(
        '[mqtt]\nbroker = "mqtts://broker.example"\n'
        f'[tls]\nca_bundle = "{material["root"]}"\ncert = "{material["cert"]}"\n'
        f'key = "{material["key"]}"\n[policy]\nwarn_days = 250\ncrit_days = 1\n')
    done = check("--broker-config", conf, "--config", agent_toml, "--json")
    codes_seen = [f["code"] for f in json.loads(done.stdout)["findings"]]
    assert "BROKER_CERT_EXPIRING" in codes_seen, done.stdout + done.stderr
    overridden = check("--broker-config", conf, "--config", agent_toml, "--warn-days", "100",
                       "--json")
    assert "BROKER_CERT_EXPIRING" not in overridden.stdout


def test_a_bridge_remote_is_judged_against_what_the_bridge_trusts(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    factory = PKIFactory(NOW)
    cloud_root, other_root = factory.root("Cloud Root"), factory.root("Other Root")
    remote_cert = factory.leaf(cloud_root, "cloud.test", usage="server", sans=["127.0.0.1"])
    cert, key = remote_cert.write(tmp_path / "remote")
    remote = mosquitto_factory([Listener(tls=True, certfile=cert, keyfile=key)])
    right = write_bundle(tmp_path / "cloud-ca.pem", [cloud_root])
    wrong = write_bundle(tmp_path / "other-ca.pem", [other_root])

    def bridge_check(cafile: Path) -> tuple[int, dict[str, Any]]:
        conf = tmp_path / "mosquitto.conf"
        conf.write_text(f"connection cloud\naddress 127.0.0.1:{remote.port}\n"
                        f"bridge_cafile {cafile}\ntopic # out 1\n")
        done = check("--broker-config", conf, "--json")
        return done.returncode, json.loads(done.stdout)

    code, report = bridge_check(right)
    assert code == 0, report["findings"]
    bridge = report["endpoints"][0]
    assert bridge["kind"] == "bridge" and bridge["remote"]["valid_now"] is True
    assert bridge["remote"]["chain"][0]["common_name"] == "cloud.test"
    code, report = bridge_check(wrong)
    assert code == 2
    (invalid,) = report["findings"]
    assert invalid["code"] == "BROKER_CHAIN_INVALID"
    assert invalid["message"].startswith(f"{tmp_path / 'mosquitto.conf'}:1: bridge cloud: "
                                         "remote: chain of cloud.test does not validate")

