"""How a PV kernel tells Xen where to enter it: set_callbacks, callback_op,
set_trap_table, stack_switch (xen/arch/x86/pv/callback.c, pv/traps.c)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from hypervisor.mm.walker import GuestFault
from hypervisor.public.arch_x86 import trap_info
from hypervisor.public.callback import (
    CALLBACKF_mask_events,
    CALLBACKOP_register,
    CALLBACKOP_unregister,
    CALLBACKTYPE_event,
    CALLBACKTYPE_failsafe,
    CALLBACKTYPE_syscall,
    callback_register,
    callback_unregister,
)
from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

MAX_TRAPS = 256


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
        return -ENOSYS
    try:
        op = struct_type.from_buffer_copy(vcpu.copy_from_guest(arg, ctypes.sizeof(struct_type)))
    except GuestFault:
        return -EFAULT
    if cmd == CALLBACKOP_register:
        address, mask = op.address, bool(op.flags & CALLBACKF_mask_events)
    else:
        address, mask = 0, False
    if op.type == CALLBACKTYPE_event:
        vcpu.event_callback = address
    elif op.type == CALLBACKTYPE_failsafe:
        vcpu.failsafe_callback = address
    elif op.type == CALLBACKTYPE_syscall:
        vcpu.syscall_callback = address
        vcpu.syscall_masks_events = mask
    else:
        return -EINVAL
    return 0


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
        vcpu.trap_ctxt[t.vector] = (t.flags, t.cs, t.address)
    return 0


def do_stack_switch(vcpu: Vcpu, ss: int, esp: int, *_: int) -> int:
    vcpu.kernel_ss = ss
    vcpu.kernel_sp = esp
    return 0
