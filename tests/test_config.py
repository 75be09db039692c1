"""Config schemas and loader: one invalid fixture per rule, each with its exact message."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import pytest

from agent.config import AgentConfig, ClockConfig, LoopConfig, load_agent_config
from certmon.config import (
    ConfigInvalid,
    PolicyConfig,
    broker_endpoint,
    load,
    loads,
    render_reference,
    schema,
    setting,
    validate_device_id,
)
from certmon.errors import ConfigError
from collector.config import (
    AlertsConfig,
    CollectorConfig,
    IngestConfig,
    ScanTarget,
    StoreConfig,
    TrustRequirement,
    WebConfig,
    load_collector_config,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "config"


def problems_of(schema_cls: type, name: str, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(schema_cls, DATA / name, check_files=False, **kwargs)  # type: ignore[arg-type]
    return str(info.value).splitlines()


# One fixture per rule; the expected line is exact (after "FILE:").
@pytest.mark.parametrize(
    ("schema_cls", "name", "expected"),
    [
        (AgentConfig, "invalid-unknown-key.toml",
         "11: agent.interval: unknown key (did you mean 'interval_s'?)"),
        (AgentConfig, "invalid-unknown-section.toml",
         "10: polcy: unknown section (did you mean 'policy'?)"),
        (AgentConfig, "invalid-wrong-type.toml",
         "11: agent.interval_s: expected an integer, got string '300'"),
        (AgentConfig, "invalid-url-scheme.toml",
         "3: mqtt.broker: unsupported scheme 'http' (use mqtt:// or mqtts://)"),
        (AgentConfig, "invalid-missing-required.toml", "5: tls.key: required key is missing"),
        (AgentConfig, "invalid-out-of-range.toml",
         "11: agent.interval_s: must be at least 10 (got 5)"),
        (AgentConfig, "invalid-device-id.toml",
         "2: device_id: 'fleet' is reserved for fleet and collector topics"),
        (AgentConfig, "invalid-choice.toml",
         "4: mqtt.protocol: must be one of 'v5', 'v311' (got 'v4')"),
        (AgentConfig, "invalid-cross-field.toml",
         "12: policy.crit_days: must not exceed warn_days (14)"),
        (AgentConfig, "invalid-syntax.toml", "11: invalid TOML: Invalid value (column 13)"),
        (CollectorConfig, "invalid-collector-store-scheme.toml",
         "12: store.url: unsupported scheme 'mysql' (use sqlite:// or postgresql://)"),
        (CollectorConfig, "invalid-collector-fleet-ca-empty.toml",
         "9: tls.fleet_ca: needs at least 1 item(s)"),
        (CollectorConfig, "invalid-collector-trust-requirement.toml",
         "15: trust_requirements[1].ca_file: set exactly one of ca_file and sha256"),
        (CollectorConfig, "invalid-collector-scan-target.toml",
         "16: scan_targets[1].port: must be at most 65535 (got 88830)"),
    ],
)
def test_invalid_fixture_reports_exact_line(schema_cls: type, name: str, expected: str) -> None:
    assert problems_of(schema_cls, name) == [f"{DATA / name}:{expected}"]


def test_unreadable_file_is_reported_with_resolved_path() -> None:
    path = DATA / "invalid-unreadable-file.toml"
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    missing = DATA / "does-not-exist-ca.pem"
    assert str(info.value) == (
        f"{path}:7: tls.ca_bundle: cannot read '{missing}': No such file or directory")


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert str(info.value) == f"{path}: cannot read config file: No such file or directory"


def test_all_problems_are_reported_together_in_file_order() -> None:
    name = "invalid-several.toml"
    assert problems_of(AgentConfig, name) == [
        f"{DATA / name}:{line}" for line in (
            "2: device_id: must not contain '/' (it separates topic levels)",
            "5: mqtt.broker: unsupported scheme 'http' (use mqtt:// or mqtts://)",
            "6: mqtt.keepalive: unknown key (did you mean 'keepalive_s'?)",
            "8: tls.key: required key is missing",
            "10: tls.cert: expected a path (string), got integer 42",
            "13: agent.interval_s: must be at least 10 (got 1)",
            "14: agent.jitter_fraction: must be at most 0.5 (got 0.9)",
            "16: clocks: unknown section (did you mean 'clock'?)",
        )
    ]


def test_problems_are_also_available_as_data() -> None:
    with pytest.raises(ConfigInvalid) as info:
        load(AgentConfig, DATA / "invalid-out-of-range.toml", check_files=False)
    (problem,) = info.value.problems
    assert (problem.line, problem.key) == (11, "agent.interval_s")


def test_missing_section_has_no_line() -> None:
    text = '[mqtt]\nbroker = "mqtts://b"\n'
    with pytest.raises(ConfigError) as info:
        loads(AgentConfig, text, source="a.toml")
    assert str(info.value).splitlines() == [
        "a.toml: tls.ca_bundle: required key is missing",
        "a.toml: tls.cert: required key is missing",
        "a.toml: tls.key: required key is missing",
    ]


def test_syntax_error_at_end_of_document_points_at_last_line() -> None:
    with pytest.raises(ConfigError) as info:
        loads(AgentConfig, 'a = 1\nb = """open\n', source="a.toml")
    assert str(info.value) == "a.toml:2: invalid TOML: Unterminated string (at end of document)"


