"""The agent's service loop: collect → judge → sign → spool → deliver, forever.

Owns the interval with jitter and what makes a report early (the files or the broker
chain changed; the loop itself, with sd_notify, is `agent.loop`'s), one cycle (read
the files, ask the clock sources, judge, build and sign the status with the signing
key), the device identity, what is enqueued after a cycle (status or heartbeat, cert
message, inventory), when renewal is checked (before each report), and stop and
reload requests (SIGTERM: say offline and leave cleanly; SIGHUP: reload the config).
It composes the schedules that live in their own modules: the broker
chain judged once per connection (`agent.brokerchain`), heartbeats
(`agent.heartbeat`), `x5c` (`agent.x5c`), broker-host mode (`agent.hostmode`) and
renewal (`agent.renewal.schedule`). `run()` is the one-process loop; `certmon-agent
run` splits the same steps over a resident process (`agent.resident`: link, spool,
timing) and a checker forked per report (`agent.checker`: `cycle` and `prepare`).
Must not: hold the link's life cycle (`agent.uplink`) or the spool and PUBACK
bookkeeping (`agent.delivery`); judge (`agent.report` / `agent.status`); spell the
wire format (`certmon.wire`) or import paho (`certmon.mqtt`). Never logs key
material: only paths and fingerprints.
"""

from __future__ import annotations

import dataclasses
import logging
import random
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

from . import identity
from .brokerchain import BrokerChainWatch
from .certstore import DeviceMaterial, read_material
from .clocksync import ClockVerdict, Runner, collect_clock_state, evaluate_clock, run_command
from .config import AgentConfig
from .delivery import Delivery, Outbox
from .filewatch import FileWatch
from .heartbeat import HeartbeatSchedule, LastFull
from .hostmode import BrokerHostMode
from .linkplan import heartbeat_expiry_s, link_settings, read_beacon, status_expiry_s
from .loop import LoopControl, run_loop
from .renewal import schedule as renewal
from .renewal.policy import CLOCK_WRONG
from .report import check_device, newest_not_before
from .sidetopics import side_messages
from .spool import SequenceCounter, Spool
from .status import AgentCounters, build_status
from .uplink import Uplink
from .x5c import X5cSchedule

if TYPE_CHECKING:
    from .renewal.attempt import RenewalRun

log = logging.getLogger("certmon.agent")



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


