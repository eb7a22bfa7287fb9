"""Getting into the guest kernel: bounce frames for traps, system calls and event
upcalls, and the iret hypercall that gets back out (xen/arch/x86/pv/traps.c,
x86_64/entry.S create_bounce_frame, pv/iret.c).

A bounce frame is what a PV guest kernel finds on its stack when Xen enters it:
from low to high addresses ``RCX, R11, [error code,] RIP, CS, RFLAGS, RSP, SS``.
Entering from user mode switches to the kernel's L4 and to the stack the kernel
registered with stack_switch. The saved event mask rides in CS bits 32-39 and in
RFLAGS.IF, and the iret hypercall restores it from RFLAGS.IF.
"""

from __future__ import annotations

import ctypes
import struct
from typing import TYPE_CHECKING

from hypervisor.cpu.vcpu import (
    X86_EXC_BP,
    X86_EXC_DB,
    X86_EXC_DE,
    X86_EXC_DF,
    X86_EXC_GP,
    X86_EXC_PF,
    X86_EXC_UD,
)
from hypervisor.emulate import emulate_forced_invalid_op, emulate_privileged_op
from hypervisor.mm.walker import PFEC_USER, GuestFault
from hypervisor.public.arch_x86 import (
    FLAT_KERNEL_CS64,
    FLAT_KERNEL_SS64,
    FLAT_USER_CS64,
    FLAT_USER_SS64,
    TI_DPL_MASK,
    TI_IF,
    X86_EFLAGS_IF,
    X86_EFLAGS_IOPL,
    X86_EFLAGS_NT,
    X86_EFLAGS_RF,
    X86_EFLAGS_TF,
    X86_EFLAGS_VM,
    VGCF_in_syscall,
    iret_context,
)

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

X86_EXC_OF = 4
SELECTOR_IDT = 2  # error code of a fault on a gate: the selector is an IDT index
INT_N_SIZE = 2  # int $N (CD ib): the #GP for a refused one is at the int itself
LEGACY_SYSCALL_VECTOR = 0x80
_IRET_SIZE = ctypes.sizeof(iret_context)
# the bounce frame's CS slot carries the saved event mask above the selector
# (cpu_user_regs.saved_upcall_mask sits 4 bytes into the 8-byte cs slot)
SAVED_UPCALL_MASK_SHIFT = 32

EXCEPTION_NAMES = {X86_EXC_DE: "divide error", X86_EXC_DB: "debug", X86_EXC_BP: "breakpoint",
                   X86_EXC_UD: "invalid opcode", X86_EXC_DF: "double fault",
                   X86_EXC_GP: "general protection fault", X86_EXC_PF: "page fault"}


def create_bounce_frame(vcpu: Vcpu, handler: int, error_code: int | None = None,
                        mask_events: bool = False, syscall: bool = False) -> bool:
    """Enter the guest kernel at ``handler`` with a bounce frame; False (and
    the domain crashed) if the frame cannot be written."""
    regs = vcpu.read_regs()
    rip = vcpu.get_rip()
    rcx, r11, rflags = regs["rcx"], regs["r11"], regs["rflags"]
    if syscall:
        # what the hardware syscall instruction would have left behind
        rcx, r11 = rip, rflags
    vi = vcpu.domain.shared_info.vcpu_info[vcpu.vcpu_id]
    if vcpu.in_kernel:
        sp = regs["rsp"]
        cs, ss = FLAT_KERNEL_CS64 & ~3, FLAT_KERNEL_SS64 & ~3
    else:
        vcpu.toggle_guest_mode()
        sp = vcpu.kernel_sp
        cs, ss = FLAT_USER_CS64, FLAT_USER_SS64
    mask = vi.evtchn_upcall_mask
    saved_rflags = (rflags & ~X86_EFLAGS_IF) | (0 if mask else X86_EFLAGS_IF)
    words = [rcx, r11]
    if error_code is not None:
        words.append(error_code)
    words += [rip, cs | (mask << SAVED_UPCALL_MASK_SHIFT), saved_rflags, regs["rsp"], ss]
    sp -= 8 * len(words)
    try:
        vcpu.copy_to_guest(sp, struct.pack(f"<{len(words)}Q", *words))
    except GuestFault as f:
        vcpu.domain.crash(vcpu, f"cannot write a bounce frame on the kernel stack ({f})")
        return False
    if mask_events:
        vi.evtchn_upcall_mask = 1
    entry_clears = X86_EFLAGS_TF | X86_EFLAGS_NT | X86_EFLAGS_RF | X86_EFLAGS_VM
    vcpu.write_regs(rsp=sp, rflags=rflags & ~entry_clears, rip=handler)
    return True