# --- values -------------------------------------------------------------------------

def test_minimal_agent_config_gets_the_declared_defaults() -> None:
    cfg = load_agent_config(DATA / "valid-agent-minimal.toml", check_files=False)
    assert cfg.device_id is None
    assert cfg.mqtt.broker == "mqtts://broker.example.net"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.is_tls) == ("broker.example.net", 8883, True)
    assert cfg.mqtt.protocol == "v5"
    assert cfg.tls.key == Path("/etc/certmon/client.key")
    assert cfg.agent == LoopConfig()
    assert cfg.agent.interval_s == 300 and cfg.agent.spool_max_bytes == 1 << 20
    assert cfg.policy == PolicyConfig() and cfg.clock == ClockConfig()


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / "etc" / name).write_text("x")
    path = tmp_path / "etc" / "agent.toml"
    path.write_text('[mqtt]\nbroker = "mqtt://b:1884"\n'
                    '[tls]\nca_bundle = "ca.pem"\ncert = "client.pem"\nkey = "./client.key"\n')
    cfg = load_agent_config(path)
    assert cfg.tls.ca_bundle == tmp_path / "etc" / "ca.pem"
    assert broker_endpoint(cfg.mqtt.broker) == ("b", 1884, False)


def test_example_files_load_and_show_the_defaults() -> None:
    agent = load_agent_config(ROOT / "packaging" / "agent.example.toml", check_files=False)
    assert (agent.agent, agent.policy, agent.clock) == (LoopConfig(), PolicyConfig(),
                                                         ClockConfig())
    assert (agent.mqtt.port, agent.mqtt.protocol, agent.mqtt.keepalive_s) == (8883, "v5", 60)

    collector = load_collector_config(ROOT / "packaging" / "collector.example.toml",
                                      check_files=False)
    assert (collector.store, collector.web, collector.ingest, collector.alerts,
            collector.policy) == (StoreConfig(), WebConfig(), IngestConfig(), AlertsConfig(),
                                  PolicyConfig())
    assert collector.scan_interval_s == 3600
    assert collector.tls.fleet_ca == (Path("/etc/certmon/fleet-ca.pem"),)
    assert collector.trust_requirements == (TrustRequirement(
        name="Fleet root 2025", ca_file=Path("/etc/certmon/fleet-ca.pem")),)
    assert collector.scan_targets == (ScanTarget(host="broker.example.net", mqtt=True),)


def test_policy_config_feeds_the_pki_policy() -> None:
    from certmon.pki import Policy

    assert Policy(**dataclasses.asdict(PolicyConfig())) == Policy()


def test_configs_are_frozen_and_hashable() -> None:
    cfg = load_agent_config(DATA / "valid-agent-minimal.toml", check_files=False)
    with pytest.raises(AttributeError):
        cfg.device_id = "x"  # type: ignore[misc]
    assert hash(cfg) == hash(load_agent_config(DATA / "valid-agent-minimal.toml",
                                               check_files=False))


