"""Mosquitto's configuration, read the way Mosquitto 2 reads it, as an inventory.

Owns `read_config` (the I/O shell: the main file and every `include_dir` file) and
`parse_lines` (pure): which listeners and bridges exist and which certificate files
each one names, with the FILE:LINE of every line.
Must not: read certificate files or judge them (that is `inventory`), or raise on
what a configuration contains: an unknown directive is an information finding
naming its line, a malformed one a finding, an unreadable file a finding. Must not
put a directive's value in a finding: findings go into the signed status, the
dashboard and logs, and a line may be `remote_password s3cret`; a finding names
the directive and its FILE:LINE only. Must not block or balloon on what a directory
holds: only regular files are read (a FIFO named x.conf would hang the check), at
most `MAX_CONF_BYTES` each, and a directory already being read is not entered again.

How Mosquitto reads it (2.0, src/conf.c), which this module follows:
- One directive per line, `name value…`; a line starting with `#` is a comment;
  leading spaces are skipped; a file path is the rest of the line.
- `listener PORT [BIND]` starts a listener; TLS settings before the first one belong
  to the default listener (`port`, 1883). `cafile/capath/certfile/keyfile/crlfile/
  require_certificate` are per listener whatever `per_listener_settings` says (it
  moves only authentication and ACL settings), and they stay with the current
  listener even after a `connection` line.
- `connection NAME` starts a bridge; `address`/`addresses` and the `bridge_*`
  settings belong to the latest bridge.
- `include_dir DIR` reads every `*.conf` in DIR in sorted order, in place.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from certmon.errors import unreadable_hint
from certmon.pki import Finding, FindingCode, Severity

from .model import BrokerConfig, Endpoint, FileRef, FileRole

_LISTENER_FILES: dict[str, FileRole] = {
    "cafile": "cafile", "capath": "capath", "certfile": "certfile",
    "keyfile": "keyfile", "crlfile": "crlfile",
}
_BRIDGE_FILES: dict[str, FileRole] = {
    "bridge_cafile": "cafile", "bridge_capath": "capath",
    "bridge_certfile": "certfile", "bridge_keyfile": "keyfile",
}
# Every other directive of Mosquitto 2.0's mosquitto.conf(5): read past, not reported.
_KNOWN = frozenset("""
acl_file allow_anonymous allow_duplicate_messages allow_zero_length_clientid
auth_plugin auth_plugin_deny_special_chars auto_id_prefix autosave_interval
autosave_on_changes bind_address bind_interface check_retain_source ciphers
ciphers_tls1.3 clientid_prefixes connection_messages dhparamfile enable_control_api
http_dir log_dest log_facility log_timestamp log_timestamp_format log_type
max_connections max_inflight_bytes max_inflight_messages max_keepalive max_packet_size
max_queued_bytes max_queued_messages max_topic_alias memory_limit message_size_limit
mount_point password_file persistence persistence_file persistence_location
persistent_client_expiration pid_file plugin port protocol psk_file psk_hint
queue_qos0_messages require_certificate retain_available retry_interval set_tcp_nodelay
socket_domain store_clean_interval sys_interval tls_engine tls_engine_kpass_sha1
tls_keyform tls_version upgrade_outgoing_qos use_identity_as_username
use_subject_as_username use_username_as_clientid user websockets_headers_size
websockets_log_level per_listener_settings listener include_dir connection
address addresses bridge_alpn bridge_attempt_unsubscribe bridge_bind_address
bridge_identity bridge_insecure bridge_max_packet_size bridge_outgoing_retain
bridge_protocol_version bridge_psk bridge_receive_maximum bridge_require_ocsp
bridge_session_expiry_interval bridge_tls_version cleansession clientid idle_timeout
keepalive_interval local_cleansession local_clientid local_password local_username
notifications notifications_local_only notification_topic password remote_clientid
remote_password remote_username restart_timeout round_robin start_type threshold topic
try_private username global_plugin global_plugin_opt
""".split()) | frozenset(_LISTENER_FILES) | frozenset(_BRIDGE_FILES)  # noqa: SIM905
_KNOWN_PREFIXES = ("auth_opt_", "plugin_opt_", "global_plugin_opt_")
_WILDCARD_BINDS = {"", "0.0.0.0", "::"}  # noqa: S104 (recognised, not bound)
# A mosquitto.conf is a few KB; a larger file is not a configuration (a log, a dump).
MAX_CONF_BYTES = 1024 * 1024


@dataclass
class _Builder:
    """An endpoint while its lines are being read (the only mutable state here)."""

    kind: str
    name: str
    at: str
    host: str | None
    port: int | None
    require_certificate: bool = False
    files: list[FileRef] = field(default_factory=list)

    def build(self) -> Endpoint:
        kind: Literal["listener", "bridge"] = (
            "listener" if self.kind == "listener" else "bridge")
        return Endpoint(kind, self.name, self.at, self.host, self.port,
                        self.require_certificate, tuple(self.files))


@dataclass
class _State:
    default: _Builder
    listeners: list[_Builder] = field(default_factory=list)
    bridges: list[_Builder] = field(default_factory=list)
    per_listener_settings: bool = False
    default_touched: bool = False
    files_read: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    # include_dir directories being read now (resolved): one met again is a loop.
    dirs_open: list[Path] = field(default_factory=list)

    @property
    def listener(self) -> _Builder:
        return self.listeners[-1] if self.listeners else self.default


def read_config(path: Path) -> BrokerConfig:
    """The configuration at `path` and everything it includes; never raises."""
    state = _State(_Builder("listener", "default listener 1883", f"{path}", None, 1883))
    _read_file(path, state, None, depth=0)
    endpoints = [*([state.default] if state.default_touched else []), *state.listeners,
                 *state.bridges]
    return BrokerConfig("mosquitto", str(path), tuple(state.files_read),
                        state.per_listener_settings, tuple(e.build() for e in endpoints),
                        tuple(state.findings))


def _read_file(path: Path, state: _State, named_at: str | None, depth: int) -> None:
    try:
        data = _read_regular(path)
    except OSError as exc:
        where = f"{named_at}: " if named_at else ""
        # The main file unreadable: the check could not look at all (UNKNOWN, as for
        # the device check); an included one: the broker would not start (CRITICAL).
        state.findings.append(Finding(
            FindingCode.FILE_UNREADABLE, Severity.CRITICAL if named_at else Severity.UNKNOWN,
            f"{where}cannot read Mosquitto config {path}: {exc.strerror or exc}"
            f"{unreadable_hint(exc)}", source=str(path)))
        return
    where = named_at or str(path)
    if data is None:
        state.findings.append(_invalid(where, f"{path} is not a regular file; not read "
                                       "(Mosquitto would block on a FIFO or device)"))
        return
    if len(data) > MAX_CONF_BYTES:
        state.findings.append(_invalid(where, f"{path} is larger than {MAX_CONF_BYTES} "
                                       "bytes: not a Mosquitto config; not read"))
        return
    state.files_read.append(str(path))
    parse_lines(data.decode(errors="replace"), str(path), state, depth)


def _read_regular(path: Path) -> bytes | None:
    """Up to MAX_CONF_BYTES + 1 bytes of `path`, or None when it is no regular file.
    Opened non-blocking so that a FIFO is seen (by fstat) rather than waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as handle:
            fd = -1
            return handle.read(MAX_CONF_BYTES + 1)
    finally:
        if fd >= 0:
            os.close(fd)


