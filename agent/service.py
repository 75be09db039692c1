"""The agent's service loop: collect → judge → sign → spool → deliver, forever.

Owns timing (interval with jitter, an early report when something changed), the
MQTT link's life cycle (rebuilt when the client certificate is renewed), delivery
from the spool with PUBACK confirmation, the collector's time beacon, signals
(SIGTERM: say offline and leave cleanly; SIGHUP: reload the config) and sd_notify.
Judgement lives in agent.report / agent.status; the wire format in certmon.protocol;
paho in certmon.mqtt. Never logs key material: only paths and fingerprints.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from cryptography.hazmat.primitives import serialization

from certmon import clock as wallclock
from certmon import pki, systemd
from certmon import protocol as p
from certmon.errors import ConfigError, ProtocolError, TransportError
from certmon.mqtt import Incoming, LinkSettings, MqttLink, Will
from certmon.tlsprobe import ProbeTarget
from certmon.tlsprobe import probe as tls_probe

from .certstore import DeviceMaterial, read_material
from .clocksync import ClockVerdict, Runner, collect_clock_state, evaluate_clock, run_command
from .config import AgentConfig
from .report import check_device, newest_not_before
from .spool import SequenceCounter, Spool
from .status import AgentCounters, BrokerObservation, build_status, inventory, observe_broker

log = logging.getLogger("certmon.agent")

ONLINE_PAYLOAD = b'{"online":true}'
OFFLINE_PAYLOAD = b'{"online":false}'
# Files are stat()ed this often between reports, so a renewed certificate is
# reported (and used for the connection) within seconds, not at the next interval.
WATCH_EVERY_S = 15.0


def release_date() -> datetime:
    from certmon import RELEASE_DATE

    return datetime.fromisoformat(RELEASE_DATE).replace(tzinfo=UTC)


@dataclass
class CycleResult:
    status: p.Status
    token: bytes  # the signed JWS
    material: DeviceMaterial
    changed: bool


class AgentService:
    """One device's agent. `run()` is the service; `report_once()` + `wait_delivered()`
    is `certmon-agent once`; `cycle(sign=False)` is `show`."""

    def __init__(self, config: AgentConfig, *, clock: wallclock.Clock | None = None,
                 runner: Runner = run_command, proc_root: Path = Path("/proc"),
                 reloader: Callable[[], AgentConfig] | None = None) -> None:
        self.config = config
        self.clock: wallclock.Clock = clock or wallclock.SystemClock()
        self.runner = runner
        self.proc_root = proc_root
        self.reloader = reloader
        state_dir = config.agent.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.seq = SequenceCounter(state_dir)
        self.spool = Spool(state_dir, max_messages=config.agent.spool_max_messages,
                           max_bytes=config.agent.spool_max_bytes)
        self.boot_id = wallclock.boot_id(proc_root)
        self.started_mono_s = self.clock.monotonic()
        self.policy = _policy(config)
        self.device_id: str | None = config.device_id
        self.link: MqttLink | None = None
        self.last_publish_ok_at: datetime | None = None
        self._link_cert_sha: str | None = None
        self._protocol: str | None = None  # "v311" once a broker refused v5
        self._acks: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()
        self.refused = 0  # statuses the broker refused (ACL): never deliverable
        self._inflight: dict[int, Path] = {}
        # Retained side messages (cert chain, trust-store inventory) waiting for a
        # connection; each is re-sent only when its content changes.
        self._side: dict[str, bytes] = {}
        self._side_sent: dict[str, bytes] = {}
        self._side_digest: dict[str, str] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._just_connected = threading.Event()
        self._beacon: p.BeaconEcho | None = None
        self._broker: BrokerObservation | None = None
        self._broker_key: tuple[int, bytes] | None = None
        self._last_fingerprint: str | None = None
        self._file_stamp: tuple[object, ...] | None = None
        self._random = random.Random()  # noqa: S311 - jitter only

    @property
    def prefix(self) -> str:
        return self.config.agent.topic_prefix

    # ------------------------------------------------------------ identity & link

    def _resolve_device_id(self, material: DeviceMaterial) -> str:
        if self.device_id is not None:
            return self.device_id
        client = material.client
        facts = client.certs[0].facts if client and client.certs else None
        identity = pki.identity_of(facts) if facts else None
        if identity is None:
            raise ConfigError(f"{self.config.tls.cert}: no device_id configured and no CN or "
                              "certmon device URI in the client certificate")
        problem = p.validate_device_id(identity)
        if problem:
            raise ConfigError(f"{self.config.tls.cert}: certificate identity {identity!r} "
                              f"is not a valid device id: {problem}")
        self.device_id = identity
        return identity

    def _ensure_link(self, material: DeviceMaterial) -> None:
        client = material.client
        client_sha = client.certs[0].facts.sha256 if client and client.certs else None
        refused = self.link is not None and self.link.state.protocol_refused
        if self.link is not None and client_sha == self._link_cert_sha and not refused:
            return
        if refused:
            # An MQTT 3.1.1 broker: the documented fallback, for this process's life.
            log.warning("the broker does not speak MQTT v5: falling back to MQTT 3.1.1")
            self._protocol = "v311"
            self.link.stop()  # type: ignore[union-attr]
            self._inflight.clear()
        elif self.link is not None:
            # A renewed certificate: reconnect with it, no restart needed. A clean
            # DISCONNECT, so the broker does not fire the will for a planned switch.
            log.info("client certificate changed (now %s): reconnecting with it", client_sha)
            self.link.stop()
            self._inflight.clear()
        device_id = self._resolve_device_id(material)
        mqtt = self.config.mqtt
        settings = LinkSettings(
            host=mqtt.host, port=mqtt.port, client_id=mqtt.client_id or f"certmon-{device_id}",
            is_tls=mqtt.is_tls, ca_bundle=str(self.config.tls.ca_bundle),
            cert=str(self.config.tls.cert), key=str(self.config.tls.key), alpn=mqtt.alpn,
            servername=mqtt.servername,
            keepalive_s=mqtt.keepalive_s, protocol=self._protocol or mqtt.protocol,
            will=Will(p.online_topic(self.prefix, device_id), OFFLINE_PAYLOAD, 1, True),
        )
        try:
            link = MqttLink(settings, on_message=self._on_message, on_connect=self._on_connect,
                            on_disconnect=lambda _reason: self._wake.set(),
                            on_published=lambda mid, ok: self._acks.put((mid, ok)),
                            monotonic=self.clock.monotonic)
        except TransportError as exc:
            # e.g. the key is unreadable: a finding in the status, a line in the log,
            # and statuses stay spooled until the files are fixed.
            log.error("cannot set up the MQTT link: %s", exc)
            self.link, self._link_cert_sha = None, None
            return
        link.subscribe(p.beacon_topic(self.prefix), qos=0)
        link.start()
        self.link, self._link_cert_sha, self._broker_key = link, client_sha, None

    def _on_connect(self) -> None:
        self._just_connected.set()
        self._wake.set()

    def _on_message(self, msg: Incoming) -> None:
        if msg.topic != p.beacon_topic(self.prefix) or msg.retained:
            return
        try:
            beacon = p.decode_message(p.Beacon, msg.payload, max_bytes=1024)
        except ProtocolError:
            return
        self._beacon = p.BeaconEcho(beacon_ts=beacon.ts, received_mono_s=msg.received_mono_s)

    # ------------------------------------------------------------ one cycle

    def cycle(self, *, sign: bool = True) -> CycleResult:
        """Collect and judge everything, build the status, and sign it (`sign=False`
        is `show`: no sequence number is used up)."""
        tls = self.config.tls
        material = read_material(tls.ca_bundle, tls.cert, tls.key)
        now = self.clock.now()
        device_id = self._resolve_device_id(material)
        state = collect_clock_state(runner=self.runner, proc_root=self.proc_root,
                                    sntp_servers=self.config.clock.sntp_servers,
                                    clock=self.clock)
        verdict, clock_findings = evaluate_clock(
            state, newest_not_before=newest_not_before(material), release_date=release_date(),
            skew_tolerance_s=self.config.clock.skew_tolerance_s)
        check = check_device(material, now, self.policy, clock=verdict)
        self._refresh_broker(material, now, verdict)
        status = build_status(
            device_id=device_id, boot_id=self.boot_id,
            seq=self.seq.next() if sign else self.seq.last + 1, now=now,
            mono_s=self.clock.monotonic(), interval_s=self.config.agent.interval_s,
            check=check, clock=verdict, clock_findings=clock_findings, broker=self._broker,
            beacon=self._beacon, counters=self._counters(), policy=self.policy)
        token = self._sign(material, p.encode_status(status), p.STATUS_TYP) if sign else b""
        fingerprint = _fingerprint(status)
        changed, self._last_fingerprint = fingerprint != self._last_fingerprint, fingerprint
        return CycleResult(status, token, material, changed)

    def _sign(self, material: DeviceMaterial, payload: bytes, typ: str) -> bytes:
        client = material.client
        if material.private_key is None or not client or not client.certs:
            raise TransportError("cannot sign: the client certificate or key is unreadable")
        return p.sign_jws(payload, material.private_key,  # type: ignore[arg-type]
                          client.certs[0].cert, typ=typ)

    def _refresh_broker(self, material: DeviceMaterial, now: datetime,
                        clock: ClockVerdict) -> None:
        """Judge the broker chain seen on our own session, once per connection."""
        link = self.link
        if link is None or not link.state.peer_chain_der:
            return
        key = (link.state.connects, link.state.peer_chain_der[0])
        if key == self._broker_key:
            return
        self._broker_key = key
        mqtt = self.config.mqtt
        presented = list(link.state.peer_chain_der)
        if len(presented) == 1:
            # Python < 3.13 shows only the leaf of our own session; a probe of the same
            # endpoint fetches the intermediates, kept only if it saw the same leaf.
            result = tls_probe(ProbeTarget(
                host=mqtt.host, port=mqtt.port, servername=mqtt.servername, alpn=mqtt.alpn,
                client_cert=str(self.config.tls.cert), client_key=str(self.config.tls.key),
                timeout_s=5.0))
            if result.presented_der and result.presented_der[0] == presented[0]:
                presented = list(result.presented_der)
        self._broker = observe_broker(mqtt.host, mqtt.port, link.state.tls_version, presented,
                                      material.trust_store, now, self.policy, clock=clock)

    def _counters(self) -> AgentCounters:
        try:
            rss: int | None = psutil.Process().memory_info().rss
        except psutil.Error:
            rss = None
        return AgentCounters(self.started_mono_s, rss, self.last_publish_ok_at,
                             self.spool.depth, self.spool.dropped)

    # ------------------------------------------------------------ delivery

    def enqueue(self, result: CycleResult) -> None:
        """Spool the signed status; queue the cert and inventory messages on change."""
        device_id = result.status.device_id
        topic = p.status_topic(self.prefix, device_id)
        try:
            self.spool.append(result.status.seq, topic, result.token)
        except OSError as exc:
            # Read-only or full state directory: keep reporting live, lose only the
            # store-and-forward guarantee, and say so.
            log.error("cannot spool status seq=%s in %s: %s", result.status.seq,
                      self.spool.dir, exc.strerror or exc)
            self._publish(topic, result.token)
        client = result.material.client
        if client and client.certs:
            der = [c.cert.public_bytes(serialization.Encoding.DER) for c in client.certs]
            msg = p.CertMessage(device_id=device_id, sha256=client.certs[0].facts.sha256,
                                x5c=tuple(base64.b64encode(d).decode() for d in der))
            self._side[p.cert_topic(self.prefix, device_id)] = p.encode_message(msg)
        inventory_topic = p.inventory_topic(self.prefix, device_id)
        ts = result.status.trust_store
        # Re-signed when the trust store changes, and when the signing certificate
        # does: a retained inventory signed by a replaced certificate could no longer
        # be verified by a collector that (re)starts after the renewal.
        signer = client.certs[0].facts.sha256 if client and client.certs else ""
        if ts is not None and self._side_digest.get(inventory_topic) != ts.digest + signer:
            inv = inventory(device_id, result.status.ts, result.material.trust_store.facts)
            self._side[inventory_topic] = self._sign(result.material, p.encode_message(inv),
                                                     p.INVENTORY_TYP)
            self._side_digest[inventory_topic] = ts.digest + signer

    def _publish(self, topic: str, payload: bytes) -> int | None:
        if self.link is None or not self.link.is_connected:
            return None
        try:
            return self.link.publish(topic, payload, qos=1, retain=True)
        except TransportError:
            return None

    def flush(self) -> None:
        """Hand spooled messages to the link in order; forget those PUBACKed."""
        self._drain_acks()
        if self.link is not None and self.link.state.protocol_refused:
            tls = self.config.tls
            self._ensure_link(read_material(tls.ca_bundle, tls.cert, tls.key))
        link = self.link
        if link is None or not link.is_connected:
            return
        if self._just_connected.is_set():
            self._just_connected.clear()
            self._side_sent.clear()  # a new session: re-assert the retained side topics
            self._publish(p.online_topic(self.prefix, self.device_id or ""), ONLINE_PAYLOAD)
        for topic, payload in list(self._side.items()):
            if self._side_sent.get(topic) != payload and self._publish(topic, payload):
                self._side_sent[topic] = payload
        in_flight = set(self._inflight.values())
        expiry_s = 3 * self.config.agent.interval_s
        for msg in self.spool.pending():
            if msg.path in in_flight:
                continue
            try:
                mid = link.publish(msg.topic, msg.payload, qos=1, retain=True, expiry_s=expiry_s)
            except TransportError:
                break
            self._inflight[mid] = msg.path

    def _drain_acks(self) -> int:
        done = 0
        while True:
            try:
                mid, accepted = self._acks.get_nowait()
            except queue.Empty:
                return done
            path = self._inflight.pop(mid, None)
            if path is None:
                continue
            self.spool.remove(path)
            done += 1
            if accepted:
                self.last_publish_ok_at = self.clock.now()
            else:
                # Resending a message the broker's ACL refuses would block the spool
                # forever; it is dropped, counted and logged instead.
                self.refused += 1
                log.error("broker refused status %s (%s): check the broker ACL and the "
                          "device id", path.name, self.link.state.last_error if self.link
                          else "no link")

    def wait_delivered(self, timeout_s: float) -> bool:
        """Block until every spooled status is PUBACKed, or the timeout (`once`)."""
        deadline = self.clock.monotonic() + timeout_s
        while True:
            self.flush()
            if self.spool.depth == 0:
                return True
            if self.clock.monotonic() >= deadline:
                return False
            self._wake.wait(0.05)

    # ------------------------------------------------------------ run

    def connect(self, wait_s: float) -> bool:
        """Set up the link from the files on disk and wait (bounded) for the broker, so
        that a one-shot report can include the broker chain its session saw."""
        tls = self.config.tls
        self._ensure_link(read_material(tls.ca_bundle, tls.cert, tls.key))
        return self.link is not None and self.link.wait_connected(wait_s)

    def report_once(self) -> CycleResult:
        result = self.cycle()
        self._ensure_link(result.material)
        self.enqueue(result)
        return result

    def run(self) -> int:
        """The service loop; returns after request_stop() (SIGTERM) with exit code 0."""
        watchdog_s = systemd.watchdog_interval_s()
        next_report = self.clock.monotonic()
        ready_sent = False
        while not self._stop.is_set():
            if self._reload.is_set():
                self._reload.clear()
                self._do_reload()
                next_report = self.clock.monotonic()
            due = self.clock.monotonic() >= next_report
            if due or self._files_changed() or self._broker_changed():
                self._report_logged()
                next_report = self.clock.monotonic() + self._next_interval_s()
            self.flush()
            if not ready_sent:
                systemd.ready()
                ready_sent = True
            systemd.watchdog()
            # Sleep until the next report, a file check or a wake-up (connect, signal):
            # no busy loop, a handful of wake-ups per interval.
            timeout = min(next_report - self.clock.monotonic(), WATCH_EVERY_S)
            if watchdog_s:
                timeout = min(timeout, watchdog_s / 2)
            self._wake.wait(max(timeout, 0.05))
            self._wake.clear()
        self.shutdown()
        return 0

    def _report_logged(self) -> None:
        try:
            result = self.report_once()
        except (ConfigError, TransportError, OSError) as exc:
            log.error("report failed: %s", exc)
            return
        worst = max((f.severity for f in result.status.findings), default=pki.Severity.OK)
        log.info("status seq=%s %s findings=%s spool=%s", result.status.seq, worst.name,
                 len(result.status.findings), self.spool.depth)

    def _broker_changed(self) -> bool:
        # A new connection (or a new broker leaf) is reported at once: the broker
        # chain as seen is the fact most likely to have changed.
        link = self.link
        if link is None or not link.state.peer_chain_der:
            return False
        return (link.state.connects, link.state.peer_chain_der[0]) != self._broker_key

    def _next_interval_s(self) -> float:
        spread = self.config.agent.jitter_fraction
        return self.config.agent.interval_s * (1 + self._random.uniform(-spread, spread))

    def _files_changed(self) -> bool:
        tls = self.config.tls
        stamp = tuple(_stamp(path) for path in (tls.ca_bundle, tls.cert, tls.key))
        changed = self._file_stamp is not None and stamp != self._file_stamp
        self._file_stamp = stamp
        if changed:
            log.info("certificate material changed on disk: reporting now")
        return changed

    def _do_reload(self) -> None:
        if self.reloader is None:
            return
        try:
            self.config = self.reloader()
        except ConfigError as exc:
            log.error("configuration not reloaded, keeping the running one: %s", exc)
            return
        self.policy = _policy(self.config)
        log.info("configuration reloaded")

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload.set()
        self._wake.set()

    def shutdown(self) -> None:
        """Say offline (retained) and DISCONNECT cleanly: the will does not fire."""
        systemd.stopping()
        if self.link is not None:
            final = []
            if self.device_id:
                final.append((p.online_topic(self.prefix, self.device_id), OFFLINE_PAYLOAD, True))
            self.link.stop(final=final)
            self.link = None


def _policy(config: AgentConfig) -> pki.Policy:
    return pki.Policy(**dataclasses.asdict(config.policy))


def _stamp(path: Path) -> object:
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.errno
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _fingerprint(status: p.Status) -> str:
    """What counts as 'changed' for an early report: findings and certificates, not
    counters or timestamps."""
    data = {
        "findings": [(f.code, int(f.severity), f.cert) for f in status.findings],
        "client": status.client.sha256 if status.client else None,
        "trust": status.trust_store.digest if status.trust_store else None,
        "broker": [c.ref for c in status.broker.chain] if status.broker else None,
    }
    return json.dumps(data, sort_keys=True)
