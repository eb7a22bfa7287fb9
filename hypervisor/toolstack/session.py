"""Booting a domain from a configuration and running it: what ``pvlab run``
does, as a function the tests and tools call too."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.core import Hypervisor
from hypervisor.domain import SHUTDOWN_NAMES, Domain
from hypervisor.public.sched import SHUTDOWN_suspend
from hypervisor.toolstack.builder import build_domain
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.control import (
    ACK_TIMEOUT_NS,
    Request,
    apply_request,
    cancel_shutdown,
    resume_cancelled,
    shutdown_pending,
)
from hypervisor.toolstack.save import SaveError, SaveStats, save_to_file
from hypervisor.toolstack.timeparse import format_duration

log = logging.getLogger(__name__)

HYPERVISOR_OVERHEAD_MIB = 8
SUSPEND_TIMEOUT_NS = 2_000_000_000  # virtual time from the request to the suspend


def machine_mib_for(memory_mib: int) -> int:
    """Machine memory for one guest: its RAM, the M2P, the hypervisor's frames."""
    return memory_mib + HYPERVISOR_OVERHEAD_MIB + memory_mib // 64


@dataclass
class RunResult:
    domain: Domain
    console: bytes
    reason: str           # "poweroff", "crash", ..., "running" (time limit) or "hung"
    virtual_ns: int
    notes: list[str] = field(default_factory=list)  # the toolstack's messages

    @property
    def ok(self) -> bool:
        return self.reason in ("poweroff", "running")


def boot(cfg: DomainConfig, seed: int | None = None, clock: str = "deterministic",
         slice_insns: int = 50_000) -> tuple[Hypervisor, Domain]:
    seed = cfg.seed if seed is None else seed
    hv = Hypervisor(machine_mib_for(max(cfg.memory, cfg.maxmem)), seed=seed, clock=clock,
                    slice_insns=slice_insns)
    dom = build_domain(hv, cfg)
    return hv, dom


def run_domain(hv: Hypervisor, dom: Domain, until_ns: int | None = None,
               sink: Callable[[Domain, bytes], None] | None = None,
               requests: Sequence[Request] = (),
               note: Callable[[str], None] | None = None,
               on_suspend: Callable[[Domain], bool] | None = None,
               checkpoint_dir: str | Path | None = None) -> RunResult:
    """Run until the domain shuts down, hangs, or (with until_ns) every VCPU
    reaches that virtual time. ``requests`` are made at their times. A domain
    that suspends is handed to ``on_suspend`` (which saves it, say): if that
    returns True, or there is none, the domain is resumed cancelled and runs
    on; if False, the run ends there. A suspend that a ``checkpoint`` request
    asked for writes a checkpoint image into ``checkpoint_dir`` (by default
    a temporary one, gone when the run ends) and runs on. ``note`` gets the
    toolstack's messages."""
    dom.console_sink = sink
    notes: list[str] = []
    checkpoints_wanted = 0
    scratch: list[tempfile.TemporaryDirectory[str]] = []  # made at the first checkpoint

    def where() -> Path:
        if checkpoint_dir is not None:
            return Path(checkpoint_dir)
        if not scratch:
            scratch.append(tempfile.TemporaryDirectory(prefix="pvlab-checkpoints-"))
        return Path(scratch[0].name)

    def say(msg: str) -> None:
        notes.append(msg)
        log.info("%s", msg)
        if note is not None:
            note(msg)

    try:
        pending = sorted(requests, key=lambda r: r.at_ns)
        ack_deadline: int | None = None
        while True:
            marks = [pending[0].at_ns] if pending else []
            if ack_deadline is not None:
                marks.append(ack_deadline)
            if until_ns is not None:
                marks.append(until_ns)
            limit = min(marks) if marks else None
            hv.run(limit)
            if dom.shutdown_reason == SHUTDOWN_suspend:
                if checkpoints_wanted and on_suspend is None:
                    checkpoints_wanted -= 1
                    _take_checkpoint(hv, dom, where(), say)
                elif on_suspend is not None:
                    if not on_suspend(dom):
                        break
                    say(f"domain {dom.name} resumed: the suspend hypercall returns 1")
                else:
                    say(f"domain {dom.name} suspended; resuming it: the suspend is cancelled "
                        "(the suspend hypercall returns 1)")
                resume_cancelled(hv, dom)
                ack_deadline = None
                continue
            if dom.shutdown_reason is not None or limit is None or not _reached(dom, limit):
                break
            while pending and pending[0].at_ns <= limit:
                req = pending.pop(0)
                say(f"at {format_duration(req.at_ns)}: {_describe(req)}")
                msg = apply_request(hv, dom, req)
                if msg:
                    say(msg)
                if req.command == "checkpoint":
                    checkpoints_wanted += 1
                if req.shutdown:
                    ack_deadline = req.at_ns + ACK_TIMEOUT_NS
            if ack_deadline is not None:
                if not shutdown_pending(hv, dom):
                    ack_deadline = None
                elif limit >= ack_deadline:
                    say(f"guest didn't acknowledge {shutdown_pending(hv, dom)}, cancelling request")
                    cancel_shutdown(hv, dom)
                    ack_deadline = None
            if until_ns is not None and limit >= until_ns:
                break
        if dom.shutdown_reason is not None:
            reason = SHUTDOWN_NAMES.get(dom.shutdown_reason, str(dom.shutdown_reason))
        elif until_ns is not None and _reached(dom, until_ns):
            reason = "running"  # each VCPU reached the time, or sleeps until a timer
        else:
            reason = "hung"
        t = max((v.clock for v in dom.vcpus), default=0)
        return RunResult(dom, bytes(dom.console_out), reason, t, notes)
    finally:
        for d in scratch:
            d.cleanup()


