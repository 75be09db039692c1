"""certmon-scan against real Mosquitto listeners on loopback: one verdict per scenario.

`now` is the fixture PKI's own instant (`pki.now`), so "expires in 20 days" is exact.
Scenarios the shared scenario broker lacks (self-signed leaf, incomplete chain, extra
certificate, mTLS, CONNACK refusal) are built here with `mosquitto_factory`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import Fleet, MosquittoFactory, ScenarioBroker
from kit.broker import Listener, Mosquitto, wait_until
from kit.pki import Issued, PKIFactory, write_bundle
from prometheus_client.parser import text_string_to_metric_families

from certmon import pki as certs
from certmon import scan
from certmon.errors import ConfigError
from certmon.hostname import match_hostname
from certmon.pki import FindingCode, Policy, Severity
from certmon.scanverdict import ScanReport, judge, parse_presented, target_label
from certmon.tlsprobe import ProbeResult, ProbeTarget, probe_many
from scanner import cli
from scanner.render import render_json
from scanner.targets import parse_endpoint, parse_targets

TIMEOUT_S = 2.0
POLICY = Policy()  # warn 30 d, crit 7 d


def codes(report: ScanReport) -> set[str]:
    return {str(f.code) for f in report.findings}


@pytest.fixture(scope="module")
def probed(scenario_broker: ScenarioBroker) -> dict[str, ProbeResult]:
    """Every servable scenario probed once (with MQTT CONNECT)."""
    sb = scenario_broker
    names = list(sb.ports)
    targets = [ProbeTarget("127.0.0.1", sb.ports[n], mqtt=True, mqtt_client_id=f"scan-{n}",
                           timeout_s=TIMEOUT_S) for n in names]
    return dict(zip(names, probe_many(targets), strict=True))


@pytest.fixture(scope="module")
def reports(probed: dict[str, ProbeResult], scenario_broker: ScenarioBroker,
            pki: PKIFactory) -> dict[str, ScanReport]:
    """Each scenario's probe judged against its own trust bundle."""
    return {n: judge(r, scan.load_trust(str(scenario_broker.trust_paths[n])), pki.now, POLICY)
            for n, r in probed.items()}


# --- the named scenarios -------------------------------------------------------------------


def test_ok_is_ok_with_full_facts(reports: dict[str, ScanReport]) -> None:
    r = reports["ok"]
    assert r.severity == Severity.OK, r.findings
    assert r.findings == ()
    assert r.chain_valid and r.chain_valid_at_warn and r.path_status == "validated"
    assert [f.subject for f in r.presented] == ["CN=ok.test", "CN=ok Intermediate CA"]
    assert [f.subject for f in r.path] == [*(f.subject for f in r.presented), "CN=ok Root CA"]
    assert r.hostname == "127.0.0.1" and r.hostname_match == "san"
    assert r.mqtt_connack == 0 and r.is_success and r.tls_version == "TLSv1.3"


@pytest.mark.parametrize(("name", "severity", "days"), [
    ("expiring_leaf_20d", Severity.WARNING, 20), ("expiring_leaf_3d", Severity.CRITICAL, 3)])
def test_expiring_leaf(reports: dict[str, ScanReport], pki: PKIFactory, name: str,
                       severity: Severity, days: int) -> None:
    r = reports[name]
    assert r.severity == severity
    assert codes(r) == {"BROKER_CERT_EXPIRING"}  # MQTT session → judged as a broker cert
    assert r.earliest_expiry == r.presented[0]
    assert r.earliest_expiry.days_left(pki.now) == days
    assert r.chain_valid and not r.chain_valid_at_warn


def test_expired_leaf_keeps_its_dates(reports: dict[str, ScanReport], pki: PKIFactory) -> None:
    r = reports["expired"]
    assert r.severity == Severity.CRITICAL
    assert {"BROKER_CERT_EXPIRED", "BROKER_CHAIN_INVALID"} <= codes(r)
    assert r.chain_valid is False and r.path_status == "linked"
    assert r.earliest_expiry is not None and r.earliest_expiry.days_left(pki.now) == -1
    assert len(r.path) == 3  # leaf → intermediate → anchor, linked by names and key ids