def parse_lines(text: str, name: str, state: _State, depth: int = 0) -> None:
    """Apply one file's lines to `state` (include_dir files are read in place)."""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip().lstrip(" ")
        if not line or line.startswith("#"):
            continue
        at = f"{name}:{number}"
        directive, _, rest = line.partition(" ")
        value = rest.strip(" ")
        if "=" in directive or value.startswith("="):
            # INI habits: Mosquitto reads `certfile = x` as the path "= x", and
            # `certfile=x` as an unknown directive.
            # The directive's name only: the value may be a password.
            shown = directive.partition("=")[0] or "(no name)"
            state.findings.append(_invalid(at, f"{shown}: Mosquitto's syntax is "
                                           "`name value`, without '='"))
            if "=" in directive:
                continue
        _apply(directive, value, at, state, depth)


def _apply(directive: str, value: str, at: str, state: _State, depth: int) -> None:
    if directive in _LISTENER_FILES or directive in _BRIDGE_FILES:
        _file_line(directive, value, at, state)
    elif directive == "listener":
        _listener_line(value, at, state)
    elif directive == "port":
        port = _port(value)
        if port is None:
            state.findings.append(_invalid(at, "port: the value is not a port number"))
        else:
            state.default.port, state.default_touched = port, True
            state.default.name = f"default listener {port}"
    elif directive == "bind_address" and not state.listeners:
        state.default.host = None if value in _WILDCARD_BINDS else value
    elif directive == "require_certificate":
        state.listener.require_certificate = value == "true"
        state.default_touched |= not state.listeners
    elif directive == "per_listener_settings":
        state.per_listener_settings = value == "true"
    elif directive == "connection":
        state.bridges.append(_Builder("bridge", f"bridge {value}", at, None, None))
    elif directive in ("address", "addresses"):
        _address_line(value, at, state)
    elif directive == "include_dir":
        _include_dir(value, at, state, depth)
    elif directive not in _KNOWN and not directive.startswith(_KNOWN_PREFIXES):
        state.findings.append(Finding(
            FindingCode.BROKER_CONFIG_UNKNOWN, Severity.OK,
            f"{at}: {directive!r} is not a Mosquitto 2 directive certmon knows; ignored "
            "(Mosquitto itself refuses to start on an unknown one)", source=at))


