"""How a PV kernel tells Xen where to enter it: set_callbacks, callback_op,
set_trap_table, stack_switch (xen/arch/x86/pv/callback.c, pv/traps.c)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hypervisor.mm.walker import GuestFault
from hypervisor.public.callback import (
    CALLBACKF_mask_events,
    CALLBACKOP_register,
    CALLBACKOP_unregister,
    CALLBACKTYPE_event,
    CALLBACKTYPE_failsafe,
    CALLBACKTYPE_syscall,
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
    try:
        size = 16 if cmd == CALLBACKOP_register else 2
        raw = vcpu.domain.hypervisor.copy_from_guest(vcpu, arg, size)
    except GuestFault:
        return -EFAULT
    if cmd == CALLBACKOP_register:
        ctype, flags, address = struct.unpack("<HHxxxxQ", raw)
        mask = bool(flags & CALLBACKF_mask_events)
    elif cmd == CALLBACKOP_unregister:
        (ctype,) = struct.unpack("<H", raw)
        address, mask = 0, False
    else:
        return -ENOSYS
    if ctype == CALLBACKTYPE_event:
        vcpu.event_callback = address
    elif ctype == CALLBACKTYPE_failsafe:
        vcpu.failsafe_callback = address
    elif ctype == CALLBACKTYPE_syscall:
        vcpu.syscall_callback = address
        vcpu.syscall_masks_events = mask
    else:
        return -EINVAL
    return 0


def do_set_trap_table(vcpu: Vcpu, traps: int, *_: int) -> int:
    """An array of trap_info {u8 vector; u8 flags; u16 cs; u64 address},
    ended by an entry whose address is 0; a NULL pointer clears the table."""
    if not traps:
        vcpu.trap_ctxt.clear()
        return 0
    hv = vcpu.domain.hypervisor
    for i in range(MAX_TRAPS):
        try:
            vector, flags, cs, address = struct.unpack(
                "<BBHxxxxQ", hv.copy_from_guest(vcpu, traps + 16 * i, 16))
        except GuestFault:
            return -EFAULT
        if address == 0:
            break
        vcpu.trap_ctxt[vector] = (flags, cs, address)
    return 0


def do_stack_switch(vcpu: Vcpu, ss: int, esp: int, *_: int) -> int:
    vcpu.kernel_ss = ss
    vcpu.kernel_sp = esp
    return 0
