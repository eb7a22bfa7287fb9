"""A VCPU's state as one record: Xen's ``vcpu_guest_context`` (64-bit layout,
5168 bytes), which is what VCPUOP_initialise takes and what save writes.

CR3 and the user L4 are machine addresses here (Xen's xen_pfn_to_cr3 of an mfn);
save canonicalises them to pfns, restore localises them back.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from unicorn import x86_const
from unicorn.x86_const import UC_X86_REG_FS_BASE

from hypervisor.hypercalls.vm_assist import PV64_VM_ASSIST_MASK
from hypervisor.mm.frames import PageType
from hypervisor.mm.memory import PAGE_SHIFT
from hypervisor.public.arch_x86 import (
    X86_EFLAGS_IF,
    X86_EFLAGS_MBS,
    VGCF_i387_valid,
    VGCF_in_kernel,
    VGCF_online,
    VGCF_syscall_disables_events,
    vcpu_guest_context,
)
from hypervisor.public.errno import EINVAL

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

CONTEXT_SIZE = ctypes.sizeof(vcpu_guest_context)
_USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
              "rax", "rcx", "rdx", "rsi", "rdi", "rip", "rflags", "rsp")


def get_context(vcpu: Vcpu) -> vcpu_guest_context:
    ctx = vcpu_guest_context()
    regs = vcpu.read_regs()
    regs["rip"] = vcpu.get_rip()
    ur = ctx.user_regs
    for name in _USER_REGS:
        setattr(ur, name, regs[name])
    flags = 0
    if vcpu.in_kernel:
        flags |= VGCF_in_kernel
    if vcpu.online:
        flags |= VGCF_online
    if vcpu.syscall_masks_events:
        flags |= VGCF_syscall_disables_events
    ctx.flags = flags
    for vector, (tflags, cs, address) in vcpu.trap_ctxt.items():
        t = ctx.trap_ctxt[vector]
        t.vector, t.flags, t.cs, t.address = vector, tflags, cs, address
    ctx.kernel_ss, ctx.kernel_sp = vcpu.kernel_ss, vcpu.kernel_sp
    ctx.ctrlreg[3] = vcpu.guest_table << PAGE_SHIFT
    ctx.ctrlreg[1] = vcpu.guest_table_user << PAGE_SHIFT
    ctx.ctrlreg[2] = vcpu.ctrlreg2
    ctx.event_callback_eip = vcpu.event_callback
    ctx.failsafe_callback_eip = vcpu.failsafe_callback
    ctx.syscall_callback_eip = vcpu.syscall_callback
    ctx.vm_assist = vcpu.domain.vm_assist  # a domain's, carried by each context
    ctx.fs_base = vcpu.uc.reg_read(UC_X86_REG_FS_BASE)
    ctx.gs_base_kernel, ctx.gs_base_user = vcpu.gs_bases()
    _save_sse(vcpu, ctx)
    return ctx


# fpu_ctxt is an FXSAVE image: MXCSR at 24, XMM0-15 at 160 (16 bytes each).
# The x87 stack is not carried: neither the kernel nor the programs use it.
_FX_MXCSR, _FX_XMM = 24, 160
_XMM = [getattr(x86_const, f"UC_X86_REG_XMM{i}") for i in range(16)]


def _save_sse(vcpu: Vcpu, ctx: vcpu_guest_context) -> None:
    fx = bytearray(512)
    fx[_FX_MXCSR:_FX_MXCSR + 4] = vcpu.uc.reg_read(x86_const.UC_X86_REG_MXCSR).to_bytes(4, "little")
    for i, reg in enumerate(_XMM):
        off = _FX_XMM + 16 * i
        fx[off:off + 16] = vcpu.uc.reg_read(reg).to_bytes(16, "little")
    ctypes.memmove(ctypes.addressof(ctx.fpu_ctxt), bytes(fx), 512)
    ctx.flags |= VGCF_i387_valid


def _load_sse(vcpu: Vcpu, ctx: vcpu_guest_context) -> None:
    if not ctx.flags & VGCF_i387_valid:
        return
    fx = bytes(ctx.fpu_ctxt)
    mxcsr = int.from_bytes(fx[_FX_MXCSR:_FX_MXCSR + 4], "little")
    vcpu.uc.reg_write(x86_const.UC_X86_REG_MXCSR, mxcsr)
    for i, reg in enumerate(_XMM):
        off = _FX_XMM + 16 * i
        vcpu.uc.reg_write(reg, int.from_bytes(fx[off:off + 16], "little"))


def set_context(vcpu: Vcpu, raw: bytes, take_refs: bool = True) -> int:
    """Load a vcpu_guest_context (Xen's arch_set_info_guest); the new kernel L4
    takes a type reference and is validated if it is not already. Vcpu 0's
    record also sets the domain's vm_assist word (so a restore keeps it). With
    ``take_refs=False`` the references are already held (a VCPU object rebuilt
    from the record of one that held them)."""
    ctx = vcpu_guest_context.from_buffer_copy(raw)
    dom = vcpu.domain
    types = dom.machine.types
    if vcpu.vcpu_id == 0 and ctx.vm_assist & ~PV64_VM_ASSIST_MASK:
        return -EINVAL  # vcpu 0's record sets the domain's vm_assist: known types only
    cr3 = ctx.ctrlreg[3] >> PAGE_SHIFT
    user = ctx.ctrlreg[1] >> PAGE_SHIFT
    if take_refs:
        if not cr3 or types.get_page_and_type(cr3, PageType.l4, dom.domid):
            return -EINVAL
        if user and types.get_page_and_type(user, PageType.l4, dom.domid):
            types.put_page_and_type(cr3)
            return -EINVAL
        for old in (vcpu.guest_table, vcpu.guest_table_user):
            if old:
                types.put_page_and_type(old)
    vcpu.guest_table, vcpu.guest_table_user = cr3, user
    vcpu.in_kernel = bool(ctx.flags & VGCF_in_kernel) or not user
    vcpu.syscall_masks_events = bool(ctx.flags & VGCF_syscall_disables_events)
    vcpu.trap_ctxt = {t.vector: (t.flags, t.cs, t.address)
                      for t in ctx.trap_ctxt if t.address}
    vcpu.kernel_ss, vcpu.kernel_sp = ctx.kernel_ss, ctx.kernel_sp
    vcpu.event_callback = ctx.event_callback_eip
    vcpu.failsafe_callback = ctx.failsafe_callback_eip
    vcpu.syscall_callback = ctx.syscall_callback_eip
    if vcpu.vcpu_id == 0:
        dom.vm_assist = ctx.vm_assist  # arch_set_info_guest takes vcpu0's
    ur = ctx.user_regs
    regs = {name: getattr(ur, name) for name in _USER_REGS}
    regs["rflags"] |= X86_EFLAGS_IF | X86_EFLAGS_MBS
    vcpu.write_regs(**regs)
    vcpu.load_cr3(vcpu.current_table)
    vcpu.uc.reg_write(UC_X86_REG_FS_BASE, ctx.fs_base)
    vcpu.set_gs_bases(ctx.gs_base_kernel, ctx.gs_base_user)
    vcpu.ctrlreg2 = ctx.ctrlreg[2]
    _load_sse(vcpu, ctx)
    return 0
