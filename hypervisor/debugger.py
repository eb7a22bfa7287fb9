"""A debugger attached to a domain: breakpoints, single steps and stops of its
VCPUs, what QEMU's gdbstub asks of its CPUs and Xen gives gdbsx through
XEN_DOMCTL_debug_op and the gdbsx domctls.

Nothing here runs unless a debugger is attached: a VCPU without one runs its
slice with one ``emu_start`` and no hook. With one, ``run_slice`` runs the
slice in pieces, and every stop falls between two pieces, never inside a
Unicorn hook:

* a breakpoint is a code hook bound to its one address, on every engine of
  the domain (Unicorn calls it only there); it ends the piece before the
  instruction runs. Nothing is ever written into guest memory, so a save
  image never holds a breakpoint;
* a single step is a piece of one counted instruction;
* a stop asked for between slices (a step whose instruction ended the slice,
  the debugger's interrupt) is taken before the VCPU's next slice.

The scheduler never knows: a slice cut at a stop goes on with what was left
of its budget, so the instructions retired, the slice lengths and every draw
of the schedule's random stream are those of the run without a debugger,
and virtual time (instructions retired) does not move while the guest is
stopped. A run under the debugger gives the results of the run without it.

The Python kernel's native entries are no x86 code: a step onto one runs
the whole Python function (the VCPU traps there, the function runs and the
slice ends), so it looks like one instruction; a breakpoint cannot be set
in it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unicorn import UC_HOOK_CODE, UcError
from unicorn import x86_const as uc_x86
from unicorn.x86_const import UC_X86_REG_CR2

from hypervisor.public.gdb import (
    GDB_REGS,
    STOP_BREAKPOINT,
    STOP_INTERRUPT,
    STOP_STEP,
)

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu
    from hypervisor.domain import Domain

log = logging.getLogger(__name__)

# gdb's names where Unicorn's differ; x87 pointer registers Unicorn has no
# state for read as 0
_UC_NAMES = {"eflags": "RFLAGS", "fctrl": "FPCW", "fstat": "FPSW", "ftag": "FPTAG",
             "fiseg": "FCS", "fioff": "FIP", "foseg": "FDS", "fooff": "FDP", "fop": "FOP"}
UC_REG_IDS: dict[str, int] = {
    r.name: getattr(uc_x86, f"UC_X86_REG_{_UC_NAMES.get(r.name, r.name.upper())}")
    for r in GDB_REGS}
# writable from the debugger: a selector write cannot change what the CPU has
# loaded (nor its CPL), and the x87 state is no part of a PV guest's here
WRITABLE = frozenset(r.name for r in GDB_REGS
                     if r.bits in (64, 128) or r.name in ("eflags", "mxcsr"))

OnStop = Callable[[int, str], None]
_MASKS = {r.name: (1 << r.bits) - 1 for r in GDB_REGS}


def read_registers(v: Vcpu) -> dict[str, int]:
    """The VCPU's registers by gdb's names (outside its hooks)."""
    regs = {name: v.uc.reg_read(uc_id) & _MASKS[name] for name, uc_id in UC_REG_IDS.items()}
    regs["rip"] = v.get_rip()
    return regs


def write_register(v: Vcpu, name: str, value: int) -> bool:
    """Write one register by its gdb name; False if the debugger may not."""
    if name not in WRITABLE:
        return False
    if name == "rip":
        v.set_rip(value)
    else:
        v.uc.reg_write(UC_REG_IDS[name], value & _MASKS[name])
    return True


class Debugger:
    """The debug state of one domain: the breakpoints, the VCPU to step, the
    stops still to report, and who is told of a stop (``on_stop(vcpu_id,
    why)``, which returns when the guest is to run on); ``interrupted()`` is
    asked before each slice whether the debugger wants the guest stopped."""

    def __init__(self, dom: Domain, on_stop: OnStop, interrupted: Callable[[], bool]) -> None:
        self.dom = dom
        self.on_stop = on_stop
        self.interrupted = interrupted
        self.breakpoints: set[int] = set()
        self.hooked: set[int] = set()  # the breakpoints the engines have hooks for
        self.stepping: int | None = None  # the VCPU whose next instruction is a step
        self.pending: dict[int, str] = {}  # vcpu id -> a stop to take before its next slice
        self.hooks: dict[tuple[int, int], int] = {}  # (vcpu id, address) -> hook handle
        self.skip: dict[int, int] = {}  # vcpu id -> the address it resumes at
        self.hit: int | None = None  # the breakpoint that ended the running piece
        self.why = STOP_STEP  # why the last piece stopped
        for v in dom.vcpus:
            v.debug = self

    # --- what the debugger asks -------------------------------------------------------

    def step(self, vcpu_id: int) -> None:
        """Resume with one instruction of this VCPU, then stop it again."""
        self.stepping = vcpu_id

    def detach(self) -> None:
        """The guest runs on without a debugger: every hook goes."""
        self.breakpoints.clear()
        self.sync_hooks()
        for v in self.dom.vcpus:
            v.debug = None

    def sync_hooks(self) -> None:
        """Give every engine a code hook at each breakpoint, and none elsewhere.
        Done when the guest resumes, so the set gdb removes at a stop and
        inserts again before it continues costs nothing. Adding or removing a
        code hook makes Unicorn invalidate translated code at the address
        through the current CR3, which may raise a hidden #PF: CR2 and the
        CPU's old_exception are repaired, and all translated code is
        dropped, which also covers an address not mapped there."""
        if self.hooked == self.breakpoints:
            return
        self.hooked = set(self.breakpoints)
        for v in self.dom.vcpus:
            want = {(v.vcpu_id, a) for a in self.breakpoints}
            have = {k for k in self.hooks if k[0] == v.vcpu_id}
            if want == have:
                continue
            cr2 = v.uc.reg_read(UC_X86_REG_CR2)
            for key in have - want:
                try:
                    v.uc.hook_del(self.hooks.pop(key))
                except UcError:
                    pass
            for key in want - have:
                self.hooks[key] = v.uc.hook_add(UC_HOOK_CODE, self._on_code, v, key[1], key[1])
            v.uc.ctl_flush_tb()
            v.uc.reg_write(UC_X86_REG_CR2, cr2)
            v.env.clear_old_exception()

    def _on_code(self, uc: Any, addr: int, size: int, v: Vcpu) -> None:
        if self.skip.pop(v.vcpu_id, None) == addr or addr not in self.breakpoints:
            return
        self.hit = addr
        uc.emu_stop()

    # --- the VCPU's slice ---------------------------------------------------------------

    def report(self, v: Vcpu, why: str) -> None:
        """Tell the debugger and wait until it resumes the guest; the VCPU
        then runs its instruction at RIP without stopping there again."""
        self.on_stop(v.vcpu_id, why)
        if v.debug is self:
            self.sync_hooks()
            self.skip[v.vcpu_id] = v.rip.read()

    def run_slice(self, v: Vcpu, start: int, timeout_us: int, budget: int) -> None:
        """Run one slice of ``budget`` instructions (Vcpu.run's), stopping
        where the debugger wants; ``v.slice_base`` counts what the pieces
        before the running one retired."""
        self.sync_hooks()  # the breakpoints gdb set before it first let the guest run
        if self.interrupted():
            self.pending.setdefault(v.vcpu_id, STOP_INTERRUPT)
        why = self.pending.pop(v.vcpu_id, None)
        if why is not None:
            at = v.rip.read()
            self.report(v, why)
            if start == at:  # not a fresh VCPU's way in: the debugger may have moved RIP
                start = v.rip.read()
        left = budget
        while left > 0:
            if v.debug is not self:  # detached at the stop: the rest of the slice
                v.emulate(start, timeout_us, left)
                return
            done = self.run_piece(v, start, timeout_us, left)
            if done is None:  # the slice ended: its budget spent, or a hook ended it
                return
            left -= done
            if left <= 0:
                self.pending[v.vcpu_id] = self.why
                return
            self.report(v, self.why)
            start = v.rip.read()

    def run_piece(self, v: Vcpu, start: int, timeout_us: int, left: int) -> int | None:
        """One piece of a slice: one instruction if the VCPU steps, else the
        rest of the slice. The instructions it retired if it stopped for the
        debugger (``self.why`` says why), None if the slice ended."""
        step = self.stepping == v.vcpu_id
        self.hit = None
        v.emulate(start, timeout_us, 1 if step else left)
        self.skip.pop(v.vcpu_id, None)
        if step:
            self.stepping = None
        # the counter has counted the instruction the piece stopped at
        ran = v.counter.retired(left + 1)
        if self.hit is not None:  # a breakpoint stopped it before its instruction
            self.why = STOP_BREAKPOINT
        elif step and ran == 2:  # the step's instruction is done, the next one waits
            self.why = STOP_STEP
        else:
            if step:
                self.pending[v.vcpu_id] = STOP_STEP
            return None
        v.slice_base += ran - 1
        v.end_piece()
        return ran - 1
