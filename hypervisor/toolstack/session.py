"""Booting a domain from a configuration and running it: what ``pvlab run``
does, as a function the tests and tools call too."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.sched import SHUTDOWN_suspend
from hypervisor.toolstack import libxl
from hypervisor.toolstack.builder import build_domain, machine_mib_for
from hypervisor.toolstack.checkpoint import CheckpointWriter, SaveOutcome
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.context import domain_of
from hypervisor.toolstack.control import (
    MIGRATE,
    REMUS,
    SAVE,
    SAVE_LIVE,
    TYPE,
    Request,
    console_bytes,
    resume_cancelled,
    type_on_console,
)
from hypervisor.toolstack.migrate import Channel, MigrateOutcome, migrate_domain
from hypervisor.toolstack.precopy import MigrationInfo, PrecopyOptions
from hypervisor.toolstack.save import Progress, SaveError, SaveStats, save_live_to_file
from hypervisor.toolstack.timeparse import format_duration

log = logging.getLogger(__name__)

CONSOLE_POLL_NS = 20_000_000  # with a console attached, its input is looked at this often
CONSOLE_WAIT_S = 0.05  # how long to wait for input while the guest can do nothing


class ConsoleInput(Protocol):
    """Where a person's input comes from (console.ConsoleClient): ``detached``
    once they left, ``closed`` once no more input can come."""

    detached: bool
    closed: bool

    def poll(self, timeout_s: float = 0.0) -> bytes: ...


@dataclass
class Observer:
    """Something that looks at the machine every ``every_ns`` of virtual time
    while a run goes on (the samples of ``pvlab plot balloon``): the run
    stops there, which changes none of the scheduler's choices."""

    every_ns: int
    look: Callable[[int], None]
    first_ns: int = 0  # the first look, if not at every_ns

    def first(self) -> int:
        return self.first_ns or self.every_ns


@dataclass
class RunResult:
    domain: Domain
    console: bytes
    reason: str           # "poweroff", "crash", ..., "running" (time limit), "hung"
    #                       (no progress possible: scheduler.py's rule, not Xen's) or
    #                       "detached" (the person at the console left: Ctrl-])
    virtual_ns: int
    notes: list[str] = field(default_factory=list)  # the toolstack's messages
    # a shutdown command the guest did not acknowledge in time ("" if none)
    unacknowledged: str = ""
    checkpoints: list[SaveOutcome] = field(default_factory=list)
    why: str = ""         # for "hung": why nothing could run any more, in one line

    @property
    def ok(self) -> bool:
        return self.reason in ("poweroff", "running", "detached")


def boot(cfg: DomainConfig, seed: int | None = None, clock: str = "deterministic",
         slice_insns: int = 50_000, sched_seed: int | None = None) -> tuple[Hypervisor, Domain]:
    """A machine for ``cfg`` with its domain built. ``seed`` (default the
    configuration's) shuffles the frames and, unless ``sched_seed`` (default
    the configuration's, else the seed) is given, drives the schedule."""
    seed = cfg.seed if seed is None else seed
    sched_seed = cfg.sched_seed if sched_seed is None else sched_seed
    hv = Hypervisor(machine_mib_for(max(cfg.memory, cfg.maxmem)), seed=seed, clock=clock,
                    slice_insns=slice_insns, sched_seed=sched_seed)
    dom = build_domain(hv, cfg)
    return hv, dom


