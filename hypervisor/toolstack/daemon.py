"""``pvlab daemon``: one machine with any number of domains, driven by
commands on a Unix socket (xl's verbs, in QMP's shape: qmp.py), as xl and
xenconsoled drive a Xen host.

The loop (``Daemon.serve``): run the machine while a VCPU can run, a short
quantum at a time, answering messages between quanta; when every domain is
blocked, sleep in the socket's poll until the next timer (fast clock: host
time) or a message. Each quantum ends with the domains looked at: a suspend
is completed (libxl.complete_suspend), a shutdown is acted on as xl's
defaults say (on_poweroff=destroy, on_reboot=restart: rebuilt from its
configuration, with a new domid; on_crash=destroy), an unacknowledged
request given up, a balloon change told.

Every command goes through libxl, the layer the scripted ``pvlab run`` uses
too. A command that fails changes nothing and leaves every other domain
running. Each domain's console is a socket beside the daemon's (mode 0600,
removed with the domain): raw bytes both ways, a new client first gets the
recent output.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor, OutOfMemory
from hypervisor.public.sched import SHUTDOWN_crash, SHUTDOWN_reboot, SHUTDOWN_suspend
from hypervisor.public.xen import PAGE_SIZE
from hypervisor.toolstack import libxl, livejob, migrateuri
from hypervisor.toolstack.builder import BuildError
from hypervisor.toolstack.config import ConfigError, DomainConfig, load_config
from hypervisor.toolstack.context import domain_of
from hypervisor.toolstack.control import Request, resume_cancelled, type_on_console
from hypervisor.toolstack.elfimage import ImageError as ElfImageError
from hypervisor.toolstack.image import ImageError
from hypervisor.toolstack.livejob import DaemonLive, LiveJob, Machine
from hypervisor.toolstack.migrate import (
    INCOMING,
    MIGRATE_RECEIVER_BANNER,
    POSTCOPY_INCONSISTENT,
    Channel,
    MigrateError,
    MigrateOutcome,
    Received,
    migrate_domain,
    migrate_receive,
    read_fixed_message,
    receive_resume,
    resume_postcopy,
)
from hypervisor.toolstack.postcopy import Dropped, Pager, PostcopyPaused
from hypervisor.toolstack.precopy import MigrationInfo, PrecopyOptions
from hypervisor.toolstack.qmp import (
    Client,
    DaemonNotRunning,
    Deferred,
    Param,
    QmpError,
    Server,
    listen_unix,
)
from hypervisor.toolstack.remus import (
    BACKUP_FAILED,
    DEFAULT_INTERVAL_NS,
    PRIMARY_DESTROYED,
    DaemonRemus,
    OutputBuffer,
    RemusOutcome,
    replicate,
)
from hypervisor.toolstack.restore import RestoreError
from hypervisor.toolstack.save import write_image_live, write_in_place
from hypervisor.toolstack.stream import StreamError

log = logging.getLogger(__name__)

DEFAULT_MEMORY_MIB = 512
QUANTUM_FAST_NS = 20_000_000     # host time run between looks at the socket
QUANTUM_DET_NS = 2_000_000       # virtual time, deterministic clock
QUANTUM_LIVE_NS = 2_000_000      # host time run between turns while a live job waits for one
CONSOLE_HISTORY = 16 * 1024      # output a newly attached console client gets
DMESG_LINES = 2000
STOP_TURNS = 1000                # turns the daemon gives its cancelled jobs to end when it stops
GENERIC, NOT_FOUND = "GenericError", "DomainNotFound"
POLL_RECORDS = 16                # post-copy records loaded per look at the wire: the guests
#                                  run between (a record: 64 pages)
RESUME_HANDSHAKE_S = 10.0        # migrate-recover: the source's POSTCOPY_RESUME comes at once
POSTCOPY_RAM = "postcopy-ram"    # QEMU's capability: a migration may switch to post-copy
# what makes a create or a restore fail, said to the client as one line
_CREATE_ERRORS = (ConfigError, BuildError, ElfImageError, ImageError, RestoreError,
                  StreamError, libxl.LibxlError, OutOfMemory, OSError, ValueError)


class ConsoleSocket:
    """One domain's console for any number of clients (xenconsoled's side of
    ``xl console``): its output to each, what each types to the guest."""

    def __init__(self, server: Server, hv: Hypervisor, dom: Domain, path: Path) -> None:
        self.server, self.hv, self.dom, self.path = server, hv, dom, path
        self.history = bytearray()
        self.clients: list[socket.socket] = []
        path.unlink(missing_ok=True)  # a console left by a daemon that died
        self.listener = listen_unix(path)
        server.watch(self.listener, self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.setblocking(False)
        self.clients.append(conn)
        self._send(conn, bytes(self.history))
        self.server.watch(conn, lambda: self._read(conn))

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        type_on_console(self.hv, self.dom, data)

    def output(self, data: bytes) -> None:
        """What the guest wrote: kept for later clients, sent to those attached."""
        self.history += data
        del self.history[:-CONSOLE_HISTORY]
        for conn in list(self.clients):
            self._send(conn, data)

    def _send(self, conn: socket.socket, data: bytes) -> None:
        """A client too slow to take the output is dropped, never waited for."""
        try:
            if data:
                conn.sendall(data)
        except OSError:
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        if conn in self.clients:
            self.clients.remove(conn)
            self.server.unwatch(conn)
        conn.close()

    def close(self) -> None:
        for conn in list(self.clients):
            self._drop(conn)
        self.server.unwatch(self.listener)
        self.listener.close()
        self.path.unlink(missing_ok=True)


@dataclass
class SaveInFlight:
    """A domain-save waiting for the guest to suspend."""

    answer: Deferred
    path: Path
    checkpoint: bool
    paused: bool
    deadline: int      # system time by which the guest must have suspended


@dataclass
class DaemonDomain:
    """What the daemon keeps of a domain beside libxl's state."""

    dom: Domain
    cfg: DomainConfig | None          # what a reboot rebuilds it from (None: restored)
    console: ConsoleSocket
    state: libxl.DomainState = field(default_factory=libxl.DomainState)
    save: SaveInFlight | None = None
    live: LiveJob | None = None       # a live save or a migration under way
    parked: bool = False              # migrated after GO, the handshake failed: kept suspended
    paused_postcopy: MigrateOutcome | None = None  # its post-copy dropped: for migrate --resume
    destroying: Deferred | None = None  # xl destroy while Remus runs: answered at its end
    balloon: tuple[int, int] | None = None  # last (actual, target) KiB told