def _reached(dom: Domain, t: int) -> bool:
    return all(v.clock >= t or (v.blocked and v.timer_deadline) for v in dom.vcpus if v.online)


def _take_checkpoint(hv: Hypervisor, dom: Domain, where: Path,
                     say: Callable[[str], None]) -> None:
    n = len(list(where.glob(f"{dom.name}-checkpoint-*.img"))) + 1
    path = where / f"{dom.name}-checkpoint-{n:03d}.img"
    try:
        stats = save_to_file(hv, dom, path, checkpoint=True)
    except SaveError as e:
        say(f"checkpoint failed: {e}; the guest runs on")
        return
    say(f"checkpoint {n}: {stats.bytes / (1 << 20):.1f} MiB image written")


def _describe(req: Request) -> str:
    if req.command == "checkpoint":
        return "the toolstack asks for a checkpoint (control/shutdown = suspend)"
    if req.shutdown:
        return f"the toolstack writes control/shutdown = {req.command}"
    if req.command:
        return f"{req.command} {req.value}".strip()
    return f"the toolstack writes {req.path} = {req.value}"


def save_domain(hv: Hypervisor, dom: Domain, path: str, at_ns: int, seed: int | None = None,
                sink: Callable[[Domain, bytes], None] | None = None,
                note: Callable[[str], None] | None = None,
                progress: Callable[[int, int], None] | None = None,
                requests: Sequence[Request] = (),
                ) -> tuple[RunResult, SaveStats]:
    """``xl save``: run the domain to virtual time ``at_ns`` (making those of
    ``requests`` that are no shutdown command and come before it: a mem-set,
    say), ask it to suspend (control/shutdown), wait for it, write the image
    to ``path`` and destroy the domain. If the guest does not suspend, or the
    image cannot be written, SaveError says why; the guest is left running (the suspend hypercall
    returned 1) and nothing is at ``path``."""
    saved: list[SaveStats] = []
    failed: list[SaveError] = []

    def on_suspend(d: Domain) -> bool:
        try:
            saved.append(save_to_file(hv, d, path, seed=seed, progress=progress))
        except SaveError as e:
            failed.append(e)
            resume_cancelled(hv, d)
        return False

    before = [r for r in requests if r.at_ns < at_ns and not r.shutdown]
    result = run_domain(hv, dom, at_ns + SUSPEND_TIMEOUT_NS, sink,
                        [*before, Request(at_ns, command="suspend")], note, on_suspend)
    if failed:
        raise SaveError(f"{failed[0]}; nothing was written, the guest runs on (its suspend "
                        "hypercall returned 1)")
    if not saved:
        if result.reason not in ("running", "hung"):
            why = f"the guest shut down ({result.reason}) before it suspended"
        elif any("didn't acknowledge" in n for n in result.notes):
            why = (f"the guest did not acknowledge the suspend request (control/shutdown) "
                   f"within {format_duration(ACK_TIMEOUT_NS)} of virtual time: is it built "
                   "without save/restore support?")
        else:
            why = (f"the guest did not suspend within "
                   f"{format_duration(SUSPEND_TIMEOUT_NS)} of virtual time of the request")
        raise SaveError(f"{why}; nothing was saved")
    hv.destroy_domain(dom)
    return result, saved[0]