def test_not_yet_valid_leaf(reports: dict[str, ScanReport]) -> None:
    r = reports["not_yet_valid"]
    assert r.severity == Severity.CRITICAL
    assert "CERT_NOT_YET_VALID" in codes(r)


def test_intermediate_expiring_before_long_lived_leaf(
    reports: dict[str, ScanReport], pki: PKIFactory
) -> None:
    r = reports["expiring_intermediate"]
    assert r.severity == Severity.WARNING
    assert codes(r) == {"INTERMEDIATE_EXPIRING", "INTERMEDIATE_EXPIRES_BEFORE_LEAF"}
    assert r.presented[0].days_left(pki.now) > 299
    # The point of scanning the validated path: the leaf's 300 days are not the answer.
    assert r.earliest_expiry == r.presented[1]
    assert r.earliest_expiry.days_left(pki.now) == 10
    assert r.chain_valid and r.chain_valid_at_warn is False


def test_expired_intermediate(reports: dict[str, ScanReport], pki: PKIFactory) -> None:
    r = reports["expired_intermediate"]
    assert r.severity == Severity.CRITICAL
    expired = [f for f in r.findings if f.code == FindingCode.CERT_EXPIRED]
    assert [f.cert_sha256 for f in expired] == [r.presented[1].sha256]
    assert r.earliest_expiry == r.presented[1]
    assert r.earliest_expiry.days_left(pki.now) == -2


def test_wrong_hostname(reports: dict[str, ScanReport]) -> None:
    r = reports["wrong_host"]
    assert r.severity == Severity.CRITICAL
    assert codes(r) == {"HOSTNAME_MISMATCH"}
    assert r.chain_valid  # the chain itself is fine


@pytest.mark.parametrize(("name", "code"), [("rsa1024", "WEAK_KEY"),
                                            ("sha1_signed", "WEAK_SIGNATURE")])
def test_weak_leaf(reports: dict[str, ScanReport], name: str, code: str) -> None:
    r = reports[name]
    assert r.severity == Severity.CRITICAL
    assert code in codes(r)
    weak = next(f for f in r.findings if f.code == code)
    assert weak.cert_sha256 == r.presented[0].sha256


def test_servername_is_the_name_checked(scenario_broker: ScenarioBroker, pki: PKIFactory) -> None:
    sb = scenario_broker
    trust = scan.load_trust(str(sb.trust_paths["wrong_host"]))
    target = ProbeTarget("127.0.0.1", sb.ports["wrong_host"], servername="wrong.example",
                         timeout_s=TIMEOUT_S)
    r = scan.scan_targets([target], trust, pki.now, POLICY)[0]
    assert r.severity == Severity.OK and r.hostname_match == "san"
    assert r.name == f"wrong.example@127.0.0.1:{sb.ports['wrong_host']}"


def test_hostname_rules(pki: PKIFactory) -> None:
    from certmon.pki import facts_from_cert

    root = pki.root("hn Root", name="hn-root")
    wild = facts_from_cert(pki.leaf(root, "x", name="hn-wild", sans=("*.example.com",)).cert)
    assert match_hostname(wild, "a.example.com") == "san"
    assert match_hostname(wild, "A.Example.COM.") == "san"
    assert match_hostname(wild, "a.b.example.com") == "mismatch"
    assert match_hostname(wild, "example.com") == "mismatch"
    cn_only = facts_from_cert(pki.leaf(root, "broker.lan", name="hn-cn").cert)
    assert match_hostname(cn_only, "broker.lan") == "cn"
    ipv6 = facts_from_cert(pki.leaf(root, "v6", name="hn-v6", sans=("::1",)).cert)
    assert match_hostname(ipv6, "0:0::1") == "san"
    assert match_hostname(ipv6, "127.0.0.1") == "mismatch"


