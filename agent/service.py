"""The agent's service loop: collect → judge → sign → spool → deliver, forever.

Owns timing (interval with jitter, an early report when something changed), one
cycle (read the files, ask the clock sources, judge, build and sign the status with
the signing key), the device identity, the broker chain as seen on our own session,
what is enqueued after a cycle (status or heartbeat, cert message, inventory; when a
heartbeat may stand for the status, `agent.heartbeat`), when renewal is
checked (before each report; `agent.renewal` decides and does it), signals (SIGTERM:
say offline and leave cleanly; SIGHUP: reload the config) and sd_notify.
Must not: hold the link's life cycle (`agent.uplink`) or the spool and PUBACK
bookkeeping (`agent.delivery`); judge (`agent.report` / `agent.status`); spell the
wire format (`certmon.wire`) or import paho (`certmon.mqtt`). Never logs key
material: only paths and fingerprints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from certmon import clock as wallclock
from certmon import pki, systemd
from certmon import wire as p
from certmon.errors import ConfigError, TransportError
from certmon.mqtt import MqttLink

from .certstore import DeviceMaterial, read_material
from .clocksync import ClockVerdict, Runner, collect_clock_state, evaluate_clock, run_command
from .config import AgentConfig
from .delivery import Delivery, publish_retained
from .renewal.policy import CLOCK_WRONG
from .report import check_device, newest_not_before
from .spool import SequenceCounter, Spool
from .status import (
    AgentCounters,
    BrokerObservation,
    build_heartbeat,
    build_status,
    inventory,
    observe_broker,
    status_essence,
)
from .uplink import Uplink

if TYPE_CHECKING:
    from .brokerhost.watch import BrokerHostWatch
    from .renewal import attempt as renewal

log = logging.getLogger("certmon.agent")

# Files are stat()ed this often between reports, so a renewed certificate is
# reported (and used for the connection) within seconds, not at the next interval.
WATCH_EVERY_S = 15.0


def release_date() -> datetime:
    from certmon import RELEASE_DATE

    return datetime.fromisoformat(RELEASE_DATE).replace(tzinfo=UTC)


@dataclass
class CycleResult:
    status: p.Status
    token: bytes  # the signed JWS (of the heartbeat, when there is one)
    material: DeviceMaterial
    # `agent.heartbeat`: sent instead of `status`, which only time and counters set apart
    # from the last full status the broker confirmed.
    heartbeat: p.Heartbeat | None = None


@dataclass(frozen=True, slots=True)
class _LastFull:
    """The last full status signed: what a heartbeat may stand for (`_heartbeat_for`)."""

    digest: str  # p.status_digest of its payload
    essence: bytes  # status_essence()
    at_mono_s: float
    connects: int | None  # the link's connection count when it was signed


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
        self.delivery = Delivery(Spool(state_dir, max_messages=config.agent.spool_max_messages,
                                       max_bytes=config.agent.spool_max_bytes), self.clock)
        self.boot_id = wallclock.boot_id(proc_root)
        self.started_mono_s = self.clock.monotonic()
        self.policy = _policy(config)
        self.device_id: str | None = config.device_id
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.uplink = Uplink(monotonic=self.clock.monotonic, wake=self._wake.set,
                             on_published=self.delivery.on_published,
                             on_replaced=self.delivery.forget_inflight)
        self._broker: BrokerObservation | None = None
        self._broker_key: tuple[int, bytes] | None = None
        self._x5c_key: tuple[int, str] | None = None  # (connection, signer) x5c last rode on
        self._last_full: _LastFull | None = None  # agent.heartbeat
        self._file_stamp: tuple[object, ...] | None = None
        self._is_clock_ok = True  # until a cycle's clock findings say otherwise
        self._broker_host: BrokerHostWatch | None = None  # [broker] config: broker-host mode
        self._random = random.Random()  # noqa: S311 - jitter only

    @property
    def prefix(self) -> str:
        return self.config.agent.topic_prefix

    @property
    def link(self) -> MqttLink | None:
        return self.uplink.link

    @property
    def spool(self) -> Spool:
        return self.delivery.spool

    @property
    def refused(self) -> int:
        """Statuses the broker refused (ACL): never deliverable."""
        return self.delivery.refused

    @property
    def last_publish_ok_at(self) -> datetime | None:
        return self.delivery.last_ok_at

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
        if self.uplink.ensure(self.config, material, self._resolve_device_id):
            self._broker_key = None  # a new session: its broker chain is judged afresh

    # ------------------------------------------------------------ one cycle

    def cycle(self, *, sign: bool = True) -> CycleResult:
        """Collect and judge everything, build the status, and sign it (`sign=False`
        is `show`: no sequence number is used up)."""
        material = self._read_material()
        now = self.clock.now()
        device_id = self._resolve_device_id(material)
        verdict, clock_findings = self._judge_clock(material)
        check = check_device(material, now, self.policy, clock=verdict)
        self._refresh_broker(material, now, verdict)
        status = build_status(
            device_id=device_id, boot_id=self.boot_id,
            seq=self.seq.next() if sign else self.seq.last + 1, now=now,
            mono_s=self.clock.monotonic(), interval_s=self.config.agent.interval_s,
            check=check, clock=verdict, clock_findings=clock_findings, broker=self._broker,
            beacon=self.uplink.beacon, counters=self._counters(), policy=self.policy,
            broker_host=self._judge_broker_host(now))
        if self.config.renewal.enabled and check.client is not None:
            # Imported here, as in renew(): the attempt machinery (and the TLS probe
            # under it, pyOpenSSL) stays out of an agent that does not renew.
            from .renewal import attempt as renewal

            status = dataclasses.replace(status, renewal=renewal.status_part(
                self.config, device_id, check.client, now, is_clock_ok=self._is_clock_ok))
        beat = self._heartbeat_for(status) if sign else None
        if beat is not None:
            token = self._sign(material, p.encode_message(beat), p.HEARTBEAT_TYP)
            return CycleResult(status, token, material, heartbeat=beat)
        payload = p.encode_status(status)
        token = self._sign(material, payload, p.STATUS_TYP,
                           include_x5c=self._is_x5c_due(material)) if sign else b""
        if sign and self.config.agent.heartbeat:
            link = self.link
            self._last_full = _LastFull(p.status_digest(payload), status_essence(status),
                                        self.clock.monotonic(),
                                        link.state.connects if link is not None else None)
        return CycleResult(status, token, material)

    def _heartbeat_for(self, status: p.Status) -> p.Heartbeat | None:
        """A heartbeat to send instead of `status` (`agent.heartbeat`), or None: only
        while connected on the session the last full status was signed on, with that
        status confirmed (the spool is empty, so order holds: nothing older is still
        on its way), younger than `full_every_s`, and differing from this one only in
        time and counters. A new session starts with a full status, so it re-asserts
        the retained copy a new collector bootstraps from (and carries x5c when due).
        Without retained statuses (`mqtt.retain` false) a new collector would have
        nothing a heartbeat refers to: full statuses then."""
        agent, last, link = self.config.agent, self._last_full, self.link
        if not agent.heartbeat or last is None or link is None or not link.is_connected \
                or not getattr(self.config.mqtt, "retain", True):
            return None
        if self.spool.depth or link.state.connects != last.connects:
            return None
        if self.clock.monotonic() - last.at_mono_s >= agent.full_every_s:
            return None
        if status_essence(status) != last.essence:
            return None
        return build_heartbeat(status, last.digest)

    def _is_x5c_due(self, material: DeviceMaterial) -> bool:
        """Whether this status carries its signing chain in `x5c` (`mqtt.status_x5c`):
        with "on_change", the first status of each connection and of each signing
        certificate, and every status signed while offline (it reaches the broker on
        a later session, maybe ahead of the first status signed on it), so a collector
        learns the certificate where the broker does not retain the cert topic."""
        mode = self.config.mqtt.status_x5c
        if mode != "on_change":
            return mode == "always"
        signer = material.signer()
        link = self.link
        if signer is None or link is None or not link.is_connected:
            return True
        key = (link.state.connects, signer[1].certs[0].facts.sha256)
        due, self._x5c_key = key != self._x5c_key, key
        return due

    def _judge_broker_host(
        self, now: datetime,
    ) -> tuple[p.BrokerHostState, tuple[pki.Finding, ...]] | None:
        """The broker host's files and listeners judged (`[broker] config`), at most
        once per `check_every_s`; the reports between carry the last judgement."""
        broker = self.config.broker
        if broker.config is None:
            return None
        if self._broker_host is None:
            # Imported here: an agent that is not on a broker host never loads it.
            from .brokerhost.watch import BrokerHostWatch

            self._broker_host = BrokerHostWatch(broker.config, broker.kind,
                                                broker.check_every_s)
        return self._broker_host.current(now, self.clock.monotonic(), self.policy)

    def _judge_clock(self, material: DeviceMaterial) -> tuple[ClockVerdict, list[pki.Finding]]:
        state = collect_clock_state(runner=self.runner, proc_root=self.proc_root,
                                    sntp_servers=self.config.clock.sntp_servers,
                                    clock=self.clock)
        verdict, findings = evaluate_clock(
            state, newest_not_before=newest_not_before(material), release_date=release_date(),
            skew_tolerance_s=self.config.clock.skew_tolerance_s)
        # Renewal waits for a good clock: the one rule is renewal.policy.CLOCK_WRONG.
        self._is_clock_ok = not any(f.code in CLOCK_WRONG for f in findings)
        return verdict, findings

    def _read_material(self) -> DeviceMaterial:
        tls = self.config.tls
        return read_material(tls.ca_bundle, tls.cert, tls.key, signing_cert=tls.signing_cert,
                             signing_key=tls.signing_key)

    def _sign(self, material: DeviceMaterial, payload: bytes, typ: str, *,
              include_x5c: bool = False) -> bytes:
        signer = material.signer()
        if signer is None:
            which = "signing" if material.signing is not None else "client"
            raise TransportError(f"cannot sign: the {which} certificate or key is unreadable")
        key, bundle = signer
        leaf, *chain = (c.cert for c in bundle.certs)
        return p.sign_jws(payload, key, leaf, typ=typ,  # type: ignore[arg-type]
                          include_x5c=include_x5c, chain=chain)

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
            # The link read only the leaf (an ssl module without get_unverified_chain,
            # public or private): a probe of the same endpoint fetches the
            # intermediates, kept only if it saw the same leaf. Imported here:
            # pyOpenSSL (~6 MiB resident) only in that case.
            from certmon.tlsprobe import ProbeTarget
            from certmon.tlsprobe import probe as tls_probe

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
        """Spool the signed status; queue the cert and inventory messages on change.
        A heartbeat is published at once, not retained and not spooled: one lost to a
        dropped link says nothing the next report will not (the cert and inventory
        are unchanged: a heartbeat stands only for an unchanged status)."""
        device_id = result.status.device_id
        if result.heartbeat is not None:
            self._publish_heartbeat(device_id, result)
            return
        self.delivery.spool_status(result.status.seq, p.status_topic(self.prefix, device_id),
                                   result.token, self.link)
        client = result.material.client
        signing = result.material.signer()
        if signing is not None:
            msg = p.cert_message(device_id, [c.cert for c in signing[1].certs],
                                 [c.cert for c in client.certs] if client else ())
            self.delivery.retain(p.cert_topic(self.prefix, device_id), p.encode_message(msg))
        inventory_topic = p.inventory_topic(self.prefix, device_id)
        ts = result.status.trust_store
        # Re-signed when the trust store changes, and when the signing certificate
        # does: a retained inventory signed by a replaced certificate could no longer
        # be verified by a collector that (re)starts after the renewal.
        signer = signing[1].certs[0].facts.sha256 if signing is not None else ""
        if ts is not None and self.delivery.retained_digest(inventory_topic) != ts.digest + signer:
            inv = inventory(device_id, result.status.ts, result.material.trust_store.facts)
            self.delivery.retain(inventory_topic, self._sign(result.material, p.encode_message(inv),
                                                             p.INVENTORY_TYP),
                                 digest=ts.digest + signer)

    def _publish_heartbeat(self, device_id: str, result: CycleResult) -> None:
        link = self.link
        try:
            if link is None:
                raise TransportError("no link")
            link.publish(p.heartbeat_topic(self.prefix, device_id), result.token, qos=1,
                         retain=False, expiry_s=3 * self.config.agent.interval_s)
        except TransportError as exc:
            log.warning("heartbeat seq=%s not sent (%s): the next report goes out as usual",
                        result.status.seq, exc)

    def flush(self) -> None:
        """Hand spooled messages to the link in order; forget those PUBACKed."""
        self.delivery.drain_acks(self.link)
        if self.uplink.is_protocol_refused:
            self._ensure_link(self._read_material())
        link = self.link
        if link is None or not link.is_connected:
            return
        if self.uplink.take_new_session():
            self.delivery.new_session()  # a new session: re-assert the retained side topics
            publish_retained(link, p.online_topic(self.prefix, self.device_id or ""),
                             p.online_payload(True))
        agent = self.config.agent
        # With heartbeats the retained full status must outlive the heartbeats that
        # refer to it: a new collector learns the device's state from that copy.
        self.delivery.send(link, expiry_s=3 * agent.interval_s
                           + (agent.full_every_s if agent.heartbeat else 0))

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
        self._ensure_link(self._read_material())
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

    def renew(self, *, force: bool = False) -> renewal.RenewalRun | None:
        """One renewal check (and attempt when due, or forced) against the files on
        disk and a fresh clock verdict; None when there is no client certificate."""
        material = self._read_material()
        client = material.client
        if client is None or not client.certs:
            return None
        device_id = self._resolve_device_id(material)
        self._judge_clock(material)
        from .renewal import attempt as renewal

        return renewal.renew_if_due(self.config, device_id, material.trust_store,
                                    client.certs[0].facts, self.clock.now(),
                                    is_clock_ok=self._is_clock_ok, force=force)

    def _renew_logged(self) -> None:
        # Checked before each report, so the report right after it carries the
        # outcome and, when renewed, goes out over a link built with the new pair.
        if not self.config.renewal.enabled:
            return
        try:
            self.renew()
        except (ConfigError, OSError) as exc:
            log.error("renewal check failed: %s", exc)

    def _report_logged(self) -> None:
        self._renew_logged()
        try:
            result = self.report_once()
        except (ConfigError, TransportError, OSError) as exc:
            log.error("report failed: %s", exc)
            return
        worst = max((f.severity for f in result.status.findings), default=pki.Severity.OK)
        log.info("%s seq=%s %s findings=%s spool=%s",
                 "status" if result.heartbeat is None else "heartbeat", result.status.seq,
                 worst.name,
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
        stamp = tuple(_stamp(path) for path in (tls.ca_bundle, tls.cert, tls.key,
                                                tls.signing_cert, tls.signing_key) if path)
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
        self._broker_host = None  # judged afresh with the new [broker] and policy
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
                final.append((p.online_topic(self.prefix, self.device_id), p.online_payload(False),
                              True))
            self.uplink.stop(final=final)


def _policy(config: AgentConfig) -> pki.Policy:
    return pki.Policy(**dataclasses.asdict(config.policy))


def _stamp(path: Path) -> object:
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.errno
    return (st.st_ino, st.st_size, st.st_mtime_ns)