class Colour(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


@schema
class Small:
    colour: Colour = setting(default=Colour.RED, doc="An enum.")
    ratio: float = setting(default=1.0, doc="A float that accepts integers.")
    names: tuple[str, ...] = setting(default=(), doc="Strings.")
    is_on: bool = setting(default=False, doc="A boolean.")


def test_enum_float_and_bool_conversion() -> None:
    small = loads(Small, 'colour = "blue"\nratio = 2\nnames = ["a"]\nis_on = true\n')
    assert small == Small(colour=Colour.BLUE, ratio=2.0, names=("a",), is_on=True)
    assert isinstance(small.colour, Colour) and isinstance(small.ratio, float)
    with pytest.raises(ConfigError) as info:
        loads(Small, 'colour = "green"\nratio = true\nnames = ["a", 1]\nis_on = 1\n',
              source="s.toml")
    assert str(info.value).splitlines() == [
        "s.toml:1: colour: must be one of 'red', 'blue' (got 'green')",
        "s.toml:2: ratio: expected a number, got boolean true",
        "s.toml:3: names[1]: expected a string, got integer 1",
        "s.toml:4: is_on: expected a boolean, got integer 1",
    ]


# --- where is the key? -------------------------------------------------------------

def test_lines_are_found_through_multiline_values_dotted_and_quoted_keys() -> None:
    text = '''\
[mqtt]
broker = "mqtts://b"
alpn = [
  "a", # "]" in a comment
  "b",
]
[tls]
ca_bundle = """
key = "not a key" [
"""
"cert" = "c"
key = 'k'
[agent]
"spool_max_bytes" = 1
policy.warn_days = 2
'''
    with pytest.raises(ConfigError) as info:
        loads(AgentConfig, text, source="t.toml", check_files=False)
    assert str(info.value).splitlines() == [
        "t.toml:14: agent.spool_max_bytes: must be at least 4096 (got 1)",
        "t.toml:15: agent.policy: unknown section",
    ]


def test_dotted_key_at_top_level_finds_its_line() -> None:
    text = ('[mqtt]\nbroker = "mqtts://b"\n[tls]\nca_bundle = "a"\ncert = "c"\nkey = "k"\n'
            '[policy]\n[clock]\n')
    text = "agent.interval_s = 2\n" + text
    with pytest.raises(ConfigError) as info:
        loads(AgentConfig, text, source="t.toml", check_files=False)
    assert str(info.value) == "t.toml:1: agent.interval_s: must be at least 10 (got 2)"


# --- overrides ----------------------------------------------------------------------

def test_flag_overrides_win_and_are_parsed_from_text() -> None:
    cfg = load_agent_config(
        DATA / "valid-agent-minimal.toml", check_files=False,
        overrides={"agent.interval_s": "60", "mqtt.alpn": "a, b", "device_id": "pump-1",
                   "policy.warn_days": 10, "tls.cert": "/tmp/c.pem"})
    assert cfg.agent.interval_s == 60 and cfg.mqtt.alpn == ("a", "b")
    assert cfg.device_id == "pump-1" and cfg.policy.warn_days == 10.0
    assert cfg.tls.cert == Path("/tmp/c.pem") and cfg.tls.key == Path("/etc/certmon/client.key")


def test_flag_problems_are_reported_as_flags_after_file_problems() -> None:
    name = "invalid-out-of-range.toml"
    lines = problems_of(AgentConfig, name, overrides={
        "mqtt.broker": "http://b", "agent.jitter_fraction": "lots", "agent.nope": "1",
        "policy": "x"}, flag_names={"mqtt.broker": "--broker"})
    assert lines == [
        f"{DATA / name}:11: agent.interval_s: must be at least 10 (got 5)",
        "--agent.nope: agent.nope: unknown key",
        "--policy: policy: is a table; set its keys one by one",
        "--broker: mqtt.broker: unsupported scheme 'http' (use mqtt:// or mqtts://)",
        "--agent.jitter_fraction: agent.jitter_fraction: expected a number, got string 'lots'",
    ]


def test_a_flag_left_at_none_is_not_given() -> None:
    cfg = load_agent_config(DATA / "valid-agent-minimal.toml", check_files=False,
                            overrides={"agent.interval_s": None, "device_id": None})
    assert cfg.agent.interval_s == 300 and cfg.device_id is None


def test_a_flag_fixes_a_file_problem() -> None:
    cfg = load_agent_config(DATA / "invalid-out-of-range.toml", check_files=False,
                            overrides={"agent.interval_s": 30})
    assert cfg.agent.interval_s == 30


# --- device ids ---------------------------------------------------------------------

@pytest.mark.parametrize(("device_id", "problem"), [
    ("pump-0042", None),
    ("a" * 64, None),
    ("", "must not be empty"),
    ("a" * 65, "is 65 characters long (at most 64)"),
    ("a/b", "must not contain '/' (it separates topic levels)"),
    ("a+b", "must not contain '+' (it is an MQTT wildcard)"),
    ("#", "must not contain '#' (it is an MQTT wildcard)"),
    ("a b", "must not contain whitespace or control characters"),
    ("a\x00b", "must not contain whitespace or control characters"),
    ("a\u200bb", "must not contain whitespace or control characters"),
    ("fleet", "'fleet' is reserved for fleet and collector topics"),
    ("alerts", "'alerts' is reserved for fleet and collector topics"),
    ("_collector", "must not start with '_' (reserved for collector topics)"),
])
def test_validate_device_id(device_id: str, problem: str | None) -> None:
    assert validate_device_id(device_id) == problem


# --- reference ----------------------------------------------------------------------

@pytest.mark.parametrize("schema_cls", [AgentConfig, CollectorConfig])
def test_docs_contain_the_generated_reference(schema_cls: type) -> None:
    docs = (ROOT / "docs" / "config.md").read_text()
    assert render_reference(schema_cls) in docs, (
        "docs/config.md is stale: paste the output of "
        f"`python -m certmon.config {schema_cls.__module__}:{schema_cls.__name__}`")


def test_reference_lists_every_key_with_type_and_default() -> None:
    ref = render_reference(AgentConfig)
    assert "| `agent.interval_s` | integer, ≥ 10 | `300` | Seconds between status reports. |" \
        in ref
    assert "| `mqtt.broker` | string, mqtt:// or mqtts:// | **required** |" in ref
    assert '| `mqtt.protocol` | "v5" or "v311" | `"v5"` |' in ref
    assert "| `[[scan_targets]]` | array of tables | `[]` |" in render_reference(
        CollectorConfig)
