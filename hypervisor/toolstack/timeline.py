"""The suspend path on each VCPU, from a traced run: what ``pvlab plot
timeline`` draws.

The domain's trace buffer (domctl.tbuf_enable) holds every VCPU's hypercalls,
its console lines and its kernel's markers with their virtual time. Of those,
the steps of the suspend path: the freeze (freeze_processes, then the PM
core's dpm_suspend_start and dpm_suspend_noirq), each cpu's stop_machine
states (the kernel marks PREPARE, DISABLE_IRQ, RUN and EXIT as each cpu
acknowledges them), the suspend hypercall (SCHEDOP_shutdown), and the way
back: the hypercall's result, dpm_resume_noirq and dpm_resume_end with THAW
(1: a checkpoint, or a cancelled suspend) or RESTORE (0: a new domain), the
thaw. Each VCPU keeps its own clock (scheduler.py), so a lane's times are its
own VCPU's: they only ever grow along a lane, and two lanes may be a few
slices apart.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor import domctl
from hypervisor.domctl import Domain, TraceRecord
from hypervisor.public.sched import SCHEDOP_shutdown
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.control import Request
from hypervisor.toolstack.plotdata import closing_machines
from hypervisor.toolstack.session import run_domain, suspend_and_save
from hypervisor.toolstack.timeparse import format_duration

FREEZE, STOP, HYPERCALL, RESUME = "freeze", "stop_machine", "hypercall", "resume"
STOP_STATES = ("PREPARE", "DISABLE_IRQ", "RUN", "EXIT")

# virtual time the run goes on after the request (or the restore): the path
# takes tens of microseconds, a guest slow to freeze its tasks a few ms
WINDOW_NS = 5_000_000

# console lines of the suspend path (after the "[cpuN] " prefix) and the step
# each is; the PM core's lines are Linux's names
_LINES = [
    (re.compile(r"suspend: freeze_processes"), FREEZE, "freeze_processes"),
    (re.compile(r"PM: (dpm_suspend_start\(\w+\))"), FREEZE, None),
    (re.compile(r"PM: (dpm_suspend_noirq\(\w+\))"), FREEZE, None),
    (re.compile(r"suspend hypercall returned (\d)"), RESUME, "returned {}"),
    (re.compile(r"PM: (dpm_resume_noirq\(\w+\))"), RESUME, None),
    (re.compile(r"PM: (dpm_resume_end\(\w+\))"), RESUME, None),
    (re.compile(r"freezer: (thaw_processes)"), RESUME, None),
    (re.compile(r"suspend: (done)"), RESUME, None),
]
_PREFIX = re.compile(r"^\[cpu\d+\] ")
_MARKER = re.compile(r"stop_machine (\w+)$")
_HOW = re.compile(r"dpm_resume_noirq\((\w+)\)")


class TimelineError(Exception):
    """The run gave no complete suspend path to draw."""


@dataclass(frozen=True)
class Step:
    t_ns: int
    vcpu: int
    kind: str    # FREEZE, STOP, HYPERCALL or RESUME
    label: str   # the step's name: a state, a PM call, "SCHEDOP_shutdown"


@dataclass
class Timeline:
    """The suspend path of one run, each VCPU's steps in the order it made them."""

    steps: list[Step]
    vcpus: int
    request_ns: int
    how: str                      # "THAW" or "RESTORE"
    domain: str = ""
    gap_ns: list[int] = field(default_factory=list)  # where a save ends and its restore starts

    def lane(self, vcpu: int) -> list[Step]:
        return [s for s in self.steps if s.vcpu == vcpu]


def _console_step(r: TraceRecord) -> Step | None:
    line = _PREFIX.sub("", r.name)
    for pattern, kind, label in _LINES:
        m = pattern.search(line)
        if m:
            text = label.format(*m.groups()) if label else m.group(1)
            return Step(r.t_ns, r.vcpu, kind, text)
    return None