def test_pure_verdicts_on_crafted_chains(pki: PKIFactory) -> None:
    """Orders and pins no TLS server would let us serve easily, judged straight from DER."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from certmon.pki import parse_bundle
    from certmon.scanverdict import trust_from_bundles
    from certmon.tlsprobe import ProbeResult

    def der(issued: Issued) -> bytes:
        return issued.cert.public_bytes(Encoding.DER)

    root = pki.root("pure Root", name="pure-root")
    inter = pki.intermediate(root, "pure Int", name="pure-int")
    leaf = pki.leaf(inter, "pure.test", name="pure-leaf", usage="server", sans=("127.0.0.1",))
    pinned = pki.self_signed_leaf("pinned.test", name="pure-pinned", sans=("127.0.0.1",))
    target = ProbeTarget("127.0.0.1", 9)

    def verdict(chain: tuple[bytes, ...], anchor: Issued = root) -> ScanReport:
        trust = trust_from_bundles(parse_bundle(der(anchor), "trust.pem"))
        return judge(ProbeResult(target, presented_der=chain), trust, pki.now, POLICY)

    swapped = verdict((der(leaf), der(root), der(inter)))
    assert swapped.severity == Severity.WARNING and codes(swapped) == {"CHAIN_MISORDERED"}
    assert "out of order" in swapped.findings[0].message
    assert verdict((der(leaf), der(inter), der(root))).severity == Severity.OK  # root sent: fine
    duplicate = verdict((der(leaf), der(inter), der(inter)))
    assert codes(duplicate) == {"CHAIN_MISORDERED"}
    pin = verdict((der(pinned),), anchor=pinned)
    assert pin.chain_valid and pin.severity == Severity.WARNING
    assert codes(pin) == {"SELF_SIGNED_LEAF"}
    garbage = verdict((b"\x30\x03abc", der(inter)))
    assert garbage.severity == Severity.CRITICAL and codes(garbage) == {"UNPARSEABLE_BLOCK"}
    assert garbage.chain_valid is None and [f.index for f in garbage.presented] == [1]


# --- scenarios built here ------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_pki(pki: PKIFactory) -> dict[str, Issued]:
    root = pki.root("scan Root CA", name="scan-root")
    inter = pki.intermediate(root, "scan Intermediate CA", name="scan-int")
    leaf = pki.leaf(inter, "scan.test", name="scan-leaf", usage="server",
                    sans=("localhost", "127.0.0.1"))
    other = pki.root("scan Unrelated CA", name="scan-other")
    selfie = pki.self_signed_leaf("selfie.test", name="scan-selfie", sans=("127.0.0.1",))
    return {"root": root, "inter": inter, "leaf": leaf, "other": other, "selfie": selfie}


@pytest.fixture
def own_broker(mosquitto_factory: MosquittoFactory, own_pki: dict[str, Issued],
               tmp_path: Path) -> tuple[Mosquitto, dict[str, int], Path]:
    leaf, inter, other = own_pki["leaf"], own_pki["inter"], own_pki["other"]
    key = tmp_path / "leaf.key"
    key.write_bytes(leaf.key_pem())
    files = {
        "complete": write_bundle(tmp_path / "complete.pem", [leaf, inter]),
        "incomplete": write_bundle(tmp_path / "incomplete.pem", [leaf]),
        "extra": write_bundle(tmp_path / "extra.pem", [leaf, inter, other]),
    }
    selfie_cert, selfie_key = own_pki["selfie"].write(tmp_path)
    listeners = [Listener(tls=True, certfile=p, keyfile=key) for p in files.values()]
    listeners.append(Listener(tls=True, certfile=selfie_cert, keyfile=selfie_key))
    broker = mosquitto_factory(listeners)
    ports = dict(zip([*files, "selfie"], broker.ports, strict=True))
    return broker, ports, write_bundle(tmp_path / "trust.pem", [own_pki["root"]])


def test_incomplete_chain_names_the_missing_intermediate(
    own_broker: tuple[Mosquitto, dict[str, int], Path], pki: PKIFactory
) -> None:
    _, ports, trust_path = own_broker
    trust = scan.load_trust(str(trust_path))
    targets = [ProbeTarget("127.0.0.1", ports[n], timeout_s=TIMEOUT_S)
               for n in ("incomplete", "complete")]
    incomplete, complete = scan.scan_targets(targets, trust, pki.now, POLICY)
    assert complete.severity == Severity.OK
    # The complete endpoint taught the scan the intermediate the other one fails to send.
    assert incomplete.severity == Severity.CRITICAL
    assert codes(incomplete) == {"INCOMPLETE_CHAIN"}
    (finding,) = incomplete.findings
    assert "does not send intermediate CN=scan Intermediate CA" in finding.message
    assert incomplete.path_status == "completed" and len(incomplete.path) == 3
    assert incomplete.chain_valid is False
    # Alone, without a known intermediate, it is an invalid chain with a pointed hint.
    alone = scan.scan_targets(targets[:1], trust, pki.now, POLICY)[0]
    assert codes(alone) == {"CHAIN_INVALID"}
    assert "issuer CN=scan Intermediate CA of CN=scan.test is neither sent" in (
        alone.findings[0].message)


def test_self_signed_leaf(own_broker: tuple[Mosquitto, dict[str, int], Path],
                          pki: PKIFactory) -> None:
    _, ports, trust_path = own_broker
    target = ProbeTarget("127.0.0.1", ports["selfie"], timeout_s=TIMEOUT_S)
    r = scan.scan_targets([target], scan.load_trust(str(trust_path)), pki.now, POLICY)[0]
    assert r.severity == Severity.CRITICAL
    assert codes(r) == {"SELF_SIGNED_LEAF"}
    assert r.earliest_expiry == r.presented[0]  # its dates are still reported


def test_extra_certificate_is_a_warning(own_broker: tuple[Mosquitto, dict[str, int], Path],
                                        pki: PKIFactory) -> None:
    _, ports, trust_path = own_broker
    target = ProbeTarget("127.0.0.1", ports["extra"], timeout_s=TIMEOUT_S)
    r = scan.scan_targets([target], scan.load_trust(str(trust_path)), pki.now, POLICY)[0]
    assert r.severity == Severity.WARNING
    assert codes(r) == {"CHAIN_MISORDERED"}
    assert "#2 CN=scan Unrelated CA" in r.findings[0].message
    assert r.chain_valid


def test_mtls_listener_with_and_without_client_cert(
    fleet_broker: Fleet, pki: PKIFactory, tmp_path: Path
) -> None:
    creds = fleet_broker.device_credentials("scan-dev-1", tmp_path)
    trust = scan.load_trust(str(fleet_broker.ca_bundle_path))
    base = ProbeTarget("127.0.0.1", fleet_broker.mtls_port, timeout_s=TIMEOUT_S)
    targets = [
        base,  # TLS only: the broker's chain is observed in full, the refusal is a note
        replace(base, mqtt=True, mqtt_client_id="scan-nocert"),  # MQTT impossible: UNKNOWN
        replace(base, mqtt=True, client_cert=str(creds.cert_path),
                client_key=str(creds.key_path), mqtt_client_id="scan-dev-1"),
    ]
    bare, bare_mqtt, with_cert = scan.scan_targets(targets, trust, pki.now, POLICY)
    assert bare.severity == Severity.OK and codes(bare) == {"CLIENT_CERT_REQUIRED"}
    assert bare.chain_valid and bare.presented[0].subject == "CN=localhost"
    assert bare.error_kind == "client_cert_required" and not bare.is_success
    assert bare_mqtt.severity == Severity.UNKNOWN and codes(bare_mqtt) == {"PROBE_FAILED"}
    assert with_cert.severity == Severity.OK and with_cert.findings == ()
    assert with_cert.mqtt_connack == 0 and with_cert.is_success


def test_mqtt_accepting_and_refusing_listeners(
    mosquitto_factory: MosquittoFactory, own_pki: dict[str, Issued], pki: PKIFactory,
    tmp_path: Path,
) -> None:
    cert, key = own_pki["leaf"].write(tmp_path, chain=True)
    trust = scan.load_trust(str(write_bundle(tmp_path / "t.pem", [own_pki["root"]])))
    tls = Listener(tls=True, certfile=cert, keyfile=key)
    accepting = mosquitto_factory([tls])
    refusing = mosquitto_factory([replace(tls, port=0)], allow_anonymous=False)
    targets = [ProbeTarget("127.0.0.1", b.port, mqtt=True, mqtt_client_id=f"scan-{i}",
                           timeout_s=TIMEOUT_S) for i, b in enumerate((accepting, refusing))]
    # The fixture's readiness check (a bare TLS handshake) logs a protocol error of its
    # own, a little after the broker counts as ready; only what our probes caused counts.
    for b in (accepting, refusing):
        wait_until(lambda b=b: "Client <unknown> " in b.log_text(), 2.0)
    before = [len(b.log_text()) for b in (accepting, refusing)]
    ok, refused = scan.scan_targets(targets, trust, pki.now, POLICY)
    assert ok.severity == Severity.OK and ok.mqtt_connack == 0
    assert refused.severity == Severity.CRITICAL and refused.mqtt_connack == 5
    assert codes(refused) == {"MQTT_CONNACK_REFUSED"}
    assert "CONNACK 5 (not authorized)" in refused.findings[0].message
    assert refused.chain_valid  # TLS itself was fine and judged
    assert wait_until(lambda: "Client scan-0 disconnected." in accepting.log_text(), 2.0)
    assert wait_until(lambda: "Sending CONNACK to 127.0.0.1 (0, 5)" in refusing.log_text(), 2.0)
    for broker, offset in zip((accepting, refusing), before, strict=True):
        ours = broker.log_text()[offset:]
        assert "protocol error" not in ours.lower() and "openssl error" not in ours.lower()


def test_black_hole_times_out_without_delaying_others(
    scenario_broker: ScenarioBroker, pki: PKIFactory
) -> None:
    sb = scenario_broker
    trust = scan.load_trust(str(sb.trust_paths["ok"]))
    with socket.create_server(("127.0.0.1", 0)) as hole:  # accepts TCP, never speaks TLS
        timeout_s = 1.0
        black = ProbeTarget("127.0.0.1", hole.getsockname()[1], timeout_s=timeout_s)
        good = ProbeTarget("127.0.0.1", sb.ports["ok"], timeout_s=timeout_s)
        started = time.monotonic()
        reports = scan.scan_targets([black, black, *[good] * 6], trust, pki.now, POLICY,
                                    concurrency=8)
        elapsed = time.monotonic() - started
    assert elapsed < timeout_s * 1.8
    assert [r.severity for r in reports] == [Severity.UNKNOWN] * 2 + [Severity.OK] * 6
    assert reports[0].error_kind == "handshake_timeout"
    assert "handshake_timeout" in reports[0].findings[0].message
    assert all(r.duration_s is not None and r.duration_s < 0.5 for r in reports[2:])


def test_certificates_parsed_once_per_scan_give_the_same_verdicts(
    probed: dict[str, ProbeResult], reports: dict[str, ScanReport],
    scenario_broker: ScenarioBroker, pki: PKIFactory,
) -> None:
    # scan_targets parses each distinct certificate once for all endpoints and hands
    # the parses to judge; every verdict must be the one judge reaches on its own.
    parsed = parse_presented(der for r in probed.values() for der in r.presented_der)
    for name, result in probed.items():
        trust = scan.load_trust(str(scenario_broker.trust_paths[name]))
        assert judge(result, trust, pki.now, POLICY, parsed=parsed) == reports[name], name


def test_json_output_is_the_facts_json_form_of_every_report(
    reports: dict[str, ScanReport], scenario_broker: ScenarioBroker, pki: PKIFactory,
) -> None:
    # render_json hands dataclasses to json's C encoder itself; the document must be
    # exactly pki.as_json's, the one JSON form of facts and findings.
    refused = ProbeResult(target=ProbeTarget("127.0.0.1", 1), error="TCP connect refused",
                          error_kind="connect_refused", duration_s=0.001)
    trust = scan.load_trust(str(scenario_broker.trust_paths["ok"]))
    every = [*reports.values(), judge(refused, trust, pki.now, POLICY, duration_s=0.001)]
    out = io.StringIO()
    render_json(every, out)
    assert json.loads(out.getvalue())["targets"] == [certs.as_json(r) for r in every]
    assert out.getvalue().count("\n") == len(every) + 2  # one target a line


# --- CLI -----------------------------------------------------------------------------------


def test_the_scanner_loads_the_config_machinery_only_for_a_config() -> None:
    # A scan from arguments starts without the TOML schema machinery (and the wire
    # contract it pulls in); --config loads it when it is given (the tests below).
    code = ("import sys, scanner.cli; print(' '.join(sorted(m for m in sys.modules if "
            "m.startswith(('certmon.config', 'certmon.scanconfig', 'certmon.wire')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert loaded == []


def test_parse_endpoint_and_targets_file() -> None:
    assert parse_endpoint("broker.lan") == ("broker.lan", 8883)
    assert parse_endpoint("broker.lan:443") == ("broker.lan", 443)
    assert parse_endpoint("[::1]:8884") == ("::1", 8884)
    assert parse_endpoint("[::1]") == ("::1", 8883)
    assert parse_endpoint("::1") == ("::1", 8883)
    defaults = ProbeTarget("", timeout_s=3.0)
    lines = ["# fleet brokers", "", "a.lan mqtt=true  # inline comment",
             "b.lan:443 alpn=x-amzn-mqtt-ca,mqtt servername=iot.example timeout_s=1.5"]
    a, b = parse_targets(lines, "t.txt", defaults)
    assert (a.host, a.port, a.mqtt, a.timeout_s) == ("a.lan", 8883, True, 3.0)
    assert b.alpn == ("x-amzn-mqtt-ca", "mqtt") and b.servername == "iot.example"
    assert target_label(b) == "iot.example@b.lan:443"
    with pytest.raises(ConfigError) as exc:
        parse_targets(["a.lan:99999", "b.lan color=red", "c.lan mqtt=maybe"], "t.txt",
                           defaults)
    assert str(exc.value).splitlines() == [
        "t.txt:1: bad endpoint 'a.lan:99999': port must be 1-65535",
        "t.txt:2: unknown key 'color' (known: servername, alpn, mqtt, client_id, cert, key, "
        "timeout_s)",
        "t.txt:3: mqtt='maybe': expected true or false",
    ]


@pytest.fixture
def cli_setup(scenario_broker: ScenarioBroker, tmp_path: Path) -> tuple[Path, Path]:
    sb = scenario_broker
    bundle = tmp_path / "trust.pem"
    bundle.write_bytes(b"".join(sb.trust_paths[n].read_bytes() for n in sb.ports))
    targets = tmp_path / "targets.txt"
    targets.write_text("".join(f"127.0.0.1:{sb.ports[n]}  # {n}\n" for n in
                               ("ok", "expiring_intermediate", "expired")))
    return bundle, targets


def test_cli_prometheus_exposition(
    cli_setup: tuple[Path, Path], scenario_broker: ScenarioBroker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle, targets = cli_setup
    code = cli.main(["--targets", str(targets), "--ca-bundle", str(bundle), "--prometheus",
                      "--timeout-s", "2"])
    assert code == 2  # worst: the expired target
    families = {f.name: f for f in text_string_to_metric_families(capsys.readouterr().out)}
    assert set(families) == {
        "certmon_scan_cert_not_after_seconds", "certmon_scan_earliest_expiry_seconds",
        "certmon_scan_chain_valid", "certmon_scan_success", "certmon_scan_severity",
        "certmon_scan_duration_seconds"}

    def value(name: str, target: str, **labels: str) -> float:
        return next(s.value for s in families[name].samples
                    if s.labels == {"target": target, **labels})

    sc = scenario_broker.scenarios
    ok, inter, expired = (f"127.0.0.1:{scenario_broker.ports[n]}"
                          for n in ("ok", "expiring_intermediate", "expired"))
    assert value("certmon_scan_severity", ok) == 0
    assert value("certmon_scan_severity", inter) == 1
    assert value("certmon_scan_severity", expired) == 2
    assert value("certmon_scan_chain_valid", expired) == 0
    assert value("certmon_scan_success", expired) == 1  # the probe worked; the cert did not
    # Earliest expiry is the intermediate's, not the leaf's; an expired leaf keeps its series.
    inter_cert = sc["expiring_intermediate"].intermediates[0].cert
    assert value("certmon_scan_earliest_expiry_seconds", inter) == (
        inter_cert.not_valid_after_utc.timestamp())
    assert value("certmon_scan_cert_not_after_seconds", expired, position="0") == (
        sc["expired"].leaf.cert.not_valid_after_utc.timestamp())
    assert value("certmon_scan_earliest_expiry_seconds", expired) == (
        sc["expired"].leaf.cert.not_valid_after_utc.timestamp())


def test_cli_json_and_exit_codes(
    cli_setup: tuple[Path, Path], scenario_broker: ScenarioBroker,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    bundle, _ = cli_setup
    ports = scenario_broker.ports
    common = ["--ca-bundle", str(bundle), "--timeout-s", "2"]
    assert cli.main([f"127.0.0.1:{ports['ok']}", *common]) == 0
    assert "OK       127.0.0.1" in capsys.readouterr().out
    assert cli.main([f"127.0.0.1:{ports['expiring_leaf_20d']}", *common, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "certmon-scan/1" and doc["severity"] == "WARNING"
    (target,) = doc["targets"]
    assert target["findings"][0]["code"] == "CERT_EXPIRING"  # not an MQTT port, no --mqtt
    assert target["presented"][0]["subject"] == "CN=expiring_leaf_20d.test"
    assert target["earliest_expiry"]["not_after"].endswith("Z")
    assert cli.main([f"127.0.0.1:{ports['expiring_leaf_20d']}", *common,
                      "--warn-days", "10"]) == 0
    with socket.create_server(("127.0.0.1", 0)) as hole:
        port = hole.getsockname()[1]
        assert cli.main([f"127.0.0.1:{port}", *common[:2], "--timeout-s", "0.3"]) == 3
    capsys.readouterr()
    assert cli.main(["--ca-bundle", str(tmp_path / "missing.pem"), "127.0.0.1:1"]) == 78
    with pytest.raises(SystemExit) as usage:
        cli.main([])
    assert usage.value.code == 3  # usage errors are UNKNOWN, never Nagios' CRITICAL (2)


# --- certmon-scan --config collector.toml ----------------------------------------------------


def collector_toml(path: Path, trust: Path, port: int, policy: str) -> Path:
    """A collector config as the collector reads it; the scanner must take its scan keys
    and leave the rest (broker, identity, store) alone, unread files included."""
    path.write_text(f"""