class _Run:
    """The state of one run_domain: the requests still to make, the
    acknowledgement awaited, the checkpoints asked for, what was said."""

    def __init__(self, hv: Hypervisor, dom: Domain, requests: Sequence[Request],
                 note: Callable[[str], None] | None, writer: CheckpointWriter | None,
                 checkpoint_dir: str | Path | None, observer: Observer | None = None) -> None:
        self.hv, self.dom, self.note = hv, dom, note
        self.observer = observer
        self.next_look = observer.first() if observer is not None else None
        self.pending = sorted(requests, key=lambda r: r.at_ns)
        # the requests in flight; a checkpoint request's suspend is a job there:
        # two made before the guest suspends are one write of control/shutdown,
        # so one checkpoint
        self.state = libxl.DomainState()
        self.notes: list[str] = []
        self.writer = writer
        self.checkpoint_dir = checkpoint_dir
        self.scratch: tempfile.TemporaryDirectory[str] | None = None
        self.detached = False

    def say(self, msg: str) -> None:
        self.notes.append(msg)
        log.info("%s", msg)
        if self.note is not None:
            self.note(msg)

    def checkpoint_writer(self) -> CheckpointWriter:
        """The run's writer; by default into a temporary directory, made at the
        first checkpoint and gone when the run ends."""
        if self.writer is None:
            if self.checkpoint_dir is not None:
                self.writer = CheckpointWriter(Path(self.checkpoint_dir))
            else:
                self.scratch = tempfile.TemporaryDirectory(prefix="pvlab-checkpoints-")
                self.writer = CheckpointWriter(Path(self.scratch.name), show_directory=False)
        return self.writer

    def next_limit(self, until_ns: int | None) -> int | None:
        marks = [self.pending[0].at_ns] if self.pending else []
        if self.state.ack_deadline is not None:
            marks.append(self.state.ack_deadline)
        if until_ns is not None:
            marks.append(until_ns)
        if self.next_look is not None:
            marks.append(self.next_look)
        return min(marks) if marks else None

    def look(self, limit: int) -> None:
        """Hand the observer the machine at each of its times reached by ``limit``."""
        if self.observer is None or self.next_look is None:
            return
        while self.next_look <= limit:
            self.observer.look(self.next_look)
            self.next_look += self.observer.every_ns

    def suspended(self, on_suspend: Callable[[Domain], bool] | None) -> bool:
        """The domain suspended: hand it to on_suspend, or do what the suspend
        was for (libxl.complete_suspend: a checkpoint, or nothing, and it is
        resumed cancelled). False if the run ends here."""
        dom = self.dom
        if on_suspend is None:
            done = libxl.complete_suspend(self.hv, dom, self.state)
            self.say(done.line)
            return done.runs_on
        if not on_suspend(dom):
            return False
        self.say(f"domain {dom.name} resumed: the suspend hypercall returns 1")
        resume_cancelled(self.hv, dom)
        self.state.ack_deadline = None
        return True

    def make_requests(self, limit: int) -> None:
        """Make the requests due by ``limit``; give up on an unacknowledged one."""
        while self.pending and self.pending[0].at_ns <= limit:
            req = self.pending.pop(0)
            self.say(f"at {format_duration(req.at_ns)}: {_describe(req)}")
            msg = libxl.make_request(self.hv, self.dom, self.state, req)
            if msg:
                self.say(msg)
            if req.command == "checkpoint":
                self.state.suspend = libxl.SuspendJob(writer=self.checkpoint_writer())
        waiting = libxl.check_acknowledged(self.hv, self.dom, self.state, limit)
        if waiting:
            self.say(f"guest didn't acknowledge {waiting}, cancelling request")

    def say_not_made(self, reason: str) -> None:
        """Requests timed after the guest shut down are said, never silently lost."""
        t = format_duration(max(domctl.vcpu_clocks(self.dom), default=0))
        whats = "; ".join(f"at {format_duration(r.at_ns)}: {_describe(r)}" for r in self.pending)
        self.say(f"the guest shut down ({reason}) at {t}; {len(self.pending)} request(s) "
                 f"not made: {whats}")

    def poll_console(self, console: ConsoleInput) -> bool:
        """Pass on what was typed; False if the person detached. While the
        guest can do nothing (hung, or blocked with no timer) wait a little
        for input instead of spinning."""
        wait = CONSOLE_WAIT_S if domctl.no_progress(self.hv) else 0.0
        data = console.poll(wait)
        if data:
            type_on_console(self.hv, self.dom, data)
        return not console.detached

    def result(self, until_ns: int | None) -> RunResult:
        dom = self.dom
        why = ""
        if self.detached:
            reason = "detached"
        elif dom.shutdown_reason is not None:
            reason = domctl.shutdown_name(dom.shutdown_reason)
            if self.pending and dom.shutdown_reason != SHUTDOWN_suspend:
                self.say_not_made(reason)
        elif until_ns is not None and domctl.reached(dom, until_ns):
            reason = "running"  # each VCPU reached the time, or sleeps until a timer
        else:
            reason = "hung"
            why = domctl.no_progress(self.hv) or "no VCPU is online"
        t = max(domctl.vcpu_clocks(dom), default=0)
        checkpoints = list(self.writer.outcomes) if self.writer is not None else []
        return RunResult(dom, bytes(dom.console_out), reason, t, self.notes,
                         self.state.unacknowledged, checkpoints, why)

    def waits_for_toolstack(self) -> bool:
        """A request or an acknowledgement deadline is still to come: a guest
        that cannot run until then is waiting, not hung."""
        return bool(self.pending) or self.state.ack_deadline is not None


