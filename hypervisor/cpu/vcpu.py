"""A virtual CPU: one Unicorn x86-64 engine with real 4-level paging.

All guest code, kernel and user, runs at CPL3 (as in Xen's x86-64 PV ABI); the
hypervisor tracks which of the two the VCPU is in and keeps two L4s, switching
CR3 on every kernel/user transition. A fresh engine starts at CPL0 and enters
CPL3 once, through the hypervisor's ``iretq`` stub; Unicorn cannot change CPL
any other way.

Every way out of guest code lands in a hook here:
* ``syscall``: a hypercall in kernel mode, a system call bounced to the guest
  kernel in user mode;
* an exception (UC_HOOK_INTR / invalid opcode): emulated where Xen emulates
  it, else injected into the guest kernel's trap table, or the domain crashes
  with a report;
* ``cpuid``: Xen's hypervisor leaves, or the CPU's own;
* a fetch from the native text range: the Python guest kernel runs.

What happens next is the hypervisor's business, not the VCPU's: the domain
hands each VCPU the ``GuestExits`` the core implements (the targets of Xen's
entry.S), so this module never names the core.

A VCPU and its domain know each other (Xen's struct vcpu has ``domain``, struct
domain has ``vcpu[]``): the one import cycle the hypervisor keeps.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ_UNMAPPED,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn.x86_const import (
    UC_X86_INS_CPUID,
    UC_X86_INS_SYSCALL,
    UC_X86_REG_CR0,
    UC_X86_REG_CR2,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_GDTR,
    UC_X86_REG_GS_BASE,
    UC_X86_REG_MSR,
    UC_X86_REG_RFLAGS,
    UC_X86_REG_RIP,
)

from hypervisor.cpu.insn import MAX_INSN_LEN
from hypervisor.cpu.runstate import Runstate
from hypervisor.cpu.ucfast import (
    GPR_ORDER,
    CpuEnv,
    FastReg,
    InsnCounter,
    RegFileByCalls,
    gpr_file,
)
from hypervisor.machine import BOOT_STACK_VA, BOOT_STUB_VA, GDT_VA, Machine
from hypervisor.mm.absent import CHUNK_SHIFT, AbsentFrames
from hypervisor.mm.memory import PAGE_SHIFT, PAGE_SIZE
from hypervisor.mm.walker import PFEC_WRITE, GuestFault, addr_ok
from hypervisor.public.arch_x86 import (
    _PAGE_PRESENT,
    MSR_SHADOW_GS_BASE,
    PTE_FRAME_MASK,
    X86_EFLAGS_IF,
    X86_EFLAGS_MBS,
)

if TYPE_CHECKING:
    from hypervisor.domain import Domain

log = logging.getLogger(__name__)
_CT = TypeVar("_CT", bound="ctypes._CData")  # a ctypes struct or scalar type

GPR_NAMES = (*GPR_ORDER, "rip", "rflags")
GPR_INDEX = {name: i for i, name in enumerate(GPR_ORDER)}
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8, R9, R10, R11 = range(12)

CR0_PE, CR0_ET, CR0_WP, CR0_PG = 1 << 0, 1 << 4, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR = 1 << 5, 1 << 9
MSR_EFER = 0xC0000080
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11
RFLAGS_DEFAULT = X86_EFLAGS_IF | X86_EFLAGS_MBS

# exception vectors (Xen's X86_EXC_*)
X86_EXC_DE, X86_EXC_DB, X86_EXC_BP, X86_EXC_UD = 0, 1, 3, 6
X86_EXC_DF, X86_EXC_GP, X86_EXC_PF = 8, 13, 14
# emu_start's stop address. Unicorn stops at ``until`` before running it, so it
# must be an address the guest can never execute: a guest may start at
# virtual address 0 (libelf's default virt_base), but no code runs at a
# non-canonical address (fetching it is a #GP). Unicorn translates
# ``until - 1`` when emu_start ends, which here is a swallowed #GP that Run
# clears (else the guest's next #GP or #PF would arrive as a #DF).
NEVER_REACHED = 0x8000_0000_0000_0000
CHUNK_BYTES = 1 << (CHUNK_SHIFT + PAGE_SHIFT)
_ACCESS_KIND = {UC_MEM_READ_UNMAPPED: "read", UC_MEM_WRITE_UNMAPPED: "write",
                UC_MEM_FETCH_UNMAPPED: "fetch"}


class DeviceBus(Protocol):
    """Device models by machine address: where a VCPU's loads and stores to
    device memory go."""

    def read(self, dom: Domain, addr: int, size: int) -> int: ...
    def write(self, dom: Domain, addr: int, size: int, value: int) -> None: ...


class GuestExits(Protocol):
    """Where a VCPU goes when guest code traps out to the hypervisor: the
    targets of Xen's entry.S (the hypercall table, the syscall and exception
    bounces, the event check on the way back in). The core is one."""

    bus: DeviceBus

    def hypercall(self, vcpu: Vcpu, nr: int, args: Sequence[int]) -> int | None: ...
    def bounce_syscall(self, vcpu: Vcpu) -> None: ...
    def inject(self, vcpu: Vcpu, vector: int, error_code: int | None,
               cr2: int | None) -> None: ...
    def do_int(self, vcpu: Vcpu, vector: int) -> None: ...
    def do_general_protection(self, vcpu: Vcpu, error_code: int) -> None: ...
    def do_invalid_op(self, vcpu: Vcpu) -> None: ...
    def cpuid(self, vcpu: Vcpu) -> bool: ...
    def do_page_fault(self, vcpu: Vcpu, error_code: int, cr2: int) -> None: ...
    def ptwr_store(self, vcpu: Vcpu, va: int, data: bytes) -> bool: ...
    def return_to_guest(self, vcpu: Vcpu) -> None: ...


class SliceRunner(Protocol):
    """An attached debugger: it runs the VCPU's slices, in pieces, with
    stops between them (hypervisor/debugger.py)."""

    def run_slice(self, v: Vcpu, start: int, timeout_us: int, budget: int) -> None: ...


class Vcpu:
    """One VCPU of a domain. Its architectural state lives in the Unicorn engine;
    the PV state Xen keeps per vcpu (mode, L4s, callbacks, trap table, kernel
    stack, timer) lives here and is what a context record carries."""

    # compat entry points a 64-bit guest never takes: (address, masks events)
    syscall32_callback: tuple[int, bool] = (0, False)
    sysenter_callback: tuple[int, bool] = (0, False)
    # SCHEDOP_poll while blocked in it: the port polled for (-1: any), and the
    # system time it ends at (0: none)
    poll_evtchn = 0
    poll_deadline = 0
    # the periodic timer (VIRQ_TIMER every period; 0: stopped): Xen starts
    # every vcpu with a 10 ms one (vcpu_create), a guest stops it if it has
    # no use for it
    periodic_period = 10_000_000
    periodic_last = 0
    gs_bases_in_use = False  # a GS base was set: a mode switch swaps them
    debug: SliceRunner | None = None  # an attached debugger runs the slices
    slice_base = 0  # instructions the slice's pieces before the running one retired
    last_retired = 0  # instructions the last slice retired (one an error ended too)
    # an exception a hook caught (a pager's PostcopyPaused), raised once the
    # slice is over; and whether the counter counted the instruction it
    # stopped at (which runs again)
    _hook_error: BaseException | None = None
    _error_counted = False

    def __init__(self, domain: Domain, vcpu_id: int, machine: Machine) -> None:
        self.domain = domain
        self.exits: GuestExits = domain.exits
        self.vcpu_id = vcpu_id
        self.machine = machine
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._init_absent()
        # env->regs[] in place: a load or store here is what uc_reg_read/write do;
        # if the search fails twice, the same through the library calls (slower)
        gprs = gpr_file(uc)
        if gprs is None:
            gprs = gpr_file(uc)
        if gprs is None:
            log.warning("vcpu%d: unicorn's register file not found; using uc_reg_read/"
                        "write for its GPRs (slower)", vcpu_id)
        self.gpr = gprs if gprs is not None else RegFileByCalls(uc)
        self.rip = FastReg(uc, UC_X86_REG_RIP)
        self.rflags = FastReg(uc, UC_X86_REG_RFLAGS)
        self.cr3 = FastReg(uc, UC_X86_REG_CR3)
        self.counter = InsnCounter(uc)
        self.env = CpuEnv(uc)

        # Xen's per-vcpu PV state (struct pv_vcpu)
        self.online = False
        self.initialised = False
        self.blocked = False
        self.in_kernel = True
        self.guest_table = 0        # kernel L4 mfn
        self.guest_table_user = 0   # user L4 mfn (0: none)
        self.ctrlreg2 = 0           # the last page-fault address delivered (CR2)
        self.kernel_ss = 0
        self.kernel_sp = 0
        self.ldt_base = 0
        self.ldt_ents = 0
        self.gdt_frames, self.gdt_ents = [], 0  # set_gdt's (frames typed seg_desc)
        self.event_callback = 0
        self.failsafe_callback = 0
        self.syscall_callback = 0
        self.syscall_masks_events = False
        self.trap_ctxt: dict[int, tuple[int, int, int]] = {}  # vector -> (flags, cs, addr)
        self.timer_deadline = 0     # ns of system time, 0 = none
        self.runstate = Runstate()
        self.idle_yields = 0  # yields in a row, nothing else between (scheduler.no_progress)
        self.clock = 0              # this vcpu's system time, ns

        self.fresh = True           # still at CPL0: enter through the boot stub
        self.stop_requested = False
        self._budget = 0
        self._in_syscall_hook = False
        self.in_multicall = False  # Xen refuses a multicall inside a multicall
        self._hooks: list[int] = []
        self.after_slice: Any = None  # called after each slice (the tracer uses it)
        self.native_begin = self.native_end = 0
        self.native_call: Any = None
        self.on_native: Any = None    # told of each native entry (the tracer uses it)

        self._setup_cpu()
        self._add_hooks()

    # --- set-up --------------------------------------------------------------------

    def _setup_cpu(self) -> None:
        uc = self.uc
        uc.reg_write(UC_X86_REG_GDTR, (0, GDT_VA, 0xFFFF, 0))
        uc.reg_write(UC_X86_REG_CR4, uc.reg_read(UC_X86_REG_CR4) | CR4_PAE | CR4_OSFXSR)
        uc.reg_write(UC_X86_REG_MSR, (MSR_EFER, EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE))

    def _add_hooks(self) -> None:
        uc = self.uc
        self._hooks.append(uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0,
                                       UC_X86_INS_SYSCALL))
        self._hooks.append(uc.hook_add(UC_HOOK_INTR, self._on_intr))
        self._hooks.append(uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid))
        self._hooks.append(uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0,
                                       UC_X86_INS_CPUID))
        self._hooks.append(uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped))

    def _init_absent(self) -> None:
        """Machine memory is mapped at the first slice (sync_absent): as one
        region, or without the chunks that hold an absent frame
        (hypervisor/mm/absent.py). The first chunk now, so that the engine is
        set up before its register file is searched for (Unicorn builds its
        CPU on the first mapping)."""
        mem = self.machine.memory
        self.uc.mem_map_ptr(0, min(mem.size, CHUNK_BYTES), UC_PROT_ALL, mem.host_addr)
        # the chunks this engine has unmapped, and the absent set's
        # generation it last followed
        self._unmapped = np.ones(len(mem.absent.chunk_absent), dtype=bool)
        self._unmapped[0] = False
        self._absent_generation = -1
        self._walk_filled = False

    def bind_native(self, begin: int, end: int, callback: Any) -> None:
        """Run ``callback(vcpu, addr)`` whenever the VCPU, in guest kernel mode,
        jumps to an address in [begin, end).

        The range is mapped no-execute, so reaching it is an instruction-fetch
        page fault at exactly that address, which lands in the exception hook.
        (A code hook bound to the range would do too, but in counted slices it
        costs every instruction ~30%, wherever it runs.)"""
        self.native_begin, self.native_end, self.native_call = begin, end, callback

    # --- registers -----------------------------------------------------------------

    def read_regs(self) -> dict[str, int]:
        regs = dict(zip(GPR_ORDER, self.gpr, strict=True))
        regs["rip"] = self.rip.read()
        regs["rflags"] = self.rflags.read()
        return regs

    def write_regs(self, **regs: int) -> None:
        """Write some registers; a new RIP is corrected inside a syscall hook
        (Unicorn adds the syscall's two bytes after the hook returns)."""
        rip = regs.pop("rip", None)
        rflags = regs.pop("rflags", None)
        gpr = self.gpr
        for name, value in regs.items():
            gpr[GPR_INDEX[name]] = value & 0xFFFFFFFFFFFFFFFF
        if rflags is not None:
            self.rflags.write(rflags)
        if rip is not None:
            self.set_rip(rip)

    def set_rip(self, rip: int) -> None:
        self.rip.write(rip - 2 if self._in_syscall_hook else rip)

    def get_rip(self) -> int:
        """The guest's RIP; inside a syscall hook, the address after the syscall."""
        rip = self.rip.read()
        return rip + 2 if self._in_syscall_hook else rip

    # --- guest memory ----------------------------------------------------------------

    def copy_from_guest(self, va: int, size: int) -> bytes:
        """Read the guest's memory at ``va`` through its live pagetables (Xen's
        copy_from_guest); raises GuestFault where the VCPU would fault, and
        for an address Xen's access_ok refuses (copy_from_guest_pv)."""
        if not addr_ok(va):
            raise GuestFault(va, 0)
        return self.machine.walker.read(self.current_table, va, size)

    def copy_struct_from_guest(self, struct_type: type[_CT], va: int) -> _CT | None:
        """The ctypes struct (or scalar) at ``va``, as Xen's typed
        copy_from_guest(&op, arg, 1) reads it; None where that fails (-EFAULT)."""
        try:
            raw = self.copy_from_guest(va, ctypes.sizeof(struct_type))
        except GuestFault:
            return None
        return struct_type.from_buffer_copy(raw)

    def fetch_insn(self, rip: int) -> bytes | None:
        """The bytes of the instruction at ``rip`` an emulator may look at:
        MAX_INSN_LEN of them, fewer where the mapping ends with the page
        (x86_emulate's insn_fetch); None if none can be read."""
        for size in (MAX_INSN_LEN, min(MAX_INSN_LEN, 0x1000 - (rip & 0xFFF))):
            try:
                return self.copy_from_guest(rip, size)
            except GuestFault:
                continue
        return None

    def copy_to_guest(self, va: int, data: bytes) -> None:
        if not addr_ok(va):
            raise GuestFault(va, PFEC_WRITE)
        self.machine.walker.write(self.current_table, va, data)

    def load_cr3(self, mfn: int) -> None:
        self.cr3.write(mfn << PAGE_SHIFT)

    @property
    def current_table(self) -> int:
        return self.guest_table if self.in_kernel else self.guest_table_user

    def toggle_guest_mode(self) -> None:
        """Switch between guest kernel and guest user mode (Xen's
        toggle_guest_mode): the other L4, and the other GS base (its swapgs:
        the engine's GS base is the mode's own, the shadow the other mode's)."""
        self.in_kernel = not self.in_kernel
        self.load_cr3(self.current_table)
        if self.gs_bases_in_use:  # both still 0: nothing to swap
            kernel, user = self.gs_bases()
            self.set_gs_bases(user, kernel)

    def gs_bases(self) -> tuple[int, int]:
        """The guest's kernel and user GS bases, whichever mode it is in."""
        active = self.uc.reg_read(UC_X86_REG_GS_BASE)
        shadow = self.uc.reg_read(UC_X86_REG_MSR, MSR_SHADOW_GS_BASE)
        return (active, shadow) if self.in_kernel else (shadow, active)

    def set_gs_bases(self, kernel: int, user: int) -> None:
        active, shadow = (kernel, user) if self.in_kernel else (user, kernel)
        self.uc.reg_write(UC_X86_REG_GS_BASE, active)
        self.uc.reg_write(UC_X86_REG_MSR, (MSR_SHADOW_GS_BASE, shadow))
        self.gs_bases_in_use = bool(kernel or user)

    # --- running -------------------------------------------------------------------

    def request_stop(self) -> None:
        """End the current slice as soon as the running hook returns."""
        self.stop_requested = True

    def retired_in_slice(self) -> int:
        """Instructions retired so far in the running (counted) slice."""
        return self.slice_base + (self.counter.retired(self._budget) if self._budget else 0)

    def run(self, budget: int, timeout_us: int = 0) -> int:
        """Run one slice: at most ``budget`` instructions (deterministic clock) or
        ``timeout_us`` of host time (fast clock). Returns instructions retired
        (deterministic) or 0 (fast).

        An exception a hook caught (a pager's fetch failing, say) is raised
        once the slice is over: the slice ended at the instruction whose
        access failed, which runs again in the next one, and
        ``last_retired`` counts the instructions before it."""
        uc = self.uc
        self.stop_requested = False
        self.last_retired = 0
        start = self.rip.read()
        if self.fresh:
            # enter CPL3 through the stub: iretq pops rip, cs, rflags, rsp, ss
            frame = self.machine.boot_frame(self.rip.read(), self.gpr[RSP],
                                            self.rflags.read() | X86_EFLAGS_MBS)
            self.machine.memory.write(self.machine.xen.stack_mfn << PAGE_SHIFT, frame)
            self.gpr[RSP] = BOOT_STACK_VA
            uc.reg_write(UC_X86_REG_CR0, CR0_PE | CR0_ET | CR0_WP | CR0_PG)
            start = BOOT_STUB_VA
            self.fresh = False
        self.slice_base = 0
        self._walk_filled = False  # (a debugger's pieces end at such a stop instead)
        self.sync_absent()
        try:
            if self.debug is None:
                self.emulate_filling(start, timeout_us, budget)
            else:
                self.debug.run_slice(self, start, timeout_us, budget)
        except UcError as e:
            if self._hook_error is None:  # else that error stopped the access
                self.domain.crash(self, f"CPU error {e} at rip {self.rip.read():#x}")
        return self._end_slice(budget)

    def _end_slice(self, budget: int) -> int:
        """The slice's bookkeeping, then the error a hook kept, if any."""
        self.env.clear_old_exception()  # Unicorn's own fetch at NEVER_REACHED - 1
        retired = self.retired_in_slice() if budget else 0
        error, self._hook_error = self._hook_error, None
        if error is not None and self._error_counted and retired > self.slice_base:
            retired -= 1  # counted, but it runs again
        self._budget = 0
        self.last_retired = retired
        if self.after_slice is not None:
            self.after_slice(self)
        if error is not None:
            raise error
        return retired

    def emulate(self, start: int, timeout_us: int, budget: int) -> None:
        """Run the engine from ``start``: a slice, or a piece of one."""
        self._budget = budget
        self.uc.emu_start(start, NEVER_REACHED, timeout_us, budget)

    def emulate_filling(self, start: int, timeout_us: int, budget: int) -> None:
        """A slice, run on in the same slice after each stop the MMU's walk
        made on an absent chunk (filled in the fault hook): the guest sees
        neither the fault nor a slice boundary there."""
        self.emulate(start, timeout_us, budget)
        while self._walk_filled:
            self._walk_filled = False
            if budget:
                # the counter counted the faulting instruction, which runs again
                self.slice_base += self.counter.retired(self._budget) - 1
                if self.slice_base >= budget:
                    return
            self.env.clear_old_exception()
            self.emulate(self.rip.read(), timeout_us, budget - self.slice_base if budget else 0)

    def end_piece(self) -> None:
        """A piece of the slice is over and counted in slice_base (a stop for
        the debugger): no instructions are running."""
        self._budget = 0
        self.env.clear_old_exception()

    # --- hooks ---------------------------------------------------------------------

    def _on_syscall(self, uc: Uc, ud: Any) -> None:
        self._in_syscall_hook = True
        try:
            exits = self.exits
            if self.in_kernel:
                g = self.gpr
                # 64-bit PV ABI: nr in rax, arguments in rdi, rsi, rdx, r10, r8
                rc = exits.hypercall(self, g[RAX], (g[RDI], g[RSI], g[RDX], g[R10], g[R8]))
                if rc is not None:
                    g[RAX] = rc & 0xFFFFFFFFFFFFFFFF
            else:
                exits.bounce_syscall(self)
            exits.return_to_guest(self)
        finally:
            self._in_syscall_hook = False
        if self.stop_requested:
            uc.emu_stop()

    def _on_intr(self, uc: Uc, intno: int, ud: Any) -> None:
        # Whatever the handling, the slice ends here. A hook on Unicorn's
        # exception path that switches CR3 and redirects RIP (a bounce into the
        # kernel, a native call returning to user mode) and then lets emulation
        # carry on leaves the engine inconsistent: under the fast clock, a later
        # asynchronous stop then corrupted guest state (a wrong hashchain digest
        # in about half the runs). Restarting with a fresh emu_start is exact.
        uc.emu_stop()
        software, err = self.env.take_exception()
        exits = self.exits
        if software:
            # int3, int $N: RIP is past the instruction
            exits.do_int(self, intno)
        elif intno in (X86_EXC_PF, X86_EXC_DF):
            cr2 = uc.reg_read(UC_X86_REG_CR2)
            if (self.native_begin <= cr2 < self.native_end and self.in_kernel
                    and cr2 == self.rip.read()):
                self.native_call(self, cr2)
                return
            if intno == X86_EXC_PF and self._fill_walk_kept(cr2):
                return
            if intno == X86_EXC_PF:
                exits.do_page_fault(self, err, cr2)
            else:
                exits.inject(self, intno, err, cr2)
        elif intno == X86_EXC_GP:
            exits.do_general_protection(self, err)
        else:
            exits.inject(self, intno, None, None)
        exits.return_to_guest(self)

    def _fill_walk_kept(self, cr2: int) -> bool:
        """fill_walk from the fault hook: True if the walk was filled (the
        instruction again, in the same slice) or its fetch failed (the error
        kept, the slice over)."""
        try:
            filled = self.fill_walk(cr2)
        except BaseException as e:
            self._keep_error(e, counted=True)
            return True
        self._walk_filled = filled
        return filled

    def _keep_error(self, error: BaseException, counted: bool) -> None:
        """Keep a hook's exception for run to raise after the slice (the
        binding would turn it into a failed access, or skip the slice's
        bookkeeping) and stop the engine; ``counted``: the counter counted
        the instruction it stopped at."""
        if self._hook_error is None:
            self._hook_error, self._error_counted = error, counted
        self.uc.emu_stop()

    def _on_invalid(self, uc: Uc, ud: Any) -> bool:
        uc.emu_stop()  # as in _on_intr: the slice ends with the exception
        self.exits.do_invalid_op(self)
        self.exits.return_to_guest(self)
        return True

    def _on_cpuid(self, uc: Uc, ud: Any) -> int:
        """1: the hypervisor answered the leaf; 0: the CPU runs it."""
        return 1 if self.exits.cpuid(self) else 0

    # --- absent frames ---------------------------------------------------------------

    def sync_absent(self) -> None:
        """Between slices: unmap the chunks that gained an absent frame since
        this engine last looked and map those that lost theirs, or map all
        memory as one region once no frame is absent (Unicorn's changes to its
        map slow down as its regions multiply). The first slice maps memory."""
        absent = self.machine.memory.absent
        if absent.generation == self._absent_generation and (
                absent.count or not self._unmapped.any()):
            return
        # Unicorn drops the translations of what it unmaps at the current CPL
        # and CR3, which may swallow a #PF: keep CR2 and forget that fault
        cr2 = self.uc.reg_read(UC_X86_REG_CR2)
        self._remap(absent)
        self.uc.reg_write(UC_X86_REG_CR2, cr2)
        self.env.clear_old_exception()

    def _remap(self, absent: AbsentFrames) -> None:
        absent_now = np.zeros_like(self._unmapped)
        absent_now[absent.absent_chunks()] = True
        for first, end in _runs(absent_now & ~self._unmapped):
            self.uc.mem_unmap(*self._chunk_range(first, end))
        self._unmapped |= absent_now
        self._absent_generation = absent.generation
        mem = self.machine.memory
        if not absent.count:  # all here: memory as one region again
            for first, end in _runs(~self._unmapped):
                self.uc.mem_unmap(*self._chunk_range(first, end))
            self.uc.mem_map_ptr(0, mem.size, UC_PROT_ALL, mem.host_addr)
            self._unmapped[:] = False
            return
        for first, end in _runs(self._unmapped & ~absent_now):
            base, size = self._chunk_range(first, end)
            self.uc.mem_map_ptr(base, size, UC_PROT_ALL, mem.host_addr + base)
        self._unmapped = absent_now

    def _chunk_range(self, first: int, end: int) -> tuple[int, int]:
        """Machine address and size of chunks [first, end)."""
        base = first << (CHUNK_SHIFT + PAGE_SHIFT)
        top = min(end << (CHUNK_SHIFT + PAGE_SHIFT), self.machine.memory.size)
        return base, top - base

    def map_chunk(self, chunk: int) -> bool:
        """Fill an unmapped chunk's absent frames and map it in this engine;
        False if this engine has it mapped already."""
        if not 0 <= chunk < self._unmapped.size or not self._unmapped[chunk]:
            return False
        mem = self.machine.memory
        mem.absent.populate_chunk(chunk)
        base, size = self._chunk_range(chunk, chunk + 1)
        self.uc.mem_map_ptr(base, size, UC_PROT_ALL, mem.host_addr + base)
        self._unmapped[chunk] = False
        return True

    def _on_unmapped(self, uc: Uc, access: int, address: int, size: int, value: int,
                     ud: Any) -> bool:
        """A load, store or fetch reached an unmapped chunk: fill it, map it
        and let the access go on (False: no memory there at all, or the fill
        failed: its error kept for run, the instruction not done)."""
        try:
            mapped = self.map_chunk(address >> (CHUNK_SHIFT + PAGE_SHIFT))
        except BaseException as e:
            # an instruction fetch fails before the counter counts it
            self._keep_error(e, counted=access != UC_MEM_FETCH_UNMAPPED)
            return False
        if not mapped:
            return False
        self.machine.memory.absent.faults[_ACCESS_KIND.get(access, "read")] += 1
        return True

    def fill_walk(self, cr2: int) -> bool:
        """The MMU reads an unmapped chunk as zeros, so a #PF may only mean
        that the walk for ``cr2`` crossed one: walk it here, filling and
        mapping the tables' unmapped chunks (the leaf's, if unmapped, is the
        unmapped-memory hook's when the access runs again). True if any was:
        the fault is not the guest's."""
        if not self._unmapped.any():
            return False
        mem = self.machine.memory
        table = self.cr3.read() >> PAGE_SHIFT
        filled = False
        for shift in (39, 30, 21, 12):
            filled |= self.map_chunk(table >> CHUNK_SHIFT)
            mem.populate(table)
            pte = int(mem.u64[(table << 9) | ((cr2 >> shift) & 511)])
            if not pte & _PAGE_PRESENT:
                break
            table = (pte & PTE_FRAME_MASK) >> PAGE_SHIFT
        if filled:
            mem.absent.faults["walk"] += 1
        return filled

    # --- device memory ---------------------------------------------------------------

    def map_mmio(self, base: int) -> None:
        """Send this engine's loads and stores at the device page ``base`` to
        the bus (they arrive here only through a PTE the hypervisor allowed)."""
        bus, dom = self.exits.bus, self.domain

        def read(uc: Uc, offset: int, size: int, ud: Any) -> int:
            return bus.read(dom, base + offset, size)

        def write(uc: Uc, offset: int, size: int, value: int, ud: Any) -> None:
            bus.write(dom, base + offset, size, value)

        self.uc.mmio_map(base, PAGE_SIZE, read, None, write, None)

    def close(self) -> None:
        for h in self._hooks:
            try:
                self.uc.hook_del(h)
            except UcError:
                pass
        self._hooks.clear()
        self.env.free()


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """The [first, end) runs of True in a bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