scan_timeout_s = 2.0
scan_interval_s = 600

[mqtt]
broker = "mqtts://broker.invalid:8883"

[tls]
ca_bundle = "{trust}"
cert = "not-here.pem"
key = "not-here.key"
fleet_ca = ["not-here-either.pem"]

[store]
url = "sqlite:///collector.db"

[policy]
{policy}

[[scan_targets]]
host = "127.0.0.1"
port = {port}
""")
    return path


def test_cli_config_scans_the_collectors_targets_with_its_trust_and_policy(
    scenario_broker: ScenarioBroker, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    sb = scenario_broker
    port = sb.ports["expiring_leaf_20d"]
    config = collector_toml(tmp_path / "collector.toml", sb.trust_paths["expiring_leaf_20d"],
                            port, "warn_days = 10\ncrit_days = 5")
    # No endpoint on the command line: the target, the trust bundle (the system bundle
    # would make the chain INVALID, exit 2) and warn_days (30 d would warn) are the file's.
    assert cli.main(["--config", str(config), "--json"]) == 0
    (target,) = json.loads(capsys.readouterr().out)["targets"]
    assert target["name"] == f"127.0.0.1:{port}" and target["chain_valid"] is True
    assert target["findings"] == []
    # A flag overrides what it names and nothing else.
    assert cli.main(["--config", str(config), "--warn-days", "30"]) == 1
    assert "CERT_EXPIRING" in capsys.readouterr().out
    # ... so a stricter key rule of the config survives --warn-days (the P-256 leaf is weak).
    strict = collector_toml(tmp_path / "strict.toml", sb.trust_paths["expiring_leaf_20d"],
                            port, "warn_days = 10\ncrit_days = 5\nmin_ec_bits = 384")
    assert cli.main(["--config", str(strict), "--warn-days", "15", "--json"]) == 2
    (target,) = json.loads(capsys.readouterr().out)["targets"]
    assert {f["code"] for f in target["findings"]} == {"WEAK_KEY"}  # leaf and intermediate


def test_cli_config_timeout_and_problems(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scenario_broker: ScenarioBroker,
) -> None:
    trust = scenario_broker.trust_paths["ok"]
    with socket.create_server(("127.0.0.1", 0)) as hole:
        config = collector_toml(tmp_path / "c.toml", trust, hole.getsockname()[1], "")
        config.write_text(config.read_text().replace("scan_timeout_s = 2.0",
                                                     "scan_timeout_s = 0.3"))
        started = time.monotonic()
        assert cli.main(["--config", str(config), "--json"]) == 3  # the config's timeout
        assert time.monotonic() - started < 2.0
    (target,) = json.loads(capsys.readouterr().out)["targets"]
    assert target["target"]["timeout_s"] == 0.3 and target["error_kind"] == "handshake_timeout"
    # A problem in the scan keys is the scanner's: exit 78, file:line: key: problem.
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace("[[scan_targets]]\n",
                                              "[[scan_targets]]\ncolour = 'red'\n"))
    assert cli.main(["--config", str(bad)]) == 78
    line = bad.read_text().splitlines().index("colour = 'red'") + 1
    assert capsys.readouterr().err.splitlines() == [
        f"certmon-scan: {bad}:{line}: scan_targets[0].colour: unknown key"]


def test_the_scan_keys_read_alike_by_collector_and_scanner() -> None:
    from certmon.scanconfig import ScanSettings, load_scan_settings
    from collector.config import CollectorConfig, load_collector_config

    example = Path(__file__).resolve().parents[1] / "packaging" / "collector.example.toml"
    collector = load_collector_config(example, check_files=False)
    settings = load_scan_settings(example, check_files=False)
    assert settings.scan_targets == collector.scan_targets != ()
    assert settings.policy == collector.policy
    assert settings.scan_timeout_s == collector.scan_timeout_s
    assert settings.tls.ca_bundle == collector.tls.ca_bundle
    # The one key declared in both schemas carries the same default and rule.
    ours, theirs = (next(f for f in dataclasses.fields(c) if f.name == "scan_timeout_s")
                    for c in (ScanSettings, CollectorConfig))
    assert (ours.default, ours.metadata) == (theirs.default, theirs.metadata)


def test_each_endpoint_gets_its_own_mqtt_client_id_unless_one_was_chosen() -> None:
    # Two listeners of one broker share a session namespace: probes with one client id
    # would knock each other off. The collector's scheduled scans use this too.
    chosen = ProbeTarget("127.0.0.1", 8884, mqtt=True, mqtt_client_id="ops-probe")
    targets = [ProbeTarget("127.0.0.1", 8883, mqtt=True), chosen,
               ProbeTarget("127.0.0.1", 8885, mqtt=True)]
    ids = [t.mqtt_client_id for t in scan.distinct_client_ids(targets, "certmon-scan-7")]
    assert ids == ["certmon-scan-7-0", "ops-probe", "certmon-scan-7-2"]


def test_cli_on_a_plain_mqtt_port_says_it_does_not_speak_tls(
    mosquitto_factory: MosquittoFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    """A newcomer's `certmon-scan 127.0.0.1:1883` (here: a plain listener of our own):
    one finding saying what the port is, not "handshake_failed: Connection reset"."""
    port = mosquitto_factory([Listener()]).ports[0]
    assert cli.main([f"127.0.0.1:{port}", "--timeout-s", "2"]) == 3
    out = capsys.readouterr().out
    assert (f"UNKNOWN  PROBE_FAILED             not_tls: 127.0.0.1:{port} does not speak "
            "TLS: it answers MQTT without TLS (CONNACK 0 to a plain CONNECT)") in out
    assert "Connection reset" not in out