def run_domain(hv: Hypervisor, dom: Domain, until_ns: int | None = None,
               sink: Callable[[Domain, bytes], None] | None = None,
               requests: Sequence[Request] = (),
               note: Callable[[str], None] | None = None,
               on_suspend: Callable[[Domain], bool] | None = None,
               checkpoint_dir: str | Path | None = None,
               checkpoints: CheckpointWriter | None = None,
               observer: Observer | None = None,
               console: ConsoleInput | None = None) -> RunResult:
    """Run until the domain shuts down, hangs, or (with until_ns) every VCPU
    reaches that virtual time. ``requests`` are made at their times; what is
    typed at ``console`` goes to the guest's console as it comes, and the
    run ends when the person detaches (it does not hang meanwhile). A domain
    that suspends is handed to ``on_suspend`` (which saves it, say): if that
    returns True, or there is none, the domain is resumed cancelled and runs
    on; if False, the run ends there. A suspend that a ``checkpoint`` request
    asked for is written by ``checkpoints`` (by default a writer into
    ``checkpoint_dir``, or a temporary directory gone when the run ends) and
    the domain runs on. ``note`` gets the toolstack's messages; ``observer``
    looks at the machine at its times."""
    domain_of(hv, dom).console_sink = sink
    run = _Run(hv, dom, requests, note, checkpoints, checkpoint_dir, observer)
    try:
        while True:
            limit = run.next_limit(until_ns)
            if console is not None:
                limit = _console_limit(hv, limit)
            domctl.run(hv, limit)
            if dom.shutdown_reason == SHUTDOWN_suspend:
                if not run.suspended(on_suspend):
                    break
                continue
            if dom.shutdown_reason is not None or limit is None:
                break
            if console is not None and not run.poll_console(console):
                run.detached = True
                break
            if not domctl.reached(dom, limit):
                typing = console is not None and not (console.closed
                                                      and domctl.no_progress(hv))
                if not run.waits_for_toolstack() and not typing:
                    break
                domctl.idle_until(hv, limit)  # nothing runs before the next request
            run.look(limit)
            run.make_requests(limit)
            if until_ns is not None and limit >= until_ns:
                break
        return run.result(until_ns)
    finally:
        if run.scratch is not None:
            run.scratch.cleanup()


def run_to_parting(hv: Hypervisor, dom: Domain, at_ns: int, requests: Sequence[Request],
                   sink: Callable[[Domain, bytes], None] | None = None,
                   note: Callable[[str], None] | None = None) -> list[Request]:
    """The start that runs parting at ``at_ns`` share (``pvlab explore
    --fork-at``, ``pvlab run --sched-from``): run to ``at_ns``, making the
    requests due by then, and return the others, for the rest of the run.
    None due by then may suspend, shut down, save or migrate the domain: it
    would still be under way where the runs part (ValueError)."""
    check_parting(requests, at_ns)
    run_domain(hv, dom, at_ns, sink, [r for r in requests if r.at_ns <= at_ns], note)
    return [r for r in requests if r.at_ns > at_ns]


def check_parting(requests: Sequence[Request], at_ns: int) -> None:
    """ValueError if a request due by ``at_ns`` suspends, shuts down, saves
    or migrates the domain (run_to_parting's rule)."""
    busy = [r for r in requests if r.at_ns <= at_ns
            and (r.shutdown or r.command in (SAVE, SAVE_LIVE, MIGRATE, REMUS))]
    if busy:
        raise ValueError(f"the request at {format_duration(busy[0].at_ns)} "
                         f"({_describe(busy[0])}) comes before the runs part at "
                         f"{format_duration(at_ns)}: part them before any suspend, "
                         "shutdown or save")


