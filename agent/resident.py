"""The long-lived half of `certmon-agent run`: the MQTT session, the spool, the timing.

Owns the process `run` becomes (`agent.cli` execs `python -m agent.resident FLAGS`
once the config is valid): the link (`agent.uplink`), delivery (`agent.delivery`),
the loop (`agent.loop`), signals (SIGTERM: say offline and leave cleanly; SIGHUP:
the next check reloads the config) and sd_notify, and one check per report, run in a
child forked for it (`agent.checker`): the child reads and judges the files, signs
and spools, hands back a `Reply` through a pipe and exits, so cryptography and the
parsed certificates never stay resident (docs/agent-footprint.md).
Must not import cryptography, pyOpenSSL, `certmon.pki`, `certmon.wire`,
`certmon.config`, or an agent module that does (tests/test_agent_resident.py reads
the process's memory map); the checker's state stays opaque bytes here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import select
import signal
import sys
import time
from pathlib import Path

from certmon import systemd
from certmon.clock import SystemClock, boot_id
from certmon.errors import EX_CONFIG
from certmon.mqtt import MqttLink

from .delivery import Delivery
from .filewatch import FileWatch
from .handoff import Plan, Reply
from .loop import LoopControl, run_loop
from .spool import Spool
from .uplink import Uplink

log = logging.getLogger("certmon.agent")

# Until the first check has read the config (the interval is in it): how soon to try
# again when it failed. The config's smallest interval.
RETRY_S = 10.0
# The first check has no plan yet: long enough for the longest renewal hook.
FIRST_CHECK_DEADLINE_S = 3600.0 + 300.0
STOP_GRACE_S = 10.0  # a check still running this long after a stop request is killed


class ResidentAgent(LoopControl):
    def __init__(self, flags: dict[str, object], *, proc_root: Path = Path("/proc")) -> None:
        self.flags = flags  # the command line, for the checker's config load
        self.clock = SystemClock()
        self.boot_id = boot_id(proc_root)
        self.started_mono_s = self.clock.monotonic()
        self.plan: Plan | None = None
        self.delivery: Delivery | None = None
        self.state: bytes | None = None  # the checker's (agent.checker.CheckerState)
        self.link_generation = 0  # +1 for each link built: the checker judges afresh
        self.config_failed = False  # the first check could not load the config
        self._judged_broker: tuple[int, bytes] | None = None
        self._is_reload_due = True  # the first check loads the config
        LoopControl.__init__(self)
        self._files = FileWatch()
        self._random = random.Random()  # noqa: S311 - jitter only
        # The beacon stays raw here (decoding it is the wire format's): the checker
        # decodes it, and keeps the last valid one.
        self.uplink: Uplink[tuple[bytes, float]] = Uplink(
            monotonic=self.clock.monotonic, wake=self._wake.set,
            on_published=self._on_published, on_replaced=self._on_replaced,
            read_beacon=lambda payload, mono_s: (payload, mono_s))

    @property
    def link(self) -> MqttLink | None:
        return self.uplink.link

    def run(self) -> int:
        run_loop(monotonic=self.clock.monotonic, stop=self._stop, wake=self._wake,
                 reload=self._reload, on_reload=self._on_reload,
                 is_changed=self._is_changed, report=self._report,
                 next_interval_s=self._next_interval_s, flush=self.flush)
        self.shutdown()
        return EX_CONFIG if self.config_failed else 0

    # ------------------------------------------------------------ one report

    def _report(self) -> None:
        reload, self._is_reload_due = self._is_reload_due, False
        link = self.link
        self._judged_broker = _broker_key(link)
        reply = self._fork_check(reload=reload)
        if reply is None:
            self._is_reload_due = reload or self.state is None
            return
        self.state = reply.state
        self._take_plan(reply.plan)
        self._ensure_link()
        if reply.outbox is not None and self.delivery is not None:
            self.delivery.hand_over(reply.outbox, self.link)

    def _fork_check(self, *, reload: bool) -> Reply | None:
        """One check in a forked child; its Reply, or None when it failed (it logged
        why). The child inherits this process's memory: it reads the link's state,
        the raw beacon and the checker state from it, and never writes to the link."""
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:
            log.error("report failed: cannot open a pipe to the checker: %s", exc)
            return None
        try:
            pid = os.fork()
        except OSError as exc:  # e.g. out of memory: the next interval tries again
            log.error("report failed: cannot fork the checker: %s", exc)
            os.close(read_fd)
            os.close(write_fd)
            return None
        if pid == 0:  # the checker: whatever happens, it ends here, never in the loop
            code = 70
            try:
                _fresh_stdio()
                os.close(read_fd)
                from .checker import CheckerConfigError, check

                data = pickle.dumps(check(self, reload=reload))
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(data)
                code = 0
            except CheckerConfigError as exc:
                print(f"certmon-agent: {exc}", file=sys.stderr)
                code = EX_CONFIG
            except BaseException:
                log.exception("the report's checker failed")
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(write_fd)
        data, code = self._await(pid, read_fd)
        if code == EX_CONFIG and self.state is None:
            self.config_failed = True
            self.request_stop()
        if code != 0 or not data:
            if code not in (0, EX_CONFIG):
                log.error("report failed: the checker exited with %s", _exit_text(code))
            return None
        try:
            reply = pickle.loads(data)  # noqa: S301 - our own child's, on a pipe only it holds
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError,
                TypeError) as exc:  # a reply cut short: that report failed, not the agent
            log.error("report failed: the checker's reply is unreadable (%s)",
                      type(exc).__name__)
            return None
        return reply if isinstance(reply, Reply) else None

    def _await(self, pid: int, read_fd: int) -> tuple[bytes, int]:
        """The checker's reply and exit code. While it runs (a renewal hook may take
        minutes) the resident keeps pinging the systemd watchdog — only the main
        process's pings count — and a checker past its deadline, or still running
        when a stop was asked for, is killed (a child stuck on a lock it inherited
        across the fork must not freeze the agent)."""
        plan = self.plan
        deadline = time.monotonic() + (plan.check_deadline_s if plan else FIRST_CHECK_DEADLINE_S)
        watchdog_s = systemd.watchdog_interval_s()
        slice_s = min(watchdog_s / 2, 5.0) if watchdog_s else 5.0
        chunks: list[bytes] = []
        stop_seen_at: float | None = None
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                ready, _, _ = select.select([pipe], [], [], slice_s)
                if ready:
                    chunk = pipe.read(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    continue
                systemd.watchdog()
                now = time.monotonic()
                if self._stop.is_set() and stop_seen_at is None:
                    stop_seen_at = now
                if now >= deadline or (stop_seen_at is not None
                                       and now - stop_seen_at >= STOP_GRACE_S):
                    log.error("report failed: the checker ran past %s; killed",
                              "its deadline" if now >= deadline else "the stop")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    break
        _, status = os.waitpid(pid, 0)
        return b"".join(chunks), os.waitstatus_to_exitcode(status)

    def _take_plan(self, plan: Plan) -> None:
        if self.delivery is None:
            # The spool is set up once, as the in-process service does: a reload
            # changes neither its directory nor its caps.
            self.delivery = Delivery(Spool(plan.state_dir, max_messages=plan.spool_max_messages,
                                           max_bytes=plan.spool_max_bytes), self.clock)
        self.plan = plan

    def _ensure_link(self) -> None:
        plan = self.plan
        if plan is None or plan.settings is None:
            return
        settings = plan.settings
        if self.uplink.ensure(plan.client_sha256, lambda: settings, plan.beacon_topic):
            self.link_generation += 1
            self._judged_broker = None

    # ------------------------------------------------------------ delivery

    def flush(self) -> None:
        plan, delivery = self.plan, self.delivery
        if plan is None or delivery is None:
            return
        online = (plan.online_topic, plan.online_payload) if plan.online_topic else None
        delivery.flush(self.uplink, online=online, expiry_s=plan.status_expiry_s,
                       rebuild=self._ensure_link)

    def _on_published(self, mid: int, accepted: bool) -> None:
        if self.delivery is not None:
            self.delivery.on_published(mid, accepted)

    def _on_replaced(self) -> None:
        if self.delivery is not None:
            self.delivery.forget_inflight()

    # ------------------------------------------------------------ timing and signals

    def _is_changed(self) -> bool:
        plan = self.plan
        if plan is not None and self._files.is_changed(plan.watched):
            log.info("certificate material changed on disk: reporting now")
            return True
        # A new connection (or a new broker leaf) is reported at once: the broker
        # chain as seen is the fact most likely to have changed.
        key = _broker_key(self.link)
        return key is not None and key != self._judged_broker

    def _next_interval_s(self) -> float:
        plan = self.plan
        if plan is None:
            return RETRY_S
        spread = plan.jitter_fraction
        return plan.interval_s * (1 + self._random.uniform(-spread, spread))

    def _on_reload(self) -> None:
        self._is_reload_due = True

    def shutdown(self) -> None:
        """Say offline (retained) and DISCONNECT cleanly: the will does not fire."""
        systemd.stopping()
        plan = self.plan
        if self.link is not None:
            final = [(plan.online_topic, plan.offline_payload, True)] \
                if plan is not None and plan.online_topic else []
            self.uplink.stop(final=final)


def _broker_key(link: MqttLink | None) -> tuple[int, bytes] | None:
    if link is None or not link.state.peer_chain_der:
        return None
    return (link.state.connects, link.state.peer_chain_der[0])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    flags = json.loads(args[0])
    logging.basicConfig(level=logging.DEBUG if flags.get("verbose") else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    agent = ResidentAgent(flags)
    # certmon.cli.on_stop_signals, which this process cannot import (certmon.pki).
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    return agent.run()


def _exit_text(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"code {code}"


def _fresh_stdio() -> None:
    """The checker's own stdout/stderr objects. Another thread of the resident (paho's
    network thread, logging) may have held the old ones' buffer lock at the fork: the
    child's first log line would then wait for ever. Handlers are re-pointed without
    `setStream`, which would flush — and lock — the old stream."""
    old_err, old_out = sys.stderr, sys.stdout
    sys.stderr = open(2, "w", buffering=1, closefd=False,  # noqa: SIM115 - for the process
                      encoding=getattr(old_err, "encoding", None) or "utf-8",
                      errors="backslashreplace")
    sys.stdout = open(1, "w", buffering=1, closefd=False,  # noqa: SIM115 - for the process
                      encoding=getattr(old_out, "encoding", None) or "utf-8")
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler):
                if handler.stream is old_err:
                    handler.stream = sys.stderr
                elif handler.stream is old_out:
                    handler.stream = sys.stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