def _file_line(directive: str, value: str, at: str, state: _State) -> None:
    if not value:
        state.findings.append(_invalid(at, f"{directive} has no value; Mosquitto "
                                       f"refuses to start (\"Empty {directive} value\")"))
        return
    if directive in _BRIDGE_FILES:
        if not state.bridges:
            state.findings.append(_invalid(at, f"{directive} outside a bridge (no "
                                           "`connection` line before it); Mosquitto "
                                           "refuses to start"))
            return
        state.bridges[-1].files.append(FileRef(_BRIDGE_FILES[directive], directive, value, at))
        return
    state.default_touched |= not state.listeners
    state.listener.files.append(FileRef(_LISTENER_FILES[directive], directive, value, at))


def _listener_line(value: str, at: str, state: _State) -> None:
    parts = value.split()
    port = _port(parts[0]) if parts else None
    if port is None:
        state.findings.append(_invalid(at, "listener: the port is not a number; "
                                       "Mosquitto refuses to start"))
        port = -1
    bind = parts[1] if len(parts) > 1 else ""
    # `listener 0 /run/mosquitto.sock` is a Unix socket: nothing to handshake with.
    host = None if bind in _WILDCARD_BINDS else bind
    real_port = None if port == 0 or port < 0 else port
    state.listeners.append(_Builder("listener", f"listener {value}", at, host, real_port))


def _address_line(value: str, at: str, state: _State) -> None:
    if not state.bridges:
        state.findings.append(_invalid(at, "address outside a bridge (no `connection` "
                                       "line before it)"))
        return
    first = value.split()[0] if value.split() else ""
    # "host:port", "[v6]:port" or a bare host (1883, Mosquitto's bridge default).
    if first.startswith("["):
        host, _, rest = first[1:].partition("]")
        port_text = rest.lstrip(":") or "1883"
    elif first.count(":") == 1:
        host, port_text = first.split(":")
    else:
        host, port_text = first, "1883"
    bridge = state.bridges[-1]
    bridge.host, bridge.port = host or None, _port(port_text)


def _include_dir(value: str, at: str, state: _State, depth: int) -> None:
    directory = Path(value)
    if depth > 8:  # distinct directories including one another, eight deep
        state.findings.append(_invalid(at, "include_dir: nested too deep"))
        return
    try:
        resolved = directory.resolve()
        names = sorted(p for p in directory.iterdir() if p.name.endswith(".conf"))
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (3.11)
        why = exc.strerror or exc if isinstance(exc, OSError) else "symlink loop"
        hint = unreadable_hint(exc) if isinstance(exc, OSError) else ""
        state.findings.append(Finding(
            FindingCode.FILE_UNREADABLE, Severity.CRITICAL,
            f"{at}: include_dir: {why}{hint}", source=at))
        return
    # A conf.d file that includes conf.d (or a parent being read) would re-read it
    # at every level: with 8 files, 8^8 reads before the depth cap.
    if resolved in state.dirs_open:
        state.findings.append(_invalid(at, "include_dir: that directory is already being "
                                       "read (it includes itself); not read again"))
        return
    state.dirs_open.append(resolved)
    try:
        for path in names:
            _read_file(path, state, at, depth + 1)
    finally:
        state.dirs_open.pop()


def _port(text: str) -> int | None:
    try:
        port = int(text)
    except ValueError:
        return None
    return port if 0 <= port < 65536 else None


def _invalid(at: str, message: str) -> Finding:
    return Finding(FindingCode.BROKER_CONFIG_INVALID, Severity.WARNING, f"{at}: {message}",
                   source=at)

