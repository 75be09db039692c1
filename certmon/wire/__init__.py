"""The wire contract: everything an agent and a collector must agree on byte for byte.

One package, one home per part: `topics` (device ids, topic names, the online
payloads), `codec` (schema version, limits, instants, canonical JSON and the
field-driven decoder), `messages` (status v1, heartbeat, inventory, cert message, beacon) and
`jws` (signing and verification). Both roles import it as `from certmon import wire`.

It must not import paho, the agent or the collector, do I/O or read the clock:
callers pass instants in. Every malformed input becomes a `ProtocolError` whose
`reason` is one of `PROTOCOL_REASONS`; nothing else escapes the decoders.
docs/protocol.md is the human description; tests/data/golden pins the bytes.
"""

from .codec import (
    CERT_REF_LEN,
    MAX_INVENTORY_JWS_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_STATUS_JWS_BYTES,
    PROTOCOL_REASONS,
    SCHEMA_VERSION,
    Message,
    cert_ref,
    decode_message,
    encode_message,
    format_instant,
    parse_instant,
)
from .jws import (
    INVENTORY_TYP,
    STATUS_TYP,
    SUPPORTED_ALGS,
    ParsedJWS,
    alg_for_key,
    parse_jws,
    sign_jws,
    verify_jws,
    x5t_s256,
)
from .messages import (
    HEARTBEAT_TYP,
    MAX_HEARTBEAT_JWS_BYTES,
    AgentSelf,
    Beacon,
    BeaconEcho,
    BrokerEndpointState,
    BrokerFile,
    BrokerHostState,
    BrokerSeen,
    CaEntry,
    CertBrief,
    CertMessage,
    CertSummary,
    ChainSummary,
    ClockSummary,
    CrlBrief,
    FindingWire,
    Heartbeat,
    Inventory,
    RenewalState,
    Status,
    TrustStoreSummary,
    cert_brief_from_facts,
    cert_message,
    cert_summary_from_facts,
    decode_heartbeat,
    decode_status,
    encode_status,
    finding_to_wire,
    status_digest,
    trust_store_digest,
)
from .topics import (
    DEFAULT_PREFIX,
    LEGACY_V1_PREFIX,
    MAX_DEVICE_ID_LEN,
    RESERVED_DEVICE_IDS,
    TopicKind,
    alerts_topic,
    beacon_topic,
    cert_topic,
    device_topic,
    device_topic_filter,
    device_topic_filters,
    fleet_device_topic,
    fleet_summary_topic,
    heartbeat_topic,
    inventory_topic,
    legacy_v1_device_topic,
    online_payload,
    online_topic,
    parse_device_topic,
    parse_online,
    status_topic,
    validate_device_id,
    validate_topic_level,
    validate_topic_prefix,
)

__all__ = [
    "CERT_REF_LEN", "DEFAULT_PREFIX", "HEARTBEAT_TYP", "INVENTORY_TYP", "LEGACY_V1_PREFIX",
    "MAX_DEVICE_ID_LEN", "MAX_HEARTBEAT_JWS_BYTES", "MAX_INVENTORY_JWS_BYTES", "MAX_MESSAGE_BYTES",
    "MAX_STATUS_JWS_BYTES", "PROTOCOL_REASONS", "RESERVED_DEVICE_IDS", "SCHEMA_VERSION",
    "STATUS_TYP", "SUPPORTED_ALGS", "AgentSelf", "Beacon", "BeaconEcho", "BrokerEndpointState",
    "BrokerFile", "BrokerHostState", "BrokerSeen", "CaEntry", "CertBrief", "CertMessage",
    "CertSummary", "ChainSummary", "ClockSummary", "CrlBrief", "FindingWire", "Heartbeat",
    "Inventory", "Message", "ParsedJWS", "RenewalState", "Status", "TopicKind",
    "TrustStoreSummary", "alerts_topic", "alg_for_key", "beacon_topic", "cert_brief_from_facts",
    "cert_message", "cert_ref", "cert_summary_from_facts", "cert_topic", "decode_heartbeat",
    "decode_message", "decode_status", "device_topic", "device_topic_filter",
    "device_topic_filters", "encode_message", "encode_status", "finding_to_wire",
    "fleet_device_topic", "fleet_summary_topic", "format_instant", "heartbeat_topic",
    "inventory_topic", "legacy_v1_device_topic", "online_payload", "online_topic",
    "parse_device_topic", "parse_instant", "parse_jws", "parse_online", "sign_jws",
    "status_digest", "status_topic", "trust_store_digest", "validate_device_id",
    "validate_topic_level", "validate_topic_prefix", "verify_jws", "x5t_s256",
]
