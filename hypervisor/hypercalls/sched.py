"""sched_op and set_timer_op (xen/common/sched/core.c)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS
from hypervisor.public.sched import (
    SCHEDOP_block,
    SCHEDOP_shutdown,
    SCHEDOP_shutdown_code,
    SCHEDOP_yield,
    SHUTDOWN_soft_reset,
    SHUTDOWN_suspend,
    sched_shutdown,
)
from hypervisor.scheduler import fire_timer

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

YIELD_NS = 1000  # virtual time a yield stands for


def do_sched_op(vcpu: Vcpu, cmd: int, arg: int, *rest: int) -> int:
    dom = vcpu.domain
    if cmd == SCHEDOP_yield:
        # a VCPU that yields is spinning (waiting for another one): let its
        # virtual time pass, or the deterministic clock would run it forever
        vcpu.clock += YIELD_NS
        vcpu.idle_yields += 1
        vcpu.request_stop()
        return 0
    if cmd == SCHEDOP_block:
        # enable event delivery, then sleep unless an event is already pending
        vi = dom.shared_info.vcpu_info[vcpu.vcpu_id]
        vi.evtchn_upcall_mask = 0
        if not vi.evtchn_upcall_pending:
            vcpu.blocked = True
            vcpu.request_stop()
        return 0
    if cmd in (SCHEDOP_shutdown, SCHEDOP_shutdown_code):
        try:
            reason = sched_shutdown.from_buffer_copy(
                vcpu.copy_from_guest(arg, ctypes.sizeof(sched_shutdown))).reason
        except GuestFault:
            return -EFAULT
        if reason > SHUTDOWN_soft_reset:
            return -EINVAL
        if cmd == SCHEDOP_shutdown_code:
            return 0
        if reason == SHUTDOWN_suspend:
            # x86 PV: rdx (the third argument) holds start_info's mfn and must
            # survive: the toolstack reads it from the VCPU context
            dom.suspend()
            return 0
        dom.shutdown(reason)
        return 0
    return -ENOSYS


def do_set_timer_op(vcpu: Vcpu, timeout: int, *_: int) -> int:
    """One-shot timer at absolute system time ``timeout`` ns; 0 cancels it."""
    vcpu.timer_deadline = timeout
    if timeout and timeout <= vcpu.clock:
        fire_timer(vcpu)
    return 0