def _step(r: TraceRecord) -> Step | None:
    if r.kind == "console":
        return _console_step(r)
    if r.kind == "marker":
        m = _MARKER.match(r.name)
        return Step(r.t_ns, r.vcpu, STOP, m.group(1)) if m else None
    if r.kind == "hypercall" and r.name == "sched_op" and r.args[:1] == (SCHEDOP_shutdown,):
        return Step(r.t_ns, r.vcpu, HYPERCALL, "SCHEDOP_shutdown")
    return None


def suspend_steps(records: list[TraceRecord], from_ns: int) -> list[Step]:
    """The suspend path's steps among ``records``, from the first freeze at or
    after ``from_ns`` on: the records before it are the guest's own work."""
    steps = [s for s in map(_step, records) if s is not None]
    start = next((i for i, s in enumerate(steps) if s.kind == FREEZE and s.t_ns >= from_ns),
                 None)
    return [] if start is None else _first_path(steps[start:])


def _first_path(steps: list[Step]) -> list[Step]:
    """One suspend path: each lane up to its stop_machine EXIT, and past it
    only the way back, up to "done", on the lane that suspended."""
    exited: set[int] = set()
    done: set[int] = set()
    out = []
    for s in steps:
        if s.vcpu in done or (s.vcpu in exited and s.kind != RESUME):
            continue
        out.append(s)
        if s.kind == STOP and s.label == "EXIT":
            exited.add(s.vcpu)
        elif s.kind == RESUME and s.label == "done":
            done.add(s.vcpu)
    return out


def _resume_how(steps: list[Step]) -> str:
    for s in steps:
        m = _HOW.match(s.label)
        if m:
            return m.group(1)
    return ""


def _timeline(steps: list[Step], dom: Domain, at_ns: int, gap: list[int]) -> Timeline:
    how = _resume_how(steps)
    if not any(s.kind == HYPERCALL for s in steps) or not how:
        raise TimelineError(f"domain {dom.name} did not suspend and resume within "
                            f"{format_duration(WINDOW_NS)} of the request at "
                            f"{format_duration(at_ns)} (is it built with save/restore?)")
    return Timeline(steps, domctl.max_vcpus(dom), at_ns, how, dom.name, gap)


def trace_checkpoint(cfg: DomainConfig, at_ns: int, seed: int | None = None,
                     sched_seed: int | None = None) -> Timeline:
    """A checkpoint at ``at_ns``: the guest suspends, is saved and goes on (THAW)."""
    before = [r for r in cfg.requests if r.at_ns < at_ns and not r.shutdown
              and r.command != "checkpoint"]
    with closing_machines() as machines:
        hv, dom = machines.boot(cfg, seed, sched_seed)
        domctl.tbuf_enable(dom)
        run_domain(hv, dom, at_ns + WINDOW_NS,
                   requests=[*before, Request(at_ns, command="checkpoint")])
        return _timeline(suspend_steps(domctl.tbuf_read(dom), at_ns), dom, at_ns, [])


def trace_save_restore(cfg: DomainConfig, at_ns: int, seed: int | None = None,
                       sched_seed: int | None = None) -> Timeline:
    """A save at ``at_ns`` and its restore on other frames (RESTORE), one
    trace: the restored VCPUs go on from the clocks they were saved with."""
    with closing_machines() as machines, tempfile.TemporaryDirectory(
            prefix="pvlab-timeline-") as scratch:
        hv, dom = machines.boot(cfg, seed, sched_seed)
        domctl.tbuf_enable(dom)
        image = Path(scratch) / f"{dom.name}.img"
        _, outcome = suspend_and_save(hv, dom, image, at_ns, requests=cfg.requests)
        if not outcome.ok:
            raise TimelineError(f"the save at {format_duration(at_ns)} failed: {outcome.error}")
        hv2, dom2 = machines.restore(image)
        domctl.tbuf_enable(dom2)
        run_domain(hv2, dom2, max(domctl.vcpu_clocks(dom2)) + WINDOW_NS)
        steps = suspend_steps(domctl.tbuf_read(dom) + domctl.tbuf_read(dom2), at_ns)
        gap = [max(s.t_ns for s in steps if s.kind == HYPERCALL)] if steps else []
        return _timeline(steps, dom2, at_ns, gap)
