"""How a PV kernel tells Xen where to enter it: set_callbacks, callback_op,
set_trap_table, stack_switch (xen/arch/x86/pv/callback.c, pv/traps.c)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

from hypervisor.mm.walker import GuestFault, is_canonical_address
from hypervisor.public.arch_x86 import FLAT_KERNEL_CS64, TI_IF, trap_info
from hypervisor.public.callback import (
    CALLBACKF_mask_events,
    CALLBACKOP_register,
    CALLBACKOP_unregister,
    CALLBACKTYPE_event,
    CALLBACKTYPE_failsafe,
    CALLBACKTYPE_nmi,
    CALLBACKTYPE_syscall,
    CALLBACKTYPE_syscall32,
    CALLBACKTYPE_sysenter,
    callback_register,
    callback_unregister,
)
from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

MAX_TRAPS = 256
X86_EXC_NMI = 2


def do_set_callbacks(vcpu: Vcpu, event: int, failsafe: int, syscall: int, *_: int) -> int:
    vcpu.event_callback = event
    vcpu.failsafe_callback = failsafe
    vcpu.syscall_callback = syscall
    return 0


def do_callback_op(vcpu: Vcpu, cmd: int, arg: int, *_: int) -> int:
    if cmd == CALLBACKOP_register:
        struct_type: type[ctypes.LittleEndianStructure] = callback_register
    elif cmd == CALLBACKOP_unregister:
        struct_type = callback_unregister
    else:
        return -ENOSYS  # the argument is never read
    op = vcpu.copy_struct_from_guest(struct_type, arg)
    if op is None:
        return -EFAULT
    if cmd == CALLBACKOP_register:
        return register_guest_callback(vcpu, op)
    return unregister_guest_callback(vcpu, op)


def register_guest_callback(vcpu: Vcpu, op: Any) -> int:
    """Xen's register_guest_callback: a canonical address, whatever the type.
    syscall32 and sysenter are kept though a 64-bit guest never enters through
    them; the NMI callback is the trap table's NMI entry (an NMI reason, which
    pvlab's machine never has, would also make one pending on vcpu0)."""
    if not is_canonical_address(op.address):
        return -EINVAL
    mask = bool(op.flags & CALLBACKF_mask_events)
    if op.type == CALLBACKTYPE_event:
        vcpu.event_callback = op.address
    elif op.type == CALLBACKTYPE_failsafe:
        vcpu.failsafe_callback = op.address
    elif op.type == CALLBACKTYPE_syscall:
        vcpu.syscall_callback = op.address
        vcpu.syscall_masks_events = mask
    elif op.type == CALLBACKTYPE_syscall32:
        vcpu.syscall32_callback = (op.address, mask)
    elif op.type == CALLBACKTYPE_sysenter:
        vcpu.sysenter_callback = (op.address, mask)
    elif op.type == CALLBACKTYPE_nmi:
        vcpu.trap_ctxt[X86_EXC_NMI] = (TI_IF, FLAT_KERNEL_CS64, op.address)
    else:
        return -ENOSYS
    return 0


def unregister_guest_callback(vcpu: Vcpu, op: Any) -> int:
    """Xen's unregister_guest_callback: only the NMI callback can go."""
    if op.type == CALLBACKTYPE_nmi:
        vcpu.trap_ctxt.pop(X86_EXC_NMI, None)
        return 0
    if op.type in (CALLBACKTYPE_event, CALLBACKTYPE_failsafe, CALLBACKTYPE_syscall,
                   CALLBACKTYPE_syscall32, CALLBACKTYPE_sysenter):
        return -EINVAL
    return -ENOSYS


def do_set_trap_table(vcpu: Vcpu, traps: int, *_: int) -> int:
    """An array of trap_info, ended by an entry whose address is 0; a NULL
    pointer clears the table."""
    if not traps:
        vcpu.trap_ctxt.clear()
        return 0
    size = ctypes.sizeof(trap_info)
    for i in range(MAX_TRAPS):
        try:
            t = trap_info.from_buffer_copy(vcpu.copy_from_guest(traps + size * i, size))
        except GuestFault:
            return -EFAULT
        if t.address == 0:
            break
        if not is_canonical_address(t.address):
            return -EINVAL  # the entries before it stay
        vcpu.trap_ctxt[t.vector] = (t.flags, t.cs, t.address)
    return 0


def do_stack_switch(vcpu: Vcpu, ss: int, esp: int, *_: int) -> int:
    vcpu.kernel_ss = ss
    vcpu.kernel_sp = esp
    return 0