def inject(vcpu: Vcpu, vector: int, error_code: int | None, cr2: int | None) -> None:
    """Deliver an exception to the guest kernel's trap table entry
    (pv/traps.c pv_inject_event)."""
    flags, _cs, addr = vcpu.trap_ctxt.get(vector, (0, 0, 0))
    if vector == X86_EXC_PF and error_code is not None:
        # all guest code runs at CPL3: the user bit must tell the guest's mode
        error_code = (error_code & ~PFEC_USER) | (0 if vcpu.in_kernel else PFEC_USER)
    if cr2 is not None:
        vcpu.ctrlreg2 = cr2
        vcpu.domain.shared_info.vcpu_info[vcpu.vcpu_id].arch.cr2 = cr2
    if not addr:
        what = EXCEPTION_NAMES.get(vector, f"exception {vector}")
        detail = f" at {cr2:#x}" if cr2 is not None else ""
        err = f" (error code {error_code:#x})" if error_code is not None else ""
        mode = "kernel" if vcpu.in_kernel else "user"
        vcpu.domain.crash(vcpu, f"{what}{detail}{err} in guest {mode} mode at rip "
                          f"{vcpu.get_rip():#x}, and no trap handler is registered")
        return
    create_bounce_frame(vcpu, addr, error_code, mask_events=bool(flags & TI_IF))


def permit_softint(vcpu: Vcpu, dpl: int) -> bool:
    """x86_64/regs.h permit_softint: guest kernel mode may use a gate of DPL
    1 or more, guest user mode only DPL 3."""
    return dpl >= (1 if vcpu.in_kernel else 3)


def do_int(vcpu: Vcpu, vector: int) -> None:
    """A software interrupt (int3, int $N), RIP already past it. Xen's own
    gates for #BP and #OF have DPL 3 and inject whatever the guest's gate says
    (traps.c do_int3); int $0x80 with a handler takes the fast path
    (x86_64/entry.S entry_int80); any other int $N is a #GP to Xen, which
    delivers it if the guest's gate permits (do_general_protection) and
    otherwise passes the #GP on, at the int, naming the gate."""
    flags, _cs, addr = vcpu.trap_ctxt.get(vector, (0, 0, 0))
    if vector in (X86_EXC_BP, X86_EXC_OF) or (vector == LEGACY_SYSCALL_VECTOR and addr):
        inject(vcpu, vector, None, None)
    elif permit_softint(vcpu, flags & TI_DPL_MASK):
        inject(vcpu, vector, None, None)
    else:
        vcpu.set_rip(vcpu.get_rip() - INT_N_SIZE)
        inject(vcpu, X86_EXC_GP, (vector << 3) | SELECTOR_IDT, None)


def do_general_protection(vcpu: Vcpu, error_code: int) -> None:
    """traps.c do_general_protection: a #GP(0) may be a privileged instruction
    Xen carries out for the guest kernel; otherwise the #GP is passed on."""
    if error_code == 0 and emulate_privileged_op(vcpu):
        return
    inject(vcpu, X86_EXC_GP, error_code, None)


def do_invalid_op(vcpu: Vcpu) -> None:
    """traps.c do_invalid_op: the forced-emulation prefix, or a #UD."""
    if not emulate_forced_invalid_op(vcpu):
        inject(vcpu, X86_EXC_UD, None, None)


def bounce_syscall(vcpu: Vcpu) -> None:
    """A syscall from guest user mode goes to the kernel's syscall callback."""
    if not vcpu.syscall_callback:
        inject(vcpu, X86_EXC_UD, None, None)
        return
    create_bounce_frame(vcpu, vcpu.syscall_callback, syscall=True,
                        mask_events=vcpu.syscall_masks_events)


def deliver_event(vcpu: Vcpu) -> None:
    """The upcall Xen makes on the way back to a guest with events pending."""
    dom = vcpu.domain
    if not dom.is_running or vcpu.blocked or not vcpu.event_callback:
        return
    vi = dom.shared_info.vcpu_info[vcpu.vcpu_id]
    if vi.evtchn_upcall_pending and not vi.evtchn_upcall_mask:
        vcpu.idle_yields = 0  # an event reached it: it is not spinning in vain
        create_bounce_frame(vcpu, vcpu.event_callback, mask_events=True)


def do_iret(vcpu: Vcpu, *_: int) -> int:
    """HYPERVISOR_iret: pop {rax, r11, rcx, flags, rip, cs, rflags, rsp, ss}."""
    rsp = vcpu.read_regs()["rsp"]
    try:
        ctx = iret_context.from_buffer_copy(vcpu.copy_from_guest(rsp, _IRET_SIZE))
    except GuestFault:
        vcpu.domain.crash(vcpu, "fault while reading the IRET context from the guest stack")
        return 0
    if ctx.cs & 3 == 3:
        if not vcpu.guest_table_user:
            vcpu.domain.crash(vcpu, "guest switching to user mode with no user page tables")
            return 0
        if vcpu.in_kernel:
            vcpu.toggle_guest_mode()
    regs = {"rsp": ctx.rsp,
            "rflags": (ctx.rflags & ~(X86_EFLAGS_IOPL | X86_EFLAGS_VM)) | X86_EFLAGS_IF}
    if not ctx.flags & VGCF_in_syscall:
        regs["r11"], regs["rcx"] = ctx.r11, ctx.rcx
    vcpu.write_regs(rip=ctx.rip, **regs)
    vi = vcpu.domain.shared_info.vcpu_info[vcpu.vcpu_id]
    vi.evtchn_upcall_mask = 0 if ctx.rflags & X86_EFLAGS_IF else 1
    return ctx.rax