def _console_limit(hv: Hypervisor, limit: int | None) -> int:
    """The next time to look at the console's input: CONSOLE_POLL_NS from
    now, or sooner if a request comes sooner."""
    poll = domctl.system_time(hv) + CONSOLE_POLL_NS
    return poll if limit is None else min(limit, poll)


def _describe(req: Request) -> str:
    if req.command == TYPE:
        text = console_bytes(req.value).decode(errors="replace")
        return f"the toolstack types {text!r} on the console"
    if req.command == "checkpoint":
        return "the toolstack asks for a checkpoint (control/shutdown = suspend)"
    if req.shutdown:
        return f"the toolstack writes control/shutdown = {req.command}"
    if req.command:
        return f"{req.command} {req.value}".strip()
    return f"the toolstack writes {req.path} = {req.value}"


def suspend_and_save(hv: Hypervisor, dom: Domain, path: str | Path, at_ns: int,
                     seed: int | None = None,
                     sink: Callable[[Domain, bytes], None] | None = None,
                     note: Callable[[str], None] | None = None,
                     progress: Progress | None = None,
                     requests: Sequence[Request] = (),
                     observer: Observer | None = None,
                     saved: Callable[[Domain], None] | None = None,
                     ) -> tuple[RunResult, SaveOutcome]:
    """``xl save``: run the domain to virtual time ``at_ns`` (making those of
    ``requests`` that are no shutdown command and come before it: a mem-set,
    say), ask it to suspend (control/shutdown), wait for it, write the image
    to ``path`` and destroy the domain (``saved`` sees it just before). The
    outcome says why if it failed; then the guest is left running (its
    suspend hypercall returned 1, or it never suspended) and nothing is at
    ``path``. ``observer`` looks at the machine as run_domain's does."""
    outcome = SaveOutcome(Path(path))

    def on_suspend(d: Domain) -> bool:
        nonlocal outcome
        outcome = libxl.save_suspended(hv, d, Path(path), seed=seed, progress=progress)
        return False

    before = [r for r in requests if r.at_ns < at_ns and not r.shutdown]
    result = run_domain(hv, dom, at_ns + libxl.SUSPEND_TIMEOUT_NS, sink,
                        [*before, Request(at_ns, command="suspend")], note, on_suspend,
                        observer=observer)
    if outcome.ok:
        if saved is not None:
            saved(dom)
        libxl.destroy_saved(hv, dom, note)
    elif not outcome.error:
        outcome.error = f"{_why_not_suspended(result)}; nothing was saved"
    return result, outcome


def _why_not_suspended(result: RunResult) -> str:
    shut_down = result.reason if result.reason not in ("running", "hung") else ""
    return libxl.why_not_suspended(shut_down, bool(result.unacknowledged), "of virtual time")


class LiveRun:
    """The live save's callbacks (save.LiveCallbacks): the guest runs on in
    this run loop while each round is on the wire, and is suspended through
    the same request and handshake as ``suspend_and_save``'s."""

    def __init__(self, hv: Hypervisor, dom: Domain, now_ns: int,
                 sink: Callable[[Domain, bytes], None] | None,
                 note: Callable[[str], None] | None) -> None:
        self.hv, self.dom, self.now_ns, self.sink, self.note = hv, dom, now_ns, sink, note
        self.result: RunResult | None = None

    def run_for(self, ns: int) -> None:
        self.now_ns += ns
        self.result = run_domain(self.hv, self.dom, self.now_ns, self.sink, note=self.note,
                                 on_suspend=lambda d: False)
        if self.result.reason != "running":
            raise SaveError(f"the guest stopped ({self.result.reason}) during the live save")

    def suspend(self) -> None:
        self.result = run_domain(self.hv, self.dom, self.now_ns + libxl.SUSPEND_TIMEOUT_NS,
                                 self.sink, [Request(self.now_ns, command="suspend")],
                                 self.note, on_suspend=lambda d: False)
        if self.dom.shutdown_reason != SHUTDOWN_suspend:
            raise SaveError(_why_not_suspended(self.result))
        self.now_ns = max(domctl.vcpu_clocks(self.dom), default=self.now_ns)


