"""The wire format: golden bytes, signatures, tampering, strict decoding, topics.

Keys are generated here with cryptography directly (not the shared PKI factory) so
this file pins the protocol independently. Set CERTMON_UPDATE_GOLDEN=1 to rewrite
tests/data/golden — which is a schema decision, see docs/protocol.md.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import hashlib
import importlib.resources
import json
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from certmon import wire as P
from certmon.errors import PKIError, ProtocolError
from certmon.pki import Finding, FindingCode, Severity

GOLDEN = Path(__file__).parent / "data" / "golden"
UPDATE = os.environ.get("CERTMON_UPDATE_GOLDEN") == "1"
T = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
# A throwaway test key: the golden Ed25519 JWS is reproducible from this seed.
ED25519_SEED = bytes(range(32))


def fp(byte: str) -> str:
    return byte * 32


def make_cert(key: Any, cn: str = "gw-berlin-000123") -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(0x1234)
               .not_valid_before(T - timedelta(days=1)).not_valid_after(T + timedelta(days=365)))
    return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
}
ALGS = {"p256": "ES256", "p384": "ES384", "ed25519": "Ed25519", "rsa2048": "PS256"}


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[Any, x509.Certificate]]:
    out = {}
    for name, new in KEYS.items():
        key = new()
        out[name] = (key, make_cert(key))
    return out


def golden_status() -> P.Status:
    """Exercises every field type: nested objects, lists, nulls, floats, a non-ASCII
    subject, an optional finding field both present and absent."""
    return P.Status(
        device_id="gw-berlin-000123", boot_id="3f2b8c1e-5d6a-4e0f-9b7c-2a1d4e5f6a7b", seq=18234,
        ts=T, mono_s=86512.25, interval_s=300,
        client=P.CertSummary(sha256=fp("a1"), not_after=T + timedelta(days=65),
                             key_matches=True, key_mode="0600"),
        client_chain=P.ChainSummary(
            valid_now=True, valid_at_warn=True, method="cryptography", error=None,
            path=(fp("a1")[:16], fp("b2")[:16], fp("c3")[:16]),
            earliest_not_after=T + timedelta(days=65), earliest_ref=fp("a1")[:16]),
        trust_store=P.TrustStoreSummary(count=3, digest=fp("d4"), expiring=(
            P.CertBrief(ref=fp("e5")[:16], subject="CN=Acme Root CA 2016,O=Acme IoT",
                        not_after=T + timedelta(days=40)),
            P.CertBrief(ref=fp("f6")[:16], subject="CN=Zertifizierungsstelle Ä,O=Müller GmbH",
                        not_after=T - timedelta(days=900)))),
        broker=P.BrokerSeen(
            host="mqtt.acme-iot.example", port=8883, tls_version="TLSv1.3", chain=(
                P.CertBrief(ref=fp("07")[:16], subject="CN=mqtt.acme-iot.example",
                            not_after=T + timedelta(days=20)),
                P.CertBrief(ref=fp("18")[:16], subject="CN=Acme Servers CA 1,O=Acme IoT",
                            not_after=T + timedelta(days=800))),
            valid_now=True, valid_at_warn=False, error=None, seen_at=T - timedelta(seconds=212)),
        clock=P.ClockSummary(synced=True, source="chrony", offset_s=-0.000231, maxerror_s=0.0451,
                             plausible=True, beacon=P.BeaconEcho(
                                 beacon_ts=T - timedelta(seconds=60), received_mono_s=86452.125)),
        findings=(
            P.FindingWire(code="BROKER_CERT_EXPIRING", severity=Severity.WARNING,
                          cert=fp("07")[:16], msg="broker certificate CN=mqtt.acme-iot.example "
                          "expires 2026-03-21T12:00:00Z (in 20.0 days, 5% of its lifetime left)",
                          not_after=T + timedelta(days=20)),
            P.FindingWire(code="CA_EXPIRING", severity=Severity.WARNING, cert=fp("e5")[:16],
                          msg="trusted CA CN=Acme Root CA 2016,O=Acme IoT expires "
                          "2026-04-10T12:00:00Z (in 40.0 days, 0% of its lifetime left)"),
            P.FindingWire(code="CLOCK_UNSYNCED", severity=Severity.CRITICAL, cert=None,
                          msg="kernel clock not synchronised (maxerror 16.0 s)"),
        ),
        agent=P.AgentSelf(version="0.1.0", uptime_s=86400.5, rss_bytes=23_456_768,
                          last_publish_ok_at=T - timedelta(seconds=300), spool_depth=0,
                          spool_dropped=0),
    )


def golden_file(name: str, data: bytes) -> bytes:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path.read_bytes()


def ed25519_fixture() -> tuple[ed25519.Ed25519PrivateKey, x509.Certificate]:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(ED25519_SEED)
    return key, make_cert(key)  # Ed25519 signatures are deterministic: so is the cert


def schema() -> dict[str, Any]:
    text = importlib.resources.files("certmon").joinpath("schemas/status-v1.json").read_text()
    return dict(json.loads(text))


def b64u(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def with_header(token: bytes, **changes: Any) -> bytes:
    head, payload, sig = token.split(b".")
    header = json.loads(base64.urlsafe_b64decode(head + b"==="))
    for k, v in changes.items():
        if v is None:
            header.pop(k.replace("_", "#"), None)
        else:
            header[k.replace("_", "#")] = v
    return b".".join([b64u(json.dumps(header).encode()), payload, sig])


def reason_of(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(ProtocolError) as err:
        fn(*args, **kw)
    return err.value.reason


# --------------------------------------------------------------------------- golden


def test_status_golden_bytes() -> None:
    data = P.encode_status(golden_status())
    assert data == golden_file("status-v1.json", data)
    assert P.decode_status(data) == golden_status()


def test_ed25519_golden_jws_is_reproducible_and_verifies() -> None:
    key, cert = ed25519_fixture()
    token = P.sign_jws(P.encode_status(golden_status()), key, cert)
    assert token == golden_file("status-v1.ed25519.jws", token)
    parsed = P.parse_jws(token, P.MAX_STATUS_JWS_BYTES)
    P.verify_jws(parsed, cert.public_key())
    assert parsed.payload == (GOLDEN / "status-v1.json").read_bytes()


def test_es256_header_is_pinned(keys: dict[str, Any]) -> None:
    key, cert = keys["p256"]
    token = P.sign_jws(b"{}", key, cert)
    header = json.loads(base64.urlsafe_b64decode(token.split(b".")[0] + b"==="))
    assert header == {"alg": "ES256", "typ": "certmon-status+jws",
                      "x5t#S256": b64u(cert.fingerprint(hashes.SHA256())).decode()}


def test_encoding_is_canonical() -> None:
    data = P.encode_status(golden_status())
    assert "Ä".encode() in data  # UTF-8, not \\u escapes
    obj = json.loads(data)
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode()


def test_encoded_status_matches_schema() -> None:
    validator = jsonschema.Draft202012Validator(schema())
    validator.validate(json.loads(P.encode_status(golden_status())))
    bare = dataclasses.replace(golden_status(), client=None, client_chain=None,
                               trust_store=None, broker=None, findings=())
    validator.validate(json.loads(P.encode_status(bare)))


def test_schema_names_the_same_fields_as_the_dataclasses() -> None:
    s = schema()
    defs = s["$defs"]
    pairs = [(s, P.Status), (defs["cert_summary"], P.CertSummary),
             (defs["cert_brief"], P.CertBrief), (defs["chain_summary"], P.ChainSummary),
             (defs["trust_store"], P.TrustStoreSummary), (defs["broker"], P.BrokerSeen),
             (defs["clock"], P.ClockSummary), (defs["finding"], P.FindingWire),
             (defs["agent"], P.AgentSelf)]
    for sub, cls in pairs:
        names = {f.name for f in dataclasses.fields(cls)} | ({"v"} if cls is P.Status else set())
        assert set(sub["properties"]) == names, cls.__name__


# --------------------------------------------------------------------------- signatures


@pytest.mark.parametrize("kind", list(KEYS))
def test_sign_parse_verify_round_trip(kind: str, keys: dict[str, Any]) -> None:
    key, cert = keys[kind]
    payload = P.encode_status(golden_status())
    token = P.sign_jws(payload, key, cert)
    parsed = P.parse_jws(token, P.MAX_STATUS_JWS_BYTES)
    assert parsed.alg == ALGS[kind] == P.alg_for_key(key)
    assert parsed.cert_sha256 == cert.fingerprint(hashes.SHA256()).hex()
    assert parsed.x5c == ()
    P.verify_jws(parsed, cert.public_key())
    assert P.decode_status(parsed.payload) == golden_status()


def test_x5c_travels_and_must_match_the_thumbprint(keys: dict[str, Any]) -> None:
    key, cert = keys["p256"]
    _, other = keys["ed25519"]
    token = P.sign_jws(b"{}", key, cert, include_x5c=True, chain=[other])
    parsed = P.parse_jws(token, P.MAX_STATUS_JWS_BYTES)
    assert [x509.load_der_x509_certificate(d) for d in parsed.x5c] == [cert, other]
    P.verify_jws(parsed, cert.public_key())
    swapped = with_header(token, x5c=[base64.b64encode(d).decode() for d in parsed.x5c[::-1]])
    assert reason_of(P.parse_jws, swapped, 99999) == "bad_header"


def test_signing_key_must_match_certificate(keys: dict[str, Any]) -> None:
    with pytest.raises(PKIError):
        P.sign_jws(b"{}", keys["p256"][0], keys["p384"][1])


def test_verify_rejects_the_wrong_key_of_the_same_type(keys: dict[str, Any]) -> None:
    key, cert = keys["p256"]
    token = P.sign_jws(b"{}", key, cert)
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    parsed = P.parse_jws(token, 9999)
    assert reason_of(P.verify_jws, parsed, stranger) == "bad_signature"


# --------------------------------------------------------------------------- tampering


def tamper_cases(keys: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """name → (thunk raising ProtocolError, expected reason). Covers every reason."""
    key, cert = keys["p256"]
    ed_key, ed_cert = keys["ed25519"]
    good = P.sign_jws(P.encode_status(golden_status()), key, cert)
    head, payload, sig = good.split(b".")
    flipped = bytearray(base64.urlsafe_b64decode(payload + b"==="))
    flipped[10] ^= 0x01

    def verify(token: bytes, pub: Any = None) -> Any:
        return lambda: P.verify_jws(P.parse_jws(token, 99999), pub or cert.public_key())

    def decode(data: bytes) -> Any:
        return lambda: P.decode_status(data)

    status_json = json.loads(P.encode_status(golden_status()))
    return {
        "oversized": (lambda: P.parse_jws(good, len(good) - 1), "oversized"),
        "oversized_payload": (decode(b" " * (P.MAX_MESSAGE_BYTES + 1)), "oversized"),
        "two_parts": (verify(head + b"." + payload), "not_jws"),
        "four_parts": (verify(good + b".x"), "not_jws"),
        "padding": (verify(head + b"." + payload + b"." + sig + b"=="), "bad_base64"),
        "std_alphabet": (verify(head + b"." + payload.replace(b"e", b"+", 1) + b"." + sig),
                         "bad_base64"),
        "non_canonical": (verify(head + b"." + b"AR" + b"." + sig), "bad_base64"),
        "header_not_json": (verify(b64u(b"{alg") + b"." + payload + b"." + sig), "not_json"),
        "header_array": (verify(b64u(b"[]") + b"." + payload + b"." + sig), "bad_header"),
        "alg_missing": (verify(with_header(good, alg=None)), "bad_header"),
        "alg_none": (verify(with_header(good, alg="none")), "unsupported_alg"),
        "alg_hs256": (verify(with_header(good, alg="HS256")), "unsupported_alg"),
        "alg_eddsa_legacy": (verify(with_header(good, alg="EdDSA")), "unsupported_alg"),
        "alg_swapped": (verify(with_header(good, alg="Ed25519")), "alg_mismatch"),
        "alg_vs_key": (verify(good, ed_cert.public_key()), "alg_mismatch"),
        "typ_wrong": (verify(with_header(good, typ="JWT")), "bad_header"),
        "typ_inventory": (verify(with_header(good, typ=P.INVENTORY_TYP)), "bad_header"),
        "crit": (verify(with_header(good, crit=["exp"])), "bad_header"),
        "x5t_missing": (verify(with_header(good, x5t_S256=None)), "bad_header"),
        "x5t_short": (verify(with_header(good, x5t_S256="abc")), "bad_header"),
        "x5t_bad": (verify(with_header(good, x5t_S256="*" * 43)), "bad_header"),
        "x5c_not_list": (verify(with_header(good, x5c="MIIB")), "bad_header"),
        "x5c_bad_b64": (verify(with_header(good, x5c=["***"])), "bad_header"),
        "payload_flip": (verify(b".".join([head, b64u(bytes(flipped)), sig])), "bad_signature"),
        "sig_flip": (verify(b".".join([head, payload, sig[:-2] + (b"AA" if sig[-2:] != b"AA"
                                                                     else b"BA")])),
                     "bad_signature"),
        "sig_short": (verify(b".".join([head, payload, sig[:40]])), "bad_signature"),
        "header_grafted": (verify(P.sign_jws(b"{}", ed_key, ed_cert).split(b".")[0] + b"."
                                  + payload + b"." + sig, ed_cert.public_key()), "bad_signature"),
        "unsupported_key": (lambda: P.alg_for_key(ec.generate_private_key(ec.SECP521R1())),
                            "unsupported_alg"),
        "not_utf8": (decode(b"\xff{}"), "not_json"),
        "nan": (decode(b'{"v":NaN}'), "not_json"),
        "dup_key": (decode(b'{"v":1,"v":1}'), "not_json"),
        "deep": (decode(b"[" * 100_000 + b"]" * 100_000), "not_json"),
        "huge_int": (decode(b'{"v":' + b"9" * 5000 + b"}"), "not_json"),
        "not_object": (decode(b"[]"), "bad_schema"),
        "v_missing": (decode(b"{}"), "bad_schema"),
        "v_bool": (decode(b'{"v":true}'), "bad_schema"),
        "v2": (decode(json.dumps({**status_json, "v": 2}).encode()), "unknown_version"),
    }


def test_every_tamper_case_gives_its_reason(keys: dict[str, Any]) -> None:
    for name, (thunk, reason) in tamper_cases(keys).items():
        assert reason_of(thunk) == reason, name


def test_every_reason_is_reachable(keys: dict[str, Any]) -> None:
    reached = {reason for _, reason in tamper_cases(keys).values()}
    assert reached == set(P.PROTOCOL_REASONS)


def test_payload_byte_flip_is_bad_signature_for_every_key(keys: dict[str, Any]) -> None:
    for key, cert in keys.values():
        token = bytearray(P.sign_jws(b'{"v":1,"seq":41}', key, cert))
        i = token.index(b".") + 5
        token[i] = ord("A") if token[i] != ord("A") else ord("B")
        parsed = P.parse_jws(bytes(token), 9999)
        assert reason_of(P.verify_jws, parsed, cert.public_key()) == "bad_signature"


# --------------------------------------------------------------------------- decoding


def leaves(obj: Any, path: str = "") -> list[tuple[str, list[Any]]]:
    """(dotted path, key path) of every scalar in a decoded status."""
    out: list[tuple[str, list[Any]]] = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        p = f"{path}[{k}]" if isinstance(obj, list) else (f"{path}.{k}" if path else k)
        if isinstance(v, dict | list) and v:
            out += [(q, [k, *keys]) for q, keys in leaves(v, p)]
        else:
            out.append((p, [k]))
    return out


def set_at(obj: Any, keys: list[Any], value: Any) -> Any:
    obj = copy.deepcopy(obj)
    target = obj
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    return obj


def test_a_wrong_type_in_any_field_names_that_field() -> None:
    good = json.loads(P.encode_status(golden_status()))
    def family(v: Any) -> str:
        return "number" if isinstance(v, int | float) and not isinstance(v, bool) else \
            type(v).__name__

    for path, keys in leaves(good):
        if path == "v":
            continue
        value = good
        for k in keys:
            value = value[k]
        for wrong in ({"x": 1}, [1], 1.5, "x" * 600, True):
            if family(wrong) == family(value) and not isinstance(wrong, str):
                continue
            bad = set_at(good, keys, wrong)
            with pytest.raises(ProtocolError) as err:
                P.Status.from_json(bad)
            assert err.value.reason == "bad_schema", path
            assert str(err.value).startswith(path), (path, str(err.value))


def test_missing_required_field_is_named() -> None:
    good = json.loads(P.encode_status(golden_status()))
    del good["clock"]["plausible"]
    with pytest.raises(ProtocolError, match=r"^clock\.plausible: missing"):
        P.Status.from_json(good)


def test_unknown_fields_are_ignored_and_nulls_may_be_omitted() -> None:
    good = json.loads(P.encode_status(golden_status()))
    good["future_field"] = {"anything": [1, 2]}
    good["clock"]["leap_indicator"] = 0
    assert P.Status.from_json(good) == golden_status()
    del good["broker"]
    assert P.Status.from_json(good).broker is None


@pytest.mark.parametrize("text", ["2026-03-01T12:00:00", "2026-03-01 12:00:00Z",
                                  "2026-03-01T12:00:00.5Z", "2026-03-01T12:00:00+00:00",
                                  "2026-02-30T12:00:00Z", "2026-03-01T12:00:60Z",
                                  "２０２６-03-01T12:00:00Z"])
def test_instants_are_strict(text: str) -> None:
    good = json.loads(P.encode_status(golden_status()))
    good["ts"] = text
    assert reason_of(P.Status.from_json, good) == "bad_schema"


def test_instants_are_utc_whole_seconds() -> None:
    cet = timezone(timedelta(hours=1))
    assert P.format_instant(datetime(2026, 3, 1, 13, 0, 0, 999_999, tzinfo=cet)) == \
        "2026-03-01T12:00:00Z"
    with pytest.raises(ValueError, match="naive"):
        P.format_instant(datetime(2026, 3, 1))


def test_strings_that_stores_cannot_hold_are_rejected() -> None:
    good = json.loads(P.encode_status(golden_status()))
    for value in ("a\x00b", "\ud800"):
        bad = set_at(good, ["broker", "host"], value)
        assert reason_of(P.Status.from_json, bad) == "bad_schema"


def test_free_text_is_clamped_by_the_encoder_not_rejected() -> None:
    long = dataclasses.replace(golden_status().findings[0], msg="x\x00" * 300)
    status = dataclasses.replace(golden_status(), findings=(long,))
    decoded = P.decode_status(P.encode_status(status))
    assert len(decoded.findings[0].msg) == 256 and "\x00" not in decoded.findings[0].msg


def test_bad_device_id_in_payload_is_bad_schema() -> None:
    good = json.loads(P.encode_status(golden_status()))
    for bad_id in ("fleet", "_collector", "a/b", "a+b", "", "x" * 65):
        with pytest.raises(ProtocolError, match=r"^device_id: "):
            P.Status.from_json({**good, "device_id": bad_id})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_decode_status_of_any_json_raises_only_protocol_error(value: Any) -> None:
    try:
        data = json.dumps(value).encode()
    except ValueError:  # infinities
        return
    with contextlib.suppress(ProtocolError):
        P.decode_status(data)


GOOD_LEAVES = leaves(json.loads(P.encode_status(golden_status())))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(GOOD_LEAVES), json_values)
def test_mutated_status_decodes_only_if_schema_valid(leaf: Any, value: Any) -> None:
    """Replace one field by any JSON value: the decoder either rejects it with
    ProtocolError or accepts something the published schema also accepts."""
    good = json.loads(P.encode_status(golden_status()))
    mutated = set_at(good, leaf[1], value)
    try:
        data = json.dumps(mutated, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except ValueError:
        return
    try:
        P.decode_status(data)
    except ProtocolError:
        return
    jsonschema.Draft202012Validator(schema()).validate(mutated)


# --------------------------------------------------------------------------- size


def test_realistic_status_size(keys: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    key, cert = keys["p256"]
    payload = P.encode_status(golden_status())
    token = P.sign_jws(payload, key, cert)
    with capsys.disabled():
        print(f"\nrealistic status: payload {len(payload)} B, ES256 JWS {len(token)} B")
    # The brief's 2 KB target is not met; see docs/protocol.md "Size" for why.
    assert len(token) < P.MAX_STATUS_JWS_BYTES // 4


def test_a_status_with_many_problems_stays_well_within_one_packet(keys: dict[str, Any]) -> None:
    # Decision (docs/protocol.md, "Size"): a typical status — a healthy device, or one
    # with a finding — is under 2 KB as JWS (measured by the agent tests and
    # bench/agent_footprint.py); this one, with three findings, two expiring CAs and
    # two chains, is allowed ~3 KB rather than giving up readable keys or messages.
    key, cert = keys["p256"]
    assert len(P.sign_jws(P.encode_status(golden_status()), key, cert)) < 3500


# --------------------------------------------------------------------------- siblings


def test_inventory_round_trip_and_digest_check(keys: dict[str, Any]) -> None:
    cas = (P.CaEntry(sha256=fp("e5"), subject="CN=Acme Root CA 2016", not_before=T,
                     not_after=T + timedelta(days=40)),
           P.CaEntry(sha256=fp("0a"), subject="CN=Acme Root CA 2026", not_before=T,
                     not_after=T + timedelta(days=9000)))
    digest = P.trust_store_digest([c.sha256 for c in reversed(cas)] + [fp("e5")])
    inv = P.Inventory(device_id="gw-1", ts=T, digest=digest, cas=cas)
    key, cert = keys["ed25519"]
    token = P.sign_jws(P.encode_message(inv), key, cert, typ=P.INVENTORY_TYP)
    parsed = P.parse_jws(token, P.MAX_INVENTORY_JWS_BYTES, typ=P.INVENTORY_TYP)
    P.verify_jws(parsed, cert.public_key())
    assert P.decode_message(P.Inventory, parsed.payload) == inv
    assert reason_of(P.parse_jws, token, 99999) == "bad_header"  # not a status
    forged = P.encode_message(dataclasses.replace(inv, digest=fp("00")))
    with pytest.raises(ProtocolError, match=r"^digest: "):
        P.decode_message(P.Inventory, forged)


def test_cert_message_round_trip(keys: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    _, cert = keys["p256"]
    _, client = keys["rsa2048"]
    der = [base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in (cert, client)]
    msg = P.CertMessage(device_id="gw-1", sha256=cert.fingerprint(hashes.SHA256()).hex(),
                        x5c=tuple(der[:1]), client_x5c=tuple(der[1:]))
    decoded = P.decode_message(P.CertMessage, P.encode_message(msg))
    assert decoded == msg
    assert decoded.certificates() == [cert]
    assert decoded.certificates(client=True) == [client]
    wrong = P.encode_message(dataclasses.replace(msg, sha256=fp("00")))
    assert reason_of(P.decode_message, P.CertMessage, wrong) == "bad_schema"
    junk = P.encode_message(dataclasses.replace(msg, x5c=("AAAA",),
                                                sha256=hashlib.sha256(b"\0\0\0").hexdigest()))
    assert reason_of(P.decode_message(P.CertMessage, junk).certificates) == "bad_schema"


def test_beacon_round_trip() -> None:
    data = P.encode_message(P.Beacon(ts=T))
    assert data == b'{"ts":"2026-03-01T12:00:00Z","v":1}'
    assert P.decode_message(P.Beacon, data) == P.Beacon(ts=T)


def test_findings_to_wire_and_unknown_codes_survive_decoding() -> None:
    finding = Finding(FindingCode.CERT_EXPIRING, Severity.WARNING, "expires soon",
                      cert_sha256=fp("ab"), subject="CN=x", not_after=T)
    wire = P.finding_to_wire(finding)
    assert wire == P.FindingWire(code="CERT_EXPIRING", severity=Severity.WARNING,
                                 cert=fp("ab")[:16], msg="expires soon", not_after=T)
    future = dataclasses.replace(wire, code="CERT_FROM_THE_FUTURE")
    assert P.Status.from_json(json.loads(P.encode_status(dataclasses.replace(
        golden_status(), findings=(future,))))).findings == (future,)


def test_trust_store_digest_is_order_independent() -> None:
    assert P.trust_store_digest([fp("01"), fp("02")]) == P.trust_store_digest([fp("02"),
                                                                               fp("01")])
    assert P.trust_store_digest([]) == \
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --------------------------------------------------------------------------- topics


def test_topic_builders() -> None:
    pre = P.DEFAULT_PREFIX
    assert P.status_topic(pre, "gw-1") == "certmon/v2/devices/gw-1/status"
    assert P.cert_topic(pre, "gw-1") == "certmon/v2/devices/gw-1/cert"
    assert P.online_topic(pre, "gw-1") == "certmon/v2/devices/gw-1/online"
    assert P.inventory_topic(pre, "gw-1") == "certmon/v2/devices/gw-1/inventory"
    assert P.beacon_topic(pre) == "certmon/v2/_collector/time"
    assert P.fleet_summary_topic(pre) == "certmon/v2/fleet/summary"
    assert P.fleet_device_topic(pre, "summary") == "certmon/v2/fleet/devices/summary"
    assert P.alerts_topic(pre) == "certmon/v2/alerts"
    assert P.alerts_topic(pre, "gw-1") == "certmon/v2/alerts/gw-1"
    assert P.device_topic_filter(pre, P.TopicKind.STATUS) == "certmon/v2/devices/+/status"
    assert P.device_topic_filter("site/a") == "site/a/devices/+/+"
    assert P.legacy_v1_device_topic("gw-1", P.TopicKind.CERT) == "certmon/v1/gw-1/cert"
    with pytest.raises(ValueError, match="wildcard"):
        P.status_topic(pre, "#")
    with pytest.raises(ValueError, match="reserved"):
        P.legacy_v1_device_topic("fleet", P.TopicKind.STATUS)


def test_no_device_topic_reaches_a_fleet_alert_or_collector_topic() -> None:
    """The broker lets a CN write `<prefix>/devices/<CN>/#`: whatever the CN, that is
    never a topic dashboards, alert consumers or agents read from the collector."""
    pre = P.DEFAULT_PREFIX
    collector_topics = [P.fleet_summary_topic(pre), P.fleet_device_topic(pre, "gw-1"),
                        P.alerts_topic(pre), P.alerts_topic(pre, "gw-1"), P.beacon_topic(pre)]
    for cn in ("fleet", "alerts", "_collector", "collector", "devices", "gw-1"):
        own = f"{pre}/devices/{cn}/"
        assert not [t for t in collector_topics if t.startswith(own)], cn


def test_device_topic_filters_add_the_v1_layout_only_when_asked() -> None:
    kind = P.TopicKind.STATUS
    assert P.device_topic_filters("certmon/v2", kind) == ("certmon/v2/devices/+/status",)
    assert P.device_topic_filters("certmon/v2", kind, legacy_v1=True) == (
        "certmon/v2/devices/+/status", "certmon/v1/+/status")


@pytest.mark.parametrize(("topic", "expected"), [
    ("certmon/v2/devices/gw-1/status", ("gw-1", P.TopicKind.STATUS)),
    ("certmon/v2/devices/gw-1/inventory", ("gw-1", P.TopicKind.INVENTORY)),
    ("certmon/v2/devices/devices/cert", ("devices", P.TopicKind.CERT)),
    ("certmon/v2/devices/gw-1/status/extra", None),
    ("certmon/v2/devices/gw-1/bogus", None),
    ("certmon/v2/devices/fleet/status", None),
    ("certmon/v2/devices/_collector/status", None),
    ("certmon/v2/fleet/summary", None),
    ("certmon/v2/fleet/devices/gw-1", None),
    ("certmon/v2/alerts/gw-1", None),
    ("certmon/v2/_collector/time", None),
    ("certmon/v2/devices/status", None),
    ("certmon/v2/gw-1/status", None),  # the v1 layout under the v2 prefix
    ("certmon/v1/gw-1/status", None),  # v1: only with legacy_v1
    ("certmon/v2x/devices/gw-1/status", None),
])
def test_parse_device_topic(topic: str, expected: Any) -> None:
    assert P.parse_device_topic("certmon/v2", topic) == expected


@pytest.mark.parametrize(("topic", "expected"), [
    ("certmon/v1/gw-1/status", ("gw-1", P.TopicKind.STATUS)),
    ("certmon/v1/gw-1/online", ("gw-1", P.TopicKind.ONLINE)),
    ("certmon/v2/devices/gw-1/cert", ("gw-1", P.TopicKind.CERT)),
    ("certmon/v1/fleet/summary", None),
    ("certmon/v1/_collector/time", None),
    ("certmon/v1/devices/gw-1/status", None),
    ("certmon/v1/gw-1/status/extra", None),
    ("certmon/v1x/gw-1/status", None),
])
def test_parse_device_topic_with_the_v1_layout(topic: str, expected: Any) -> None:
    assert P.parse_device_topic("certmon/v2", topic, legacy_v1=True) == expected


@pytest.mark.parametrize(("device_id", "problem"), [
    ("gw-berlin-000123", None), ("Fleet", None), ("ünïcode-ok", None), ("x" * 64, None),
    ("", "empty"), ("x" * 65, "65 characters"), ("a+b", "wildcard"), ("a#", "wildcard"),
    ("a/b", "separates"), ("a b", "whitespace"), ("a\tb", "whitespace"),
    ("a\u202eb", "control"), ("a\x00", "control"), ("fleet", "reserved"),
    ("alerts", "reserved"), ("_collector", "'_'"),
])
def test_validate_device_id(device_id: str, problem: str | None) -> None:
    result = P.validate_device_id(device_id)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result