class DmesgHandler(logging.Handler):
    """The hypervisor's log records, kept for ``host-dmesg`` (xl dmesg)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque(maxlen=DMESG_LINES)
        self.setFormatter(logging.Formatter("(XEN) %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Daemon:
    """The machine, its domains and the command handlers."""

    def __init__(self, socket_path: Path, clock: str = "fast",
                 memory_mib: int = DEFAULT_MEMORY_MIB, version: str = "") -> None:
        self.hv = Hypervisor(memory_mib, clock=clock)
        self.clock = clock
        self.started_ns = time.monotonic_ns()
        self.domains: dict[int, DaemonDomain] = {}
        self.stopping = False
        self.dmesg = DmesgHandler()
        hv_log = logging.getLogger("hypervisor")
        hv_log.addHandler(self.dmesg)
        if hv_log.getEffectiveLevel() > logging.INFO:
            hv_log.setLevel(logging.INFO)
        major, minor = domctl.xen_version(self.hv)
        self.version = {"pvlab": version or _version(), "xen": {"major": major,
                                                                 "minor": minor}}
        self.server = Server(socket_path, self.version)
        self.dir = Path(socket_path).parent
        self.jobs: list[LiveJob] = []
        self.capabilities = {POSTCOPY_RAM: False}  # QEMU's migration capabilities
        self.incoming: tuple[LiveJob, Pager] | None = None  # a post-copy's pages coming in
        self.paused_incoming: tuple[LiveJob, Pager] | None = None  # its connection dropped
        self.last_job: dict[str, LiveJob] = {}   # by domain name, and "" for the last of all
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self.server.watch(self._wake_r, lambda: self._wake_r.recv(4096))
        self.machine = Machine(self._wake)
        for name, (handler, params) in self._commands().items():
            self.server.register(name, handler, params)

    # --- the loop --------------------------------------------------------------------

    def serve(self) -> None:
        """Run until ``quit`` (or stop()): machine and messages, in turn."""
        try:
            while not self.stopping:
                self.server.poll(self._timeout())
                if self.stopping:
                    break
                self.step()
                self.machine.turn()
                self._finish_jobs()
        finally:
            self.shutdown()

    def _wake(self) -> None:
        """End the loop's poll: a job's thread wants the machine."""
        try:
            self._wake_w.send(b"!")
        except (BlockingIOError, OSError):
            pass  # a byte is waiting already, or the daemon is closing

    def stop(self) -> None:
        self.stopping = True

    def now(self) -> int:
        return domctl.system_time(self.hv)

    def _deadlines(self) -> list[int]:
        marks = []
        for d in self.domains.values():
            if d.state.ack_deadline is not None:
                marks.append(d.state.ack_deadline)
            if d.save is not None:
                marks.append(d.save.deadline)
        marks += [j.wake_at for j in self.jobs if j.wake_at is not None]
        return marks

    def _timeout(self) -> float | None:
        """How long the socket's poll may sleep: not at all while a VCPU can
        run; until the next timer or deadline when every one is blocked;
        for ever when nothing but a message can change anything."""
        nxt = domctl.next_work(self.hv) if self.domains else None
        marks = self._deadlines()
        if nxt is None and not marks:
            return None
        now = self.now()
        when = min([*marks, *([nxt] if nxt is not None else [])])
        if when <= now:
            return 0.0
        if self.clock == "deterministic":
            return self._deterministic_timeout(nxt, when)
        return (when - now) / 1e9

    def _deterministic_timeout(self, nxt: int | None, when: int) -> float | None:
        """Virtual time: nothing runs before ``when``. With a timer to come,
        the loop waits until host time since the start reaches it, so that an
        idle guest's ticks do not race ahead and keep the host busy (what the
        guest sees depends on virtual time alone). With none, its time passes
        to the deadline at once; with no VCPU online it cannot pass, and only a
        message can change anything."""
        if nxt is not None:
            return max(0.0, (when - (time.monotonic_ns() - self.started_ns)) / 1e9)
        domctl.idle_until(self.hv, when)
        return 0.0 if self.now() >= when else None

    def step(self) -> None:
        """One quantum of the machine, then every domain looked at. The fast
        clock runs only once something is due (a message may have ended the
        poll early); the deterministic clock's time passes as it runs."""
        try:
            self._run_quantum()
        except PostcopyPaused as e:  # the pager paused its domain and keeps it
            log.warning("%s", e)
        except Exception:  # a bug (a pager's) must not stop the daemon
            log.exception("running the machine failed")
        if self.incoming is not None:
            self._incoming_info(*self.incoming)
        for d in list(self.domains.values()):
            try:
                self._look_at(d)
            except Exception:  # a bug must not take the other domains down
                log.exception("looking at domain %s failed", d.dom.name)

    def _run_quantum(self) -> None:
        nxt = domctl.next_work(self.hv) if self.domains else None
        if nxt is not None and (self.clock == "deterministic" or nxt <= self.now()):
            if self.clock == "deterministic":
                domctl.run(self.hv, self.now() + QUANTUM_DET_NS)
            else:
                quantum = QUANTUM_LIVE_NS if self.jobs or self.incoming else QUANTUM_FAST_NS
                domctl.run_while_busy(self.hv, self.now() + quantum)

    def _look_at(self, d: DaemonDomain) -> None:
        dom = d.dom
        if d.live is not None:  # its job's thread awaits its suspend and its requests
            self._check_balloon(d)
            return
        if d.parked and dom.shutdown_reason == SHUTDOWN_suspend:
            return
        if dom.shutdown_reason == SHUTDOWN_suspend:
            self._suspended(d)
            if dom.domid not in self.domains:
                return
        elif dom.shutdown_reason is not None:
            self._shut_down(d)
            return
        self._check_requests(d)
        self._check_balloon(d)

    def _check_requests(self, d: DaemonDomain) -> None:
        now = self.now()
        waiting = libxl.check_acknowledged(self.hv, d.dom, d.state, now)
        if waiting and d.save is not None:
            self._save_failed(d, libxl.why_not_suspended("", True, self._time_words()))
        elif waiting:
            log.info("guest %s didn't acknowledge %s, cancelling request", d.dom.name, waiting)
        if d.save is not None and now >= d.save.deadline:
            d.state.suspend = None
            self._save_failed(d, libxl.why_not_suspended("", False, self._time_words()))

    def _time_words(self) -> str:
        return "of virtual time" if self.clock == "deterministic" else "of host time"

    def _save_failed(self, d: DaemonDomain, why: str, runs_on: bool = True) -> None:
        save, d.save = d.save, None
        assert save is not None
        fate = "the guest runs on" if runs_on else "the domain is gone"
        save.answer.fail(GENERIC, f"{why}; nothing was saved, {fate}")

    def _check_balloon(self, d: DaemonDomain) -> None:
        now = libxl.balloon_kib(self.hv, d.dom)
        if now is not None and now != d.balloon:
            d.balloon = now
            self._emit("BALLOON_CHANGE", d.dom, actual_kib=now[0], target_kib=now[1])

    def _suspended(self, d: DaemonDomain) -> None:
        """The suspend's completion; the domain saved away is destroyed."""
        dom, save = d.dom, d.save
        d.save = None
        self._emit("SUSPEND", dom)
        done = libxl.complete_suspend(self.hv, dom, d.state)
        if done.line:
            log.info("%s", done.line)
        if save is not None:
            self._answer_save(save, done)
        if not done.runs_on:
            libxl.destroy_saved(self.hv, dom, lambda msg: log.info("%s", msg))
            self._forget(d)
            return
        if save is not None and save.paused:
            libxl.pause(dom)
        self._emit("RESUME", dom)

    def _answer_save(self, save: SaveInFlight, done: libxl.SuspendDone) -> None:
        outcome = done.outcome
        if outcome is None or outcome.stats is None:
            save.answer.fail(GENERIC, outcome.error if outcome else "the save was not made")
        else:
            save.answer.resolve({"file": str(save.path), "pages": outcome.stats.pages,
                                 "bytes": outcome.stats.bytes})

    def _shut_down(self, d: DaemonDomain) -> None:
        """xl's defaults: on_poweroff=destroy, on_reboot=restart, on_crash=destroy."""
        dom = d.dom
        reason = domctl.shutdown_name(dom.shutdown_reason)  # type: ignore[arg-type]
        if dom.shutdown_reason == SHUTDOWN_crash:
            self._emit("CRASH", dom, report=dom.crash_report)
        self._emit("SHUTDOWN", dom, reason=reason)
        if d.save is not None:
            self._save_failed(d, libxl.why_not_suspended(reason, False, ""), runs_on=False)
        self._destroy(d)
        if dom.shutdown_reason == SHUTDOWN_reboot and d.cfg is not None:
            try:
                self._create(d.cfg, paused=False)
            except _CREATE_ERRORS as e:
                log.warning("rebooting %s failed: %s", dom.name, e)

    # --- domains -----------------------------------------------------------------------

    def _adopt(self, dom: Domain, cfg: DomainConfig | None) -> DaemonDomain:
        path = self.dir / f"console-{dom.domid}.sock"
        d = DaemonDomain(dom, cfg, ConsoleSocket(self.server, self.hv, dom, path))
        domain_of(self.hv, dom).console_sink = lambda _dom, data: d.console.output(data)
        d.console.output(bytes(dom.console_out))
        d.balloon = libxl.balloon_kib(self.hv, dom)
        self.domains[dom.domid] = d
        self._emit("DOMAIN_CREATED", dom)
        return d

    def _create(self, cfg: DomainConfig, paused: bool) -> DaemonDomain:
        dom = libxl.create_domain(self.hv, cfg, paused=paused)
        try:
            return self._adopt(dom, cfg)
        except OSError:
            libxl.destroy_domain(self.hv, dom)
            raise

    def _destroy(self, d: DaemonDomain) -> None:
        if d.dom in domctl.getdomaininfolist(self.hv):
            libxl.destroy_domain(self.hv, d.dom)
        self._forget(d)

    def _forget(self, d: DaemonDomain) -> None:
        if self.incoming is not None and self.incoming[1].dom is d.dom:
            self.incoming[1].drain()  # gone: its pages are no longer wanted
        paused = self.paused_incoming
        if paused is not None and paused[1].dom is d.dom:
            self.paused_incoming = None  # no resume can come for it now
            paused[1].abandon()
            self._set_status(paused[0], "failed")
        d.console.close()
        self.domains.pop(d.dom.domid, None)
        if d.save is not None:
            self._save_failed(d, "the domain was destroyed", runs_on=False)
        self._emit("DOMAIN_DESTROYED", d.dom)

    def shutdown(self) -> None:
        """Stop every domain and close the socket."""
        self._stop_jobs()
        for d in list(self.domains.values()):
            self._destroy(d)
        self.server.close()
        logging.getLogger("hypervisor").removeHandler(self.dmesg)

    def _emit(self, event: str, dom: Domain, **data: Any) -> None:
        self.server.emit(event, {"domid": dom.domid, "name": dom.name, **data})

    def find(self, args: dict[str, Any]) -> DaemonDomain:
        which = args["domain"]
        dom = libxl.find_domain(self.hv, which)
        if dom is None or dom.domid not in self.domains:
            raise QmpError(NOT_FOUND, f"no domain {which!r}")
        return self.domains[dom.domid]

    # --- live jobs (livejob.py): a live save, a migration ------------------------------

    def _not_moving(self, d: DaemonDomain) -> DaemonDomain:
        """Refuse a command that would change a domain a live job is moving."""
        if d.live is not None:
            what = {"save": "saved live", "remus": "replicated (Remus)"}.get(d.live.kind,
                                                                          "migrated")
            raise QmpError(GENERIC, f"domain {d.dom.name} is being {what}: wait until that "
                                    "ends")
        return d

    def _start_job(self, d: DaemonDomain | None, kind: str, work: Callable[[LiveJob], Any],
                   finish: Callable[[LiveJob], None], postcopy_ok: bool = False) -> LiveJob:
        job = LiveJob(kind, d.dom if d is not None else None, finish=finish,
                      postcopy_ok=postcopy_ok)
        self.jobs.append(job)
        if d is not None:
            d.live = job
            self.last_job[d.dom.name] = self.last_job[""] = job
        self._emit_job("MIGRATION", job, status="setup")
        livejob.start(self.machine, job, work)
        return job

    def _callbacks(self, d: DaemonDomain, job: LiveJob) -> DaemonLive:
        def suspended() -> None:
            job.suspended = True
            self._emit("SUSPEND", d.dom)
        return DaemonLive(self.machine, self.hv, job, d.state, self._time_words(), suspended)

    def _set_status(self, job: LiveJob, status: str) -> None:
        if job.status != status:
            job.status = status
            self._emit_job("MIGRATION", job, status=status)

    def _emit_job(self, event: str, job: LiveJob, **data: Any) -> None:
        """An event of a job's domain (none yet for an incoming one: domid null)."""
        if job.dom is not None:
            self._emit(event, job.dom, **data)
        else:
            self.server.emit(event, {"domid": None, "name": "", **data})

    def _tell_messages(self) -> None:
        """xl's lines the jobs said since the last turn, as MIGRATION_MESSAGE events."""
        for job in self.jobs:
            while job.messages:
                self._emit_job("MIGRATION_MESSAGE", job, text=job.messages.popleft())

    def _report(self, job: LiveJob) -> Callable[[MigrationInfo], None]:
        """The live loop's report as events: MIGRATION when the status
        changes, MIGRATION_PASS for each round sent (QEMU's, counted from 1),
        then MIGRATION_ROUND with query-migrate's fields. Called in the job's
        thread, which holds the machine; "completed" is told by the job's
        end (a migration's handshake is still to come)."""
        def report(info: MigrationInfo) -> None:
            job.info = info
            if info.status == "active" or info.status.startswith("postcopy-"):
                self._set_status(job, info.status)
            fresh = info.rounds[job.reported:]
            for r in fresh:
                self._emit_job("MIGRATION_PASS", job, **{"pass": r.iteration + 1})
            if fresh:
                job.reported = len(info.rounds)
                self._emit_job("MIGRATION_ROUND", job, **job.query_migrate(),
                               round=dataclasses.asdict(fresh[-1]))
        return report

    def _finish_jobs(self) -> None:
        """The loop's part of each job that is done: the domain's fate, the answer."""
        self._tell_messages()
        for job in [j for j in self.jobs if j.done]:
            self.jobs.remove(job)
            d = self.domains.get(job.dom.domid) if job.dom is not None else None
            if d is not None and d.live is job:
                d.live = None
            if job.thread is not None:
                job.thread.join()
            if job.finish is not None:
                job.finish(job)

    def _stop_jobs(self) -> None:
        """The daemon stops: every job is cancelled and waited for."""
        for job in self.jobs:
            job.cancel()
        for _ in range(STOP_TURNS):
            if not self.jobs:
                return
            self.machine.turn()
            self._finish_jobs()
            time.sleep(0.01)

    def _failed_job(self, d: DaemonDomain, job: LiveJob) -> str:
        """After a failed job: the guest resumed if it had suspended; what its fate is."""
        job.info.error = job.error
        self._set_status(job, "cancelled" if job.cancelled else "failed")
        dom = d.dom
        if dom.shutdown_reason == SHUTDOWN_suspend:
            resume_cancelled(self.hv, dom)
            self._emit("RESUME", dom)
            return "the guest runs on (its suspend hypercall returned 1)"
        if dom.shutdown_reason is None:
            return "the guest runs on" + (" (its suspend hypercall returned 1)"
                                          if job.suspended else "")
        return "the guest has shut down"

    def _save_live(self, d: DaemonDomain, path: Path, checkpoint: bool,
                   paused: bool) -> Deferred:
        """``xl save --live``: the pre-copy loop into the file while the daemon runs."""
        answer = Deferred()

        def work(job: LiveJob) -> MigrationInfo:
            def write(f: Any) -> MigrationInfo:
                self.machine.take()
                try:
                    out = livejob.wire(f, self.machine)
                    info = write_image_live(self.hv, d.dom, out, self._callbacks(d, job),
                                            PrecopyOptions(), report=self._report(job))
                    out.flush()
                    return info
                finally:
                    self.machine.give()
            # the file's flush to disk and its rename with the machine given back
            return livejob.unheld(self.machine, lambda: write_in_place(path, write))[0]

        def finish(job: LiveJob) -> None:
            if job.error:
                fate = self._failed_job(d, job)
                answer.fail(GENERIC, f"{job.error}; nothing was written, {fate}")
                return
            self._set_status(job, "completed")
            info: MigrationInfo = job.result
            answer.resolve({"file": str(path), "pages": sum(r.pages for r in info.rounds),
                            "bytes": path.stat().st_size, "rounds": len(info.rounds)})
            self._after_save(d, checkpoint, paused)
        self._start_job(d, "save", work, finish)
        return answer

    def _after_save(self, d: DaemonDomain, checkpoint: bool, paused: bool) -> None:
        """A saved domain is destroyed, or resumed (cancelled) for a checkpoint."""
        if not checkpoint:
            libxl.destroy_saved(self.hv, d.dom, lambda msg: log.info("%s", msg))
            self._forget(d)
            return
        resume_cancelled(self.hv, d.dom)
        if paused:
            libxl.pause(d.dom)
        self._emit("RESUME", d.dom)

    def cmd_migrate(self, args: dict[str, Any]) -> Deferred:
        """QEMU's migrate (``uri``: tcp:HOST:PORT or exec:COMMAND) run as xl's
        migrate_domain; answered once the target has the domain, or with why
        not (the guest then runs on here). ``postcopy`` (Otto's xl migrate
        --postcopy): switch to post-copy where the pre-copy policy stops;
        ``precopy-iterations``: at most that many rounds (0 with postcopy: a
        pure post-copy). With the postcopy-ram capability on, or
        ``postcopy``, migrate-start-postcopy switches at the next round.
        With ``resume`` (QEMU's resume=true) a paused post-copy goes on
        instead (``_resume``)."""
        if _flag(args, "resume"):
            return self._resume(args)
        d = self._movable(args)
        try:
            uri = migrateuri.check_uri(str(args["uri"]))
            opts = _precopy_options(args)
        except ValueError as e:
            raise QmpError(GENERIC, str(e)) from None
        answer = Deferred()

        def work(job: LiveJob) -> MigrateOutcome:
            wire = self._open_wire(job, uri)
            switch = (lambda: job.start_postcopy) if job.postcopy_ok else None
            return migrate_domain(self.hv, d.dom, self._held(wire.channel),
                                  self._callbacks(d, job), opts,
                                  report=self._report(job), say=job.say, switch=switch)
        self._start_job(d, "migrate", work, lambda job: self._migrated(d, job, answer),
                        postcopy_ok=opts.postcopy or self.capabilities[POSTCOPY_RAM])
        return answer

    def cmd_migrate_start_postcopy(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU's migrate-start-postcopy: the domain's migration switches to
        post-copy at its next round (the guest suspends then, and starts at
        the target). Harmless once the rounds are over, or the migration
        ended; an error if the capability was off when it started."""
        try:
            d = self.find(args)
            job = d.live if d.live is not None else self.last_job.get(d.dom.name)
        except QmpError:  # migrated away: its last job, by name
            job = self.last_job.get(str(args["domain"]))
            if job is None:
                raise
        if job is None or job.kind != "migrate":
            raise QmpError(GENERIC, "Postcopy must be started after migration has been "
                                    "started")
        if not job.postcopy_ok:
            raise QmpError(GENERIC, "Enable postcopy with migrate-set-capabilities "
                                    "(postcopy-ram) before the start of migration")
        job.start_postcopy = True
        return {}

    def cmd_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU's migrate-set-capabilities: [{"capability": NAME, "state": BOOL}];
        pvlab has one, postcopy-ram. Refused while a migration runs."""
        caps = args["capabilities"]
        new = dict(self.capabilities)
        for cap in caps:
            if not isinstance(cap, dict) or set(cap) != {"capability", "state"} \
                    or not isinstance(cap["state"], bool):
                raise QmpError(GENERIC, "each capability is {\"capability\": NAME, "
                                        "\"state\": true or false}")
            if cap["capability"] not in new:
                raise QmpError(GENERIC, f"capability {cap['capability']!r}: pvlab has "
                                        f"{', '.join(new)}")
            new[cap["capability"]] = cap["state"]
        if any(j.kind in ("migrate", "incoming") for j in self.jobs):
            raise QmpError(GENERIC, "There's a migration process in progress")
        self.capabilities = new
        return {}

    def _resume(self, args: dict[str, Any]) -> Deferred:
        """migrate resume=true: the domain's paused post-copy (its copy here
        suspended, its push state kept) resumed on a new connection to
        ``uri``: postcopy-recover-setup, postcopy-recover (the pages lost in
        flight sent again), postcopy-active, then completed as an
        uninterrupted one; a failure leaves it paused, resumable again."""
        d = self._not_moving(self.find(args))
        out = d.paused_postcopy
        if out is None:
            raise QmpError(GENERIC, f"domain {d.dom.name} has no paused post-copy migration "
                                    "to resume")
        try:
            uri = migrateuri.check_uri(str(args["uri"]))
        except ValueError as e:
            raise QmpError(GENERIC, str(e)) from None
        answer = Deferred()

        def work(job: LiveJob) -> MigrateOutcome:
            assert out.info is not None
            job.info = out.info
            wire = self._open_wire(job, uri)
            return resume_postcopy(self.hv, d.dom, out, self._held(wire.channel),
                                   self._report(job), job.say)

        def finish(job: LiveJob) -> None:
            if job.result is None:  # no connection: nothing changed
                self._set_status(job, "postcopy-paused")
                answer.fail(GENERIC, f"{job.error}; the post-copy of {d.dom.name} stays "
                                     "paused, resumable again")
                return
            self._migrated(d, job, answer)
        job = self._start_job(d, "migrate", work, finish)
        self.last_job[d.dom.name.removesuffix(POSTCOPY_INCONSISTENT)] = job
        return answer

    def _open_wire(self, job: LiveJob, uri: str) -> migrateuri.Wire:
        """A live job's connection to ``uri``, opened with the machine given
        back (a connect may wait); the job's cancel cuts it."""
        try:
            wire = livejob.unheld(self.machine, lambda: migrateuri.open_uri(uri, job.say))
        except OSError as e:
            raise OSError(f"cannot reach {uri}: {e.strerror or e}") from None
        job.on_cancel = wire.cut
        return wire

    def _held(self, ch: Channel) -> Channel:
        """The channel with the machine given back while it is read, written, closed."""
        m = self.machine
        closer = ch.closer
        return Channel(livejob.wire(ch.reader, m), livejob.wire(ch.writer, m), ch.rune,
                       (lambda wait: livejob.unheld(m, lambda: closer(wait)))
                       if closer is not None else None)

    def _migrated(self, d: DaemonDomain, job: LiveJob, answer: Deferred) -> None:
        """The source's end: gone (the target has it), running on, or kept
        suspended and renamed when the handshake failed after GO."""
        out: MigrateOutcome | None = job.result
        if out is not None and out.ok:
            self._set_status(job, "completed")
            answer.resolve({})
            self._forget(d)
            return
        if out is not None and out.undefined and out.postcopy is not None:
            d.parked, d.paused_postcopy = True, out  # QEMU's postcopy-paused: never resumed here
            self.last_job[d.dom.name] = job  # its new name asks after it too
            job.error = out.error.splitlines()[0]
            self._set_status(job, "postcopy-paused")
            answer.fail(GENERIC, f"{_cause(job.lines)}; the post-copy is paused, the domain "
                                 f"kept suspended here as {d.dom.name}: resume it with "
                                 f"pvlab migrate --resume {d.dom.domid} HOST:PORT")
            return
        if out is not None and out.undefined:
            d.parked = True   # neither resumed nor destroyed: a person decides (xl's way)
            job.error = out.error.splitlines()[0]
            job.info.error = out.error
            self._set_status(job, "failed")
            answer.fail(GENERIC, f"{_cause(out.lines)}; {job.error} the domain is kept "
                                 f"suspended here as {d.dom.name}: check both hosts")
            return
        if out is not None:
            job.error = f"{_cause(out.lines)}; {out.error.rstrip('.')}"
            if job.suspended and d.dom.shutdown_reason is None:
                self._emit("RESUME", d.dom)  # migrate_domain resumed it cancelled
        if job.info.postcopy and d.dom.shutdown_reason == SHUTDOWN_suspend:
            self._postcopy_failed(d, job, answer)
            return
        fate = self._failed_job(d, job)
        answer.fail(GENERIC, job.error if "runs on" in job.error else f"{job.error}; {fate}")

    def _postcopy_failed(self, d: DaemonDomain, job: LiveJob, answer: Deferred) -> None:
        """A failure after the switch that migrate_domain did not take: the
        guest may run at the target, so the copy here is kept suspended,
        never resumed (two running instances; Otto's xl)."""
        d.parked = True
        job.info.error = job.error
        self._set_status(job, "failed")
        answer.fail(GENERIC, f"{job.error}; the guest switched to post-copy, the domain is "
                             f"kept suspended here as {d.dom.name}: check both hosts")

    def cmd_remus(self, args: dict[str, Any]) -> Deferred:
        """xl remus (libxl_domain_remus_start) of a running domain to a
        backup at ``uri`` (tcp:HOST:PORT, or exec:... migrate-receive -r),
        an epoch every ``interval`` ms: a live job until the guest shuts
        down, ``migrate_cancel`` ends it cleanly, xl destroy ends the
        primary (the backup fails over) or the backup fails (the guest runs
        on here). The console gets an epoch's output once it has committed."""
        d = self._movable(args)
        interval = args.get("interval")
        if interval is not None and interval <= 0:
            raise QmpError(GENERIC, f"interval {interval}: a number of milliseconds, more "
                                    "than 0")
        try:
            uri = migrateuri.check_uri(str(args["uri"]))
        except ValueError as e:
            raise QmpError(GENERIC, str(e)) from None
        interval_ns = DEFAULT_INTERVAL_NS if interval is None else interval * 1_000_000
        answer = Deferred()

        def work(job: LiveJob) -> RemusOutcome:
            wire = self._open_wire(job, uri)
            ch = self._held(wire.channel)
            try:
                read_fixed_message(ch, MIGRATE_RECEIVER_BANNER, "banner")
                return self._replicate(d, job, ch, interval_ns)
            except MigrateError as e:
                raise OSError(str(e)) from None
            finally:
                ch.close(wait=job.cancelled)
        self._start_job(d, "remus", work, lambda job: self._remus_ended(d, job, answer))
        return answer

    def _movable(self, args: dict[str, Any]) -> DaemonDomain:
        """The domain of a migrate or remus: running, no other job on it."""
        d = self._not_moving(self.find(args))
        if d.save is not None or d.state.suspend is not None:
            raise QmpError(GENERIC, f"domain {d.dom.name} is being saved")
        if domctl.is_paused(d.dom) or d.dom.shutdown_reason is not None:
            raise QmpError(GENERIC, f"domain {d.dom.name} is not running: it cannot be "
                                    "migrated (unpause it first)")
        if self.incoming is not None and self.incoming[1].dom is d.dom:
            raise QmpError(GENERIC, f"domain {d.dom.name} is still taking its pages from "
                                    "its post-copy migration here: wait until that ends")
        return d

    def _replicate(self, d: DaemonDomain, job: LiveJob, ch: Channel,
                   interval_ns: int) -> RemusOutcome:
        """The job's thread: the console's output held per epoch while the
        primary's loop runs (remus.replicate), given straight again after."""
        ctx = domain_of(self.hv, d.dom)
        buffer = OutputBuffer(lambda _dom, data: d.console.output(data), d.dom, ch.writer)
        ctx.console_sink = buffer.hold

        def committed(epoch: int) -> None:
            self._emit("REMUS_CHECKPOINT", d.dom, epoch=epoch,
                       pages=job.info.rounds[-1].pages if job.info.rounds else 0)
        primary = DaemonRemus(self.machine, self.hv, job, d.state, self._time_words(), buffer,
                              ch.reader, interval_ns, committed)
        job.on_stop = primary.stop
        try:
            return replicate(self.hv, d.dom, ch.writer, ch.reader, primary, buffer,
                             say=job.say, report=self._report(job),
                             cancelled=lambda: job.cancelled)
        finally:
            ctx.console_sink = lambda _dom, data: d.console.output(data)

    def _remus_ended(self, d: DaemonDomain, job: LiveJob, answer: Deferred) -> None:
        """The primary's end (main_remus): destroyed, the backup failed (the
        guest runs on here), or the stream ended cleanly."""
        out: RemusOutcome | None = job.result
        epochs = out.epochs if out is not None else 0
        if d.destroying is not None:
            self._set_status(job, "cancelled")
            self._destroy(d)
            d.destroying.resolve({})
            answer.resolve({"epochs": epochs, "line": PRIMARY_DESTROYED})
            return
        if job.error or (out is not None and out.error):
            line = out.line if out is not None and out.line else BACKUP_FAILED
            why = job.error or (out.error if out is not None else "")
            job.error = f"{line} ({why})"
            answer.fail(GENERIC, f"{job.error}; {self._failed_job(d, job)}")
            return
        self._set_status(job, "completed")
        fate = ("the guest has shut down" if d.dom.shutdown_reason is not None
                else "the guest runs on here")
        answer.resolve({"epochs": epochs, "line": f"Remus ended after {epochs} epochs: the "
                                                  f"backup destroyed its copy; {fate}"})

    def cmd_migrate_incoming(self, args: dict[str, Any]) -> Deferred:
        """QEMU's migrate-incoming with ``uri`` fd:NAME (one descriptor both
        ways, a socket) or fd:IN,OUT (ssh's pipes), descriptors passed
        before with getfd: xl's migrate_receive into this machine. The
        answer: the domain's domid and name, and the receiver's lines.
        Descriptors rather than a port the daemon would listen on: xl's ssh
        way has no port, only the receiver's stdin and stdout, and so one
        mechanism serves both ways while the daemon never listens on the
        network (``pvlab migrate-receive --listen`` decides where)."""
        kind, _, names = str(args["uri"]).partition(":")
        fdnames = names.split(",")
        if kind != "fd" or not 1 <= len(fdnames) <= 2 or not all(fdnames):
            raise QmpError(GENERIC, f"uri {args['uri']!r}: give fd:NAME or fd:IN,OUT, "
                                    "descriptors passed with getfd")
        fds: list[int] = []
        try:
            for n in fdnames:
                fds.append(self.server.take_fd(n))
        except QmpError:
            for fd in fds:
                os.close(fd)
            raise
        reader = os.fdopen(fds[0], "rb")
        writer = os.fdopen(fds[-1] if len(fds) == 2 else os.dup(fds[0]), "wb")
        ch = Channel(reader, writer)
        answer = Deferred()
        paused = _flag(args, "paused")
        refuse = self._refuse_postcopy(args)

        def work(job: LiveJob) -> Received:
            job.on_cancel = lambda: _shut_socket(fds[0])
            # the job reads the stream through wrappers; a post-copy's pager
            # works from the loop, on the channel itself
            return migrate_receive(self._held(ch), hv=self.hv, clock=self.clock,
                                   paused=paused, say=job.say,
                                   started=lambda got: self._adopt(got.dom, None),
                                   refuse_postcopy=refuse, loop_channel=ch)
        self._start_job(None, "incoming", work, lambda job: self._received(job, ch, answer),
                        postcopy_ok=not refuse)
        return answer

    def _refuse_postcopy(self, args: dict[str, Any]) -> str:
        """Why an incoming migration may not switch to post-copy, or "": the
        machine has one pager (its absent frames' handler), so one post-copy
        comes in at a time, a paused one included (its resume would find
        another pager); ``postcopy`` false refuses it too."""
        if not _flag(args, "postcopy", True):
            return "the target does not take post-copy (migrate-incoming postcopy false)"
        if self.incoming is not None or self.paused_incoming is not None or \
                any(j.kind == "incoming" and j.postcopy_ok for j in self.jobs):
            return "the target's daemon takes one post-copy migration at a time"
        return ""

    def _received(self, job: LiveJob, ch: Channel, answer: Deferred) -> None:
        """The target's end: the domain (adopted, its console socket made,
        before the report told the sender), or why not. A post-copy's
        domain runs already while its pages come (_postcopy_started)."""
        lines = job.lines
        got: Received | None = job.result
        if got is not None and got.postcopy is not None:
            self._postcopy_started(job, got, ch, answer)
            return
        ch.close()
        if job.error or got is None:
            self._set_status(job, "failed")
            answer.fail(GENERIC, job.error)
            return
        job.dom = got.dom
        self.last_job[got.dom.name] = job
        self._set_status(job, "completed")
        answer.resolve({"domid": got.dom.domid, "name": got.dom.name, "lines": lines})

    def _postcopy_started(self, job: LiveJob, got: Received, ch: Channel,
                          answer: Deferred) -> None:
        """A post-copy's domain runs here, NAME--incoming, while its pages
        come: the pager reads them on this loop (between slices, and when the
        connection is readable), and a fault waits for its page on the loop,
        so every domain of the daemon waits meanwhile. Once the last page is
        in the domain is renamed NAME and the job completed."""
        pager = got.postcopy
        assert pager is not None
        job.dom = got.dom
        self.last_job[got.dom.name] = job
        self.last_job[got.dom.name.removesuffix(INCOMING)] = job
        self.incoming = (job, pager)
        self._adopt(got.dom, None)
        self.server.watch(ch.reader, self._poll_pager)
        done = pager.on_complete

        def complete(p: Pager) -> None:
            self.server.unwatch(p.link.reader)  # a recovered post-copy's is a new one
            self.incoming = None
            if done is not None:
                done(p)  # the sender's word, the rename, the channel closed
            self.last_job[p.dom.name] = job
            self._incoming_info(job, p)
        pager.on_complete = complete
        self._incoming_info(job, pager)
        answer.resolve({"domid": got.dom.domid, "name": got.dom.name, "lines": job.lines,
                        "postcopy": True})

    def _poll_pager(self) -> None:
        """The post-copy's connection is readable: its pages loaded now
        (the guest may be idle, and no slice would), a few records at a
        time so that the loop's guests run between."""
        if self.incoming is None:
            return
        job, pager = self.incoming
        pager.poll(POLL_RECORDS)
        self._incoming_info(job, pager)

    def _incoming_info(self, job: LiveJob, pager: Pager) -> None:
        """The destination's MigrationInfo from its pager (QEMU's destination
        answers query-migrate too), and its status as events."""
        info = job.info
        info.postcopy = True
        info.total = int(pager.p2m.size) * PAGE_SIZE
        info.remaining = pager.left * PAGE_SIZE
        info.postcopy_requests = pager.requests
        info.postcopy_faulted, info.postcopy_pushed = pager.faulted, pager.pushed
        info.postcopy_bytes = info.transferred = pager.link.offset
        info.postcopy_blocktime_ns = pager.blocked_ns
        if pager.paused:
            info.error = pager.why
            if self.incoming is not None and self.incoming[1] is pager:
                self.server.unwatch(pager.link.reader)  # its end stays readable
                self.incoming, self.paused_incoming = None, (job, pager)
        status = "postcopy-paused" if pager.paused else \
            "completed" if pager.done else "postcopy-active"
        info.status = status
        self._set_status(job, status)

    def cmd_migrate_recover(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU's migrate-recover, for the domain of a post-copy coming in
        that a drop paused: ``uri`` fd:NAME, the connection the source's
        resume came on (``pvlab migrate-recover`` accepts it and passes it
        with getfd: the daemon never listens on the network). The resume's
        handshake here (the source sends its POSTCOPY_RESUME at once after
        the banner: RESUME_HANDSHAKE_S at most), then the pager takes the
        connection and its domain runs on."""
        d = self.find(args)
        paused = self.paused_incoming
        if paused is None or paused[1].dom is not d.dom or not paused[1].paused:
            raise QmpError(GENERIC, f"domain {d.dom.name} has no paused post-copy coming in")
        kind, _, name = str(args["uri"]).partition(":")
        if kind != "fd" or not name or "," in name:
            raise QmpError(GENERIC, f"uri {args['uri']!r}: give fd:NAME, a connection passed "
                                    "with getfd")
        fd = self.server.take_fd(name)
        job, pager = paused
        ch = Channel(os.fdopen(fd, "rb"), os.fdopen(os.dup(fd), "wb"))
        try:
            link = receive_resume(ch, pager, job.say, lambda: bool(
                select.select([fd], [], [], RESUME_HANDSHAKE_S)[0]))
            pager.replace_link(link)
        except (MigrateError, Dropped) as e:
            ch.close(wait=False)
            raise QmpError(GENERIC, f"{e}; domain {d.dom.name} stays paused") from None
        self.paused_incoming, self.incoming = None, (job, pager)
        self.server.watch(ch.reader, self._poll_pager)
        self._incoming_info(job, pager)
        self._tell_messages()
        return {"line": f"domain {d.dom.name}: post-copy resumed, {pager.left} pages still "
                        "to come"}

    def cmd_migrate_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU's migrate_cancel, for a domain's live save or migration: its
        wire cut, it fails, and the guest runs on (resumed cancelled if it
        had suspended); its own answer says so. Cut after the permission to
        start was sent, it is xl's undefined case (the domain kept here,
        suspended, for a person to check both hosts)."""
        d = self.find(args)
        if d.live is None:
            raise QmpError(GENERIC, f"domain {d.dom.name} is not being saved live or "
                                    "migrated")
        self._set_status(d.live, "cancelling")
        if d.live.on_stop is not None:
            d.live.on_stop()
        else:
            d.live.cancel()
        return {}

    def cmd_query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU's query-migrate for a domain's current or last live job (by
        name: a domain migrated away is gone), or the last of all; {} if none."""
        which = args.get("domain")
        if which is not None and not isinstance(which, str):
            which = self.find(args).dom.name
        job = self.last_job.get("" if which is None else str(which))
        return {} if job is None else job.query_migrate()

    # --- commands ----------------------------------------------------------------------

    def _commands(self) -> dict[str, tuple[Callable[[dict[str, Any]], Any],
                                           dict[str, Param]]]:
        """Each command's handler and arguments (the server checks their types)."""
        dom, path, flag = Param((str, int)), Param((str,)), Param((bool,), required=False)
        kib = {"domain": dom, "kib": Param((int,))}
        return {
            "query-version": (lambda _a: self.version, {}),
            "domain-create": (self.cmd_create, {"config": path, "paused": flag}),
            "domain-list": (lambda _a: libxl.domain_list(self.hv), {}),
            "domain-info": (lambda a: libxl.domain_info(self.hv, self.find(a).dom),
                            {"domain": dom}),
            "domain-pause": (self.cmd_pause, {"domain": dom}),
            "domain-unpause": (self.cmd_unpause, {"domain": dom}),
            "domain-destroy": (self.cmd_destroy, {"domain": dom}),
            "domain-shutdown": (self.cmd_shutdown,
                                {"domain": dom, "reason": Param((str,), required=False)}),
            "domain-save": (self.cmd_save, {"domain": dom, "file": path, "checkpoint": flag,
                                            "paused": flag, "live": flag}),
            "query-migrate": (self.cmd_query_migrate, {"domain": Param((str, int), False)}),
            "migrate": (self.cmd_migrate, {"domain": dom, "uri": path, "postcopy": flag,
                                           "precopy-iterations": Param((int,), False),
                                           "resume": flag}),
            "migrate-recover": (self.cmd_migrate_recover, {"domain": dom, "uri": path}),
            "migrate-incoming": (self.cmd_migrate_incoming, {"uri": path, "paused": flag,
                                                             "postcopy": flag}),
            "migrate_cancel": (self.cmd_migrate_cancel, {"domain": dom}),
            "migrate-start-postcopy": (self.cmd_migrate_start_postcopy, {"domain": dom}),
            "migrate-set-capabilities": (self.cmd_set_capabilities,
                                         {"capabilities": Param((list,))}),
            "query-migrate-capabilities": (
                lambda _a: [{"capability": k, "state": v} for k, v in self.capabilities.items()],
                {}),
            "remus": (self.cmd_remus, {"domain": dom, "uri": path,
                                       "interval": Param((int,), required=False)}),
            "domain-restore": (self.cmd_restore, {"file": path, "paused": flag}),
            "domain-mem-set": (self.cmd_mem_set, kib),
            "domain-mem-max": (self.cmd_mem_max, kib),
            "domain-vcpu-list": (self.cmd_vcpu_list, {"domain": Param((str, int), False)}),
            "domain-console": (self.cmd_console,
                               {"domain": dom, "port": Param((str,), required=False)}),
            "host-info": (lambda _a: libxl.host_info(self.hv), {}),
            "host-dmesg": (self.cmd_dmesg, {"clear": flag}),
            "quit": (self.cmd_quit, {}),
        }

    def cmd_console(self, args: dict[str, Any]) -> dict[str, Any]:
        """The socket of the domain's Xen console, or with ``port`` of that
        virtio-console port (a port whose host end is a socket)."""
        d = self.find(args)
        name = args.get("port")
        if name is None:
            return {"path": str(d.console.path)}
        ports = domctl.console_ports(d.dom)
        port = next((p for p in ports if p["name"] == name), None)
        if port is None:
            known = ", ".join(p["name"] for p in ports) or "none"
            raise QmpError(GENERIC, f"domain {d.dom.name} has no console port {name!r} "
                                      f"(its ports: {known})")
        if port["connection"] != "socket":
            raise QmpError(GENERIC, f"console port {name!r} of domain {d.dom.name} goes to "
                                    f"a {port['connection']} ({port['path']}), not a socket")
        return {"path": port["path"], "port": port}

    def cmd_create(self, args: dict[str, Any]) -> dict[str, Any]:
        config = _path_arg(args, "config")
        try:
            d = self._create(load_config(config), paused=_flag(args, "paused"))
        except _CREATE_ERRORS as e:
            raise QmpError(GENERIC, str(e)) from None
        return {"domid": d.dom.domid, "name": d.dom.name}

    def cmd_restore(self, args: dict[str, Any]) -> dict[str, Any]:
        path = _path_arg(args, "file")
        paused = _flag(args, "paused")
        try:
            dom = libxl.restore_domain(self.hv, path, paused=paused)
        except _CREATE_ERRORS as e:
            raise QmpError(GENERIC, str(e)) from None
        try:
            self._adopt(dom, None)
        except OSError as e:
            libxl.destroy_domain(self.hv, dom)
            raise QmpError(GENERIC, f"the console socket: {e}") from None
        return {"domid": dom.domid, "name": dom.name}

    def cmd_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        libxl.pause(self._not_moving(self.find(args)).dom)
        return {}

    def cmd_unpause(self, args: dict[str, Any]) -> dict[str, Any]:
        libxl.unpause(self._not_moving(self.find(args)).dom)
        return {}

    def cmd_destroy(self, args: dict[str, Any]) -> dict[str, Any] | Deferred:
        """xl destroy; of a Remus primary, its wire cut first (the backup
        fails over, as xl's "to force failover"), answered when it is gone."""
        d = self.find(args)
        if d.live is not None and d.live.kind == "remus":
            d.destroying = d.destroying or Deferred()
            d.live.cancel()
            return d.destroying
        self._destroy(self._not_moving(d))
        return {}

    def cmd_shutdown(self, args: dict[str, Any]) -> dict[str, Any]:
        d = self._not_moving(self.find(args))
        reason = args.get("reason", "poweroff")
        if reason not in ("poweroff", "reboot"):
            raise QmpError(GENERIC, f"reason {reason!r}: poweroff or reboot")
        libxl.make_request(self.hv, d.dom, d.state, Request(self.now(), command=reason))
        return {}

    def cmd_save(self, args: dict[str, Any]) -> Deferred:
        d = self._not_moving(self.find(args))
        path = _path_arg(args, "file")
        if path.is_dir() or not path.parent.is_dir():
            raise QmpError(GENERIC, f"{path}: not a file in an existing directory")
        if d.save is not None or d.state.suspend is not None:
            raise QmpError(GENERIC, f"domain {d.dom.name} is being saved already")
        if domctl.is_paused(d.dom):
            raise QmpError(GENERIC, f"domain {d.dom.name} is paused: it cannot suspend; "
                                    "unpause it first")
        checkpoint = _flag(args, "checkpoint")
        if _flag(args, "live"):
            return self._save_live(d, path, checkpoint, _flag(args, "paused"))
        now = self.now()
        answer = Deferred()
        d.state.suspend = libxl.SuspendJob(path=path, checkpoint=checkpoint)
        d.save = SaveInFlight(answer, path, checkpoint, _flag(args, "paused"),
                              now + libxl.SUSPEND_TIMEOUT_NS)
        libxl.make_request(self.hv, d.dom, d.state, Request(now, command="suspend"))
        return answer

    def cmd_mem_set(self, args: dict[str, Any]) -> dict[str, Any]:
        d = self.find(args)
        try:
            libxl.mem_set(self.hv, d.dom, _int_arg(args, "kib"))
        except libxl.LibxlError as e:
            raise QmpError(GENERIC, str(e)) from None
        self._check_balloon(d)
        return {}

    def cmd_mem_max(self, args: dict[str, Any]) -> dict[str, Any]:
        d = self.find(args)
        try:
            libxl.mem_max(self.hv, d.dom, _int_arg(args, "kib"))
        except libxl.LibxlError as e:
            raise QmpError(GENERIC, str(e)) from None
        return {}

    def cmd_vcpu_list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        dom = self.find(args).dom if args.get("domain") is not None else None
        return libxl.vcpu_list(self.hv, dom)

    def cmd_dmesg(self, args: dict[str, Any]) -> dict[str, Any]:
        text = "".join(f"{line}\n" for line in self.dmesg.lines)
        if _flag(args, "clear"):
            self.dmesg.lines.clear()
        return {"text": text}

    def cmd_quit(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.stopping = True
        return {}


def _shut_socket(fd: int) -> None:
    """End a wait on ``fd`` from another thread, if it is a socket (a pipe's
    end comes when its writer, the sender, goes)."""
    copy = os.dup(fd)
    try:
        sock = socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()


def _cause(lines: list[str]) -> str:
    """Why a migration failed: xl's line before its first "Migration failed"
    (the resume's own step passed over)."""
    said = [x for x in lines if not x.endswith("Trying to resume at our end.")]
    for i, line in enumerate(said):
        if line.startswith(("Migration failed", "** Migration failed")):
            return said[i - 1] if i else line
    return said[-1] if said else "the migration failed"


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("pvlab")
    except Exception:  # not installed: a source tree
        return "0"


def _flag(args: dict[str, Any], name: str, default: bool = False) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise QmpError(GENERIC, f"'{name}' must be true or false")
    return value


def _precopy_options(args: dict[str, Any]) -> PrecopyOptions:
    """migrate's ``postcopy`` and ``precopy-iterations``; ValueError if bad."""
    postcopy = _flag(args, "postcopy")
    rounds = args.get("precopy-iterations")
    if rounds is None:
        return PrecopyOptions(postcopy=postcopy)
    if rounds < 0 or (rounds == 0 and not postcopy):
        raise ValueError(f"precopy-iterations {rounds}: 1 or more (0 only with postcopy)")
    return PrecopyOptions(max_iterations=rounds, postcopy=postcopy)


def _int_arg(args: dict[str, Any], name: str) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise QmpError(GENERIC, f"'{name}' must be a whole number, 0 or more")
    return value


def _path_arg(args: dict[str, Any], name: str) -> Path:
    value = args.get(name)
    if not isinstance(value, str) or not os.path.isabs(value):
        raise QmpError(GENERIC, f"'{name}' must be an absolute path")
    return Path(value)


# --- the command line ------------------------------------------------------------------

def add_parser(sub: Any) -> None:
    """``pvlab daemon [stop|status]``."""
    p = sub.add_parser("daemon", help="run the host daemon that xl's verbs talk to",
                       description="Run one machine with any number of domains, driven by "
                                   "`pvlab xl VERB` over a Unix socket (QMP's shape, "
                                   "docs/protocol.md). `pvlab daemon stop` stops it (its "
                                   "domains with it); `pvlab daemon status` says whether "
                                   "one runs.")
    p.add_argument("action", nargs="?", choices=("start", "stop", "status"), default="start",
                   help="start (the default), stop or status")
    p.add_argument("--socket", metavar="PATH", default=None,
                   help="the socket (default $XDG_RUNTIME_DIR/pvlab/pvlab.sock, else "
                        "/tmp/pvlab-UID/pvlab.sock)")
    p.add_argument("--detach", action="store_true",
                   help="run in the background once the socket listens")
    p.add_argument("--pidfile", metavar="PATH", default=None,
                   help="with --detach: where to write the pid (default pvlab.pid beside "
                        "the socket)")
    p.add_argument("--clock", choices=domctl.CLOCKS, default="fast",
                   help="fast (host time, the default) or deterministic (instructions)")
    p.add_argument("--memory", metavar="MIB", type=int, default=DEFAULT_MEMORY_MIB,
                   help=f"the machine's memory in MiB (default {DEFAULT_MEMORY_MIB})")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from hypervisor.toolstack.qmp import default_socket
    sock = Path(args.socket) if args.socket else default_socket()
    if args.action == "stop":
        return _stop(sock)
    if args.action == "status":
        return _status(sock)
    if not 64 <= args.memory <= 65536:
        print(f"pvlab: --memory {args.memory}: give 64 to 65536 MiB", file=sys.stderr)
        return 2
    if _answers(sock):
        print(f"pvlab: a daemon already listens at {sock}", file=sys.stderr)
        return 2
    pidfile = Path(args.pidfile) if args.pidfile else sock.parent / "pvlab.pid"
    if args.detach:
        return _detach(sock, pidfile, args)
    return _run(sock, args, None)


def _answers(sock: Path) -> bool:
    from hypervisor.toolstack.qmp import Client, DaemonNotRunning
    try:
        Client(sock, timeout=5.0).close()
    except (DaemonNotRunning, OSError):
        return False
    return True


def _run(sock: Path, args: argparse.Namespace, ready: Callable[[str], None] | None,
         pidfile: Path | None = None) -> int:
    """The daemon in this process; ``ready`` is told "" once it listens, or the error."""
    try:
        daemon = Daemon(sock, clock=args.clock, memory_mib=args.memory)
    except (OSError, ValueError) as e:
        msg = f"cannot listen at {sock}: {e}"
        if ready is not None:
            ready(msg)
        print(f"pvlab: {msg}", file=sys.stderr)
        return 2
    if pidfile is not None:
        pidfile.write_text(f"{os.getpid()}\n")
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: daemon.stop())
    wake = os.fdopen(wake_r, "rb", buffering=0)
    daemon.server.watch(wake, lambda: os.read(wake_r, 512))
    if ready is not None:
        ready("")
    else:
        print(f"pvlab: daemon listening at {sock} ({args.clock} clock, {args.memory} MiB); "
              "`pvlab daemon stop` or Ctrl-C stops it", file=sys.stderr)
    try:
        daemon.serve()
    finally:
        signal.set_wakeup_fd(-1)
        wake.close()
        os.close(wake_w)
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)
    return 0


def _detach(sock: Path, pidfile: Path, args: argparse.Namespace) -> int:
    """Fork; the child leaves the session and runs the daemon; the parent
    returns once the socket listens, or with the child's error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode(errors="replace")
        os.waitpid(pid, 0)
        if msg != "ok":
            print(f"pvlab: {msg or 'the daemon did not start'}", file=sys.stderr)
            return 2
        print(f"pvlab: daemon listening at {sock}, pid in {pidfile}")
        return 0
    os.close(r)
    os.setsid()
    if os.fork():
        os._exit(0)  # the grandchild is adopted by init: no zombie, no terminal

    def ready(msg: str) -> None:
        os.write(w, (msg or "ok").encode())
        os.close(w)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    code = 1
    try:
        code = _run(sock, args, ready, pidfile)
    finally:
        os._exit(code)


def _connect(sock: Path) -> Client | None:
    """A client of the daemon at ``sock``; None, said in one line, if none runs."""
    try:
        return Client(sock)
    except DaemonNotRunning as e:
        print(f"pvlab: {e}", file=sys.stderr)
        return None


def _stop(sock: Path) -> int:
    client = _connect(sock)
    if client is None:
        return 1
    try:
        client.execute("quit")
    except (QmpError, OSError) as e:
        print(f"pvlab: quit: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    for _ in range(100):  # the daemon destroys its domains, then removes its socket
        if not sock.exists():
            break
        time.sleep(0.05)
    print(f"pvlab: the daemon at {sock} stopped")
    return 0


def _status(sock: Path) -> int:
    client = _connect(sock)
    if client is None:
        return 1
    try:
        rows = client.execute("domain-list")
        info = client.execute("host-info")
    finally:
        client.close()
    print(f"pvlab daemon at {sock}: {len(rows)} domain(s), {info['free_memory']} of "
          f"{info['total_memory']} MiB free, {info['clock']} clock")
    return 0