class AgentService(LoopControl):
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
        LoopControl.__init__(self)
        self.uplink: Uplink[p.BeaconEcho] = Uplink(
            monotonic=self.clock.monotonic, wake=self._wake.set,
            on_published=self.delivery.on_published, on_replaced=self.delivery.forget_inflight,
            read_beacon=read_beacon)
        self.rss_pid: int | None = None  # whose RSS the status reports (None: this process)
        self.broker_chain = BrokerChainWatch()
        self.heartbeats = HeartbeatSchedule()
        self.x5c = X5cSchedule()
        self.broker_host = BrokerHostMode()
        self.files = FileWatch()
        self._is_clock_ok = True  # until a cycle's clock findings say otherwise
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

    @property
    def _last_full(self) -> LastFull | None:
        return self.heartbeats.last_full

    @_last_full.setter
    def _last_full(self, value: LastFull | None) -> None:
        self.heartbeats.last_full = value

    def _connected_on(self) -> int | None:
        """The link's connection count while connected, else None."""
        link = self.link
        return link.state.connects if link is not None and link.is_connected else None

    # ------------------------------------------------------------ identity & link

    def _resolve_device_id(self, material: DeviceMaterial) -> str:
        if self.device_id is None:
            self.device_id = identity.device_id_from(material, self.config.tls.cert)
        return self.device_id

    def _ensure_link(self, material: DeviceMaterial) -> None:
        client = material.client
        if self.uplink.ensure(client.certs[0].facts.sha256 if client and client.certs else None,
                              lambda: link_settings(self.config, self._resolve_device_id(material)),
                              p.beacon_topic(self.prefix)):
            self.broker_chain.forget_session()

    # ------------------------------------------------------------ one cycle

    def cycle(self, *, sign: bool = True) -> CycleResult:
        """Collect and judge everything, build the status, and sign it (`sign=False`
        is `show`: no sequence number is used up)."""
        material = self._read_material()
        now = self.clock.now()
        device_id = self._resolve_device_id(material)
        verdict, clock_findings = self._judge_clock(material)
        check = check_device(material, now, self.policy, clock=verdict)
        self.broker_chain.refresh(self.link, self.config, material, now, self.policy, verdict)
        status = build_status(
            device_id=device_id, boot_id=self.boot_id,
            seq=self.seq.next() if sign else self.seq.last + 1, now=now,
            mono_s=self.clock.monotonic(), interval_s=self.config.agent.interval_s,
            check=check, clock=verdict, clock_findings=clock_findings,
            broker=self.broker_chain.observation, beacon=self.uplink.beacon,
            counters=self._counters(), policy=self.policy,
            broker_host=self.broker_host.judge(self.config.broker, now,
                                               self.clock.monotonic(), self.policy))
        status = renewal.with_renewal_part(status, self.config, check.client, now,
                                           is_clock_ok=self._is_clock_ok)
        beat = self.heartbeats.heartbeat_for(
            self.config, status, connected_on=self._connected_on(),
            spool_depth=self.spool.depth, mono_s=self.clock.monotonic()) if sign else None
        if beat is not None:
            token = identity.sign(material, p.encode_message(beat), p.HEARTBEAT_TYP)
            return CycleResult(status, token, material, heartbeat=beat)
        if not sign:
            return CycleResult(status, b"", material)
        payload = p.encode_status(status)
        signer = material.signer()
        x5c = self.x5c.is_due(self.config.mqtt.status_x5c,
                              signer[1].certs[0].facts.sha256 if signer else None,
                              self._connected_on())
        token = identity.sign(material, payload, p.STATUS_TYP, include_x5c=x5c)
        link = self.link
        self.heartbeats.record_full(self.config, payload, status, self.clock.monotonic(),
                                    link.state.connects if link is not None else None)
        return CycleResult(status, token, material)

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
        return read_material(tls.ca_bundle, tls.cert, tls.key, **tls.signing_args())

    def _counters(self) -> AgentCounters:
        try:
            rss: int | None = psutil.Process(self.rss_pid).memory_info().rss
        except psutil.Error:
            rss = None
        return AgentCounters(self.started_mono_s, rss, self.last_publish_ok_at,
                             self.spool.depth, self.spool.dropped)

    # ------------------------------------------------------------ delivery

    def enqueue(self, result: CycleResult) -> None:
        self.delivery.hand_over(self.prepare(result), self.link)

    def prepare(self, result: CycleResult) -> Outbox:
        """Spool the signed status, and name the cert and inventory messages to retain
        on change; a heartbeat is not spooled (`Delivery.hand_over`): it stands only
        for an unchanged status, so the cert and inventory are unchanged too. Touches
        no link: `agent.checker` runs it in a process of its own."""
        device_id, seq = result.status.device_id, result.status.seq
        if result.heartbeat is not None:
            return Outbox(seq, p.heartbeat_topic(self.prefix, device_id), result.token,
                          is_heartbeat=True, expiry_s=heartbeat_expiry_s(self.config))
        topic = p.status_topic(self.prefix, device_id)
        is_spooled = self.delivery.spool_status(seq, topic, result.token)
        side = side_messages(self.prefix, result.status, result.material,
                             self.delivery.retained_digest)
        return Outbox(seq, topic, result.token, is_spooled=is_spooled, side=tuple(side))

    def flush(self) -> None:
        """Hand spooled messages to the link in order; forget those PUBACKed."""
        online = (p.online_topic(self.prefix, self.device_id or ""), p.online_payload(True))
        self.delivery.flush(self.uplink, online=online, expiry_s=status_expiry_s(self.config),
                            rebuild=lambda: self._ensure_link(self._read_material()))

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
        run_loop(monotonic=self.clock.monotonic, stop=self._stop, wake=self._wake,
                 reload=self._reload, on_reload=self._do_reload,
                 is_changed=lambda: self._files_changed()
                 or self.broker_chain.is_changed(self.link),
                 report=self._report_logged, next_interval_s=self._next_interval_s,
                 flush=self.flush)
        self.shutdown()
        return 0

    def renew(self, *, force: bool = False) -> RenewalRun | None:
        """One renewal check (and attempt when due, or forced) against the files on
        disk and a fresh clock verdict; None when there is no client certificate."""
        material = self._read_material()
        client = material.client
        if client is None or not client.certs:
            return None
        device_id = self._resolve_device_id(material)
        self._judge_clock(material)
        return renewal.renew_if_due(self.config, device_id, material.trust_store,
                                    client.certs[0].facts, self.clock.now(),
                                    is_clock_ok=self._is_clock_ok, force=force)

    def renew_logged(self) -> None:
        # Checked before each report, so the report right after it carries the
        # outcome and, when renewed, goes out over a link built with the new pair.
        if not self.config.renewal.enabled:
            return
        try:
            self.renew()
        except (ConfigError, OSError) as exc:
            log.error("renewal check failed: %s", exc)

    def _report_logged(self) -> None:
        self.renew_logged()
        try:
            result = self.report_once()
        except (ConfigError, TransportError, OSError) as exc:
            log.error("report failed: %s", exc)
            return
        self.log_report(result)

    def log_report(self, result: CycleResult) -> None:
        worst = max((f.severity for f in result.status.findings), default=pki.Severity.OK)
        log.info("%s seq=%s %s findings=%s spool=%s",
                 "status" if result.heartbeat is None else "heartbeat", result.status.seq,
                 worst.name,
                 len(result.status.findings), self.spool.depth)

    def _next_interval_s(self) -> float:
        spread = self.config.agent.jitter_fraction
        return self.config.agent.interval_s * (1 + self._random.uniform(-spread, spread))

    def _files_changed(self) -> bool:
        tls = self.config.tls
        changed = self.files.is_changed(tls.watched())
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
        self.broker_host.reset()  # judged afresh with the new [broker] and policy
        log.info("configuration reloaded")

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