def live_save(hv: Hypervisor, dom: Domain, path: str | Path, at_ns: int,
              opts: PrecopyOptions, seed: int | None = None,
              sink: Callable[[Domain, bytes], None] | None = None,
              note: Callable[[str], None] | None = None,
              report: Callable[[MigrationInfo], None] | None = None,
              requests: Sequence[Request] = (),
              ) -> tuple[RunResult, SaveOutcome, MigrationInfo | None]:
    """A live save (``xl save`` has none; ``xl migrate``'s loop into a file):
    run the domain to ``at_ns`` (making the requests before it that are no
    shutdown), then the pre-copy rounds while it runs, its suspend, the final
    round, and the domain destroyed. On failure nothing is at ``path``,
    log-dirty is off and the guest runs on (its suspend hypercall returned 1
    if it had suspended); the outcome says why."""
    outcome = SaveOutcome(Path(path))
    before = [r for r in requests if r.at_ns < at_ns and not r.shutdown]
    result = run_domain(hv, dom, at_ns, sink, before, note)
    if result.reason != "running":
        outcome.error = f"the guest shut down ({result.reason}) before the live save"
        return result, outcome, None
    live = LiveRun(hv, dom, at_ns, sink, note)
    info = None
    try:
        info, outcome.stats = save_live_to_file(hv, dom, path, live, opts, seed, report)
    except SaveError as e:
        outcome.error = str(e)
        if dom.shutdown_reason == SHUTDOWN_suspend:
            outcome.error += "; nothing was written, the guest runs on (its suspend " \
                             "hypercall returned 1)"
            resume_cancelled(hv, dom)
        elif dom.shutdown_reason is None:
            outcome.error += "; nothing was written, the guest runs on"
        else:
            outcome.error += "; nothing was written"
    result = live.result or result
    outcome.console_bytes = len(dom.console_out)
    if outcome.ok:
        libxl.destroy_saved(hv, dom, note)
    return result, outcome, info


def migrate_at(hv: Hypervisor, dom: Domain, at_ns: int, connect: Callable[[], Channel],
               opts: PrecopyOptions | None = None, until_ns: int | None = None,
               seed: int | None = None, sink: Callable[[Domain, bytes], None] | None = None,
               note: Callable[[str], None] | None = None,
               report: Callable[[MigrationInfo], None] | None = None,
               say: Callable[[str], None] | None = None, requests: Sequence[Request] = (),
               resume: Callable[[], Channel] | None = None,
               ) -> tuple[RunResult, MigrateOutcome]:
    """``xl migrate`` in a scripted run: run the domain to ``at_ns`` (making
    the requests before it that are no shutdown), open the channel
    (``connect``), migrate it live (migrate.migrate_domain, the guest run
    between rounds in this loop), and if it runs on here (the migration
    failed before GO) run it on to ``until_ns`` or its end. ``say`` gets
    xl's lines. A post-copy that drops is resumed on ``resume``'s
    connections, if given (migrate.RESUME_TRIES at most). The result is the
    run's last."""
    before = [r for r in requests if r.at_ns < at_ns and not r.shutdown]
    result = run_domain(hv, dom, at_ns, sink, before, note)
    if result.reason != "running":
        out = MigrateOutcome(runs_on=False, error=f"the guest shut down ({result.reason}) "
                                                  "before the migration")
        if say is not None:
            say(out.error)
        return result, out
    try:
        channel = connect()
    except OSError as e:
        out = MigrateOutcome(error=f"cannot reach the target: {e.strerror or e}; the "
                                   "domain never suspended and runs on")
        if say is not None:
            say(out.error)
    else:
        live = LiveRun(hv, dom, at_ns, sink, note)
        out = migrate_domain(hv, dom, channel, live, opts, seed, report, say, reconnect=resume)
        result = live.result or result
    if out.runs_on:
        result = run_domain(hv, dom, until_ns, sink, note=note)
    return result, out


def save_domain(hv: Hypervisor, dom: Domain, path: str, at_ns: int, seed: int | None = None,
                sink: Callable[[Domain, bytes], None] | None = None,
                note: Callable[[str], None] | None = None,
                progress: Callable[[int, int], None] | None = None,
                requests: Sequence[Request] = (),
                ) -> tuple[RunResult, SaveStats]:
    """suspend_and_save for callers that want an exception: SaveError says why
    the save failed."""
    result, outcome = suspend_and_save(hv, dom, path, at_ns, seed, sink, note, progress,
                                       requests)
    if outcome.stats is None:
        raise SaveError(outcome.error)
    return result, outcome.stats
