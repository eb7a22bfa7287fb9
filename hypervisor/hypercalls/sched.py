"""sched_op and set_timer_op (xen/common/sched/core.c)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

from hypervisor.mm.walker import GuestFault, addr_ok
from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS, EPERM, ESRCH
from hypervisor.public.sched import (
    SCHEDOP_block,
    SCHEDOP_pin_override,
    SCHEDOP_poll,
    SCHEDOP_remote_shutdown,
    SCHEDOP_shutdown,
    SCHEDOP_shutdown_code,
    SCHEDOP_watchdog,
    SCHEDOP_yield,
    sched_poll,
    sched_remote_shutdown,
    sched_shutdown,
    sched_watchdog,
)
from hypervisor.scheduler import fire_timer

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

YIELD_NS = 1000  # virtual time a yield stands for
POLL_MAX_PORTS = 128  # do_poll's "fairly arbitrary limit"
_ARGS: dict[int, type[ctypes.LittleEndianStructure]] = {
    SCHEDOP_shutdown: sched_shutdown, SCHEDOP_shutdown_code: sched_shutdown,
    SCHEDOP_poll: sched_poll, SCHEDOP_remote_shutdown: sched_remote_shutdown,
    SCHEDOP_watchdog: sched_watchdog}


def do_sched_op(vcpu: Vcpu, cmd: int, arg: int, *rest: int) -> int:
    if cmd == SCHEDOP_yield:
        # a VCPU that yields is spinning (waiting for another one): let its
        # virtual time pass, or the deterministic clock would run it forever
        vcpu.clock += YIELD_NS
        vcpu.idle_yields += 1
        vcpu.request_stop()
        return 0
    if cmd == SCHEDOP_block:
        # enable event delivery, then sleep unless an event is already pending
        vi = vcpu.domain.shared_info.vcpu_info[vcpu.vcpu_id]
        vi.evtchn_upcall_mask = 0
        if not vi.evtchn_upcall_pending:
            vcpu.blocked = True
            vcpu.request_stop()
        return 0
    if cmd == SCHEDOP_pin_override:
        return -EPERM  # the hardware domain's alone, refused before the argument
    struct_type = _ARGS.get(cmd)
    if struct_type is None:
        return -ENOSYS
    op = vcpu.copy_struct_from_guest(struct_type, arg)
    if op is None:
        return -EFAULT
    return _with_arg(vcpu, cmd, op)


def _with_arg(vcpu: Vcpu, cmd: int, op: Any) -> int:
    dom = vcpu.domain
    if cmd == SCHEDOP_shutdown:
        # any reason, as a byte (domain_shutdown takes a u8). A suspend keeps
        # rdx (start_info's mfn on x86 PV): the toolstack reads it from the
        # VCPU context
        dom.shutdown(op.reason & 0xFF)
        return 0
    if cmd == SCHEDOP_shutdown_code:
        if dom.shutdown_code is None:  # the first code stays
            dom.shutdown_code = op.reason & 0xFF
        return 0
    if cmd == SCHEDOP_poll:
        return do_poll(vcpu, op)
    if cmd == SCHEDOP_remote_shutdown:
        # rcu_lock_domain_by_id (DOMID_SELF is no id here), then the dummy XSM
        # policy's XSM_DM_PRIV: a domU may shut no domain down, itself included
        return -ESRCH if dom.domain_by_id(op.domain_id) is None else -EPERM
    return dom.watchdog.op(op.id, op.timeout)


def do_poll(vcpu: Vcpu, op: Any) -> int:
    """Xen's do_poll: 0 at once if an event is to be delivered or one of the
    ports is pending; else the VCPU blocks until one of them is set pending
    (any port, for a list of other than one), an event is delivered to it, or
    system time ``timeout`` passes; it returns 0 then."""
    if op.nr_ports > POLL_MAX_PORTS:
        return -EINVAL
    if not addr_ok(op.ports):
        return -EFAULT  # guest_handle_okay
    dom = vcpu.domain
    vi = dom.shared_info.vcpu_info[vcpu.vcpu_id]
    if vi.evtchn_upcall_pending and not vi.evtchn_upcall_mask:
        return 0  # local_events_need_delivery
    port = 0
    for i in range(op.nr_ports):
        try:
            port = int.from_bytes(vcpu.copy_from_guest(op.ports + 4 * i, 4), "little")
        except GuestFault:
            return -EFAULT
        if not dom.evtchn.valid(port):
            return -EINVAL
        if dom.evtchn.is_pending(port):
            return 0
    vcpu.poll_evtchn = port if op.nr_ports == 1 else -1
    vcpu.poll_deadline = op.timeout
    vcpu.blocked = True
    vcpu.request_stop()
    return 0


WRAPPED_TIMEOUT_NS = 100_000_000  # where Xen sets a wrapped timeout instead


def do_set_timer_op(vcpu: Vcpu, timeout: int, *_: int) -> int:
    """One-shot timer at absolute system time ``timeout`` ns; 0 cancels it.
    A timeout that is negative as s_time_t, or more than 2^50 ns (13 days)
    ahead, is Linux's wrapped jiffies: Xen sets the timer 100 ms from now
    rather than at once or never (do_set_timer_op)."""
    now = vcpu.domain.scheduler.now()
    offset = timeout - now  # timeout as s_time_t: below 2^63 when it gets here
    if timeout and (timeout >> 63 or (offset > 0 and (offset >> 50) & 0xFFFFFFFF)):
        timeout = now + WRAPPED_TIMEOUT_NS
    vcpu.timer_deadline = timeout
    if timeout and timeout <= vcpu.clock:
        fire_timer(vcpu)
    return 0
