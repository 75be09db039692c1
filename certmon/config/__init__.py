"""Typed TOML configuration: TOML → frozen slotted dataclasses, every problem at once.

One package, one home per part: `schema` (the machinery: `schema`, `setting`,
`section`, the `Problem`/`ConfigInvalid` error shape), `loader` (`load`, `loads`,
`load_with_flags`: conversion, checks and CLI flag overrides), `locate` (which line of
the file each key is on), `reference` (the Markdown reference, also printed by
`python -m certmon.config module:Class`) and `shared` (what both roles use:
`PolicyConfig`, the MQTT URL rules; the device-id rule is re-exported from
`certmon.wire.topics`, its one home). A schema is a dataclass whose field types drive
parsing and whose `setting(...)` metadata carries the doc and the checks; defaults
live on the fields and nowhere else.

Every problem becomes one line `FILE:LINE: KEY: problem` (or `--flag: KEY: problem`
for an override) and all of them are raised together in one `ConfigError`.
Must not: import `agent` or `collector`, touch the network, or read any file other
than the config file and, when `check_files` is on, the files settings name.
"""

# The id and topic-level rules are the wire contract's; re-exported so a schema can
# name them as `check=`.
from certmon.wire.topics import validate_device_id, validate_topic_level, validate_topic_prefix

from .loader import load, load_with_flags, loads
from .reference import render_reference
from .schema import ConfigInvalid, Problem, Rule, schema, section, setting
from .shared import BrokerEndpoint, PolicyConfig, broker_endpoint, check_mqtt_url

__all__ = [
    "BrokerEndpoint", "ConfigInvalid", "PolicyConfig", "Problem", "Rule", "broker_endpoint",
    "check_mqtt_url", "load", "load_with_flags", "loads", "render_reference", "schema",
    "section", "setting", "validate_device_id", "validate_topic_level",
    "validate_topic_prefix",
]
