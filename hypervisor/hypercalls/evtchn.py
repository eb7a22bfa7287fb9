"""event_channel_op (xen/common/event_channel.c do_event_channel_op)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS
from hypervisor.public.event_channel import (
    EVTCHNOP_alloc_unbound,
    EVTCHNOP_bind_ipi,
    EVTCHNOP_bind_vcpu,
    EVTCHNOP_bind_virq,
    EVTCHNOP_close,
    EVTCHNOP_send,
    EVTCHNOP_unmask,
    evtchn_alloc_unbound,
    evtchn_bind_ipi,
    evtchn_bind_vcpu,
    evtchn_bind_virq,
    evtchn_close,
    evtchn_send,
    evtchn_unmask,
)
from hypervisor.public.xen import NR_VIRQS, VIRQ_DEBUG, VIRQ_TIMER, VIRQ_XENOPROF, VIRQ_XENPMU

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

# the argument struct of each command
_ARGS: dict[int, type[ctypes.LittleEndianStructure]] = {
    EVTCHNOP_bind_virq: evtchn_bind_virq, EVTCHNOP_bind_ipi: evtchn_bind_ipi,
    EVTCHNOP_close: evtchn_close, EVTCHNOP_send: evtchn_send, EVTCHNOP_unmask: evtchn_unmask,
    EVTCHNOP_alloc_unbound: evtchn_alloc_unbound, EVTCHNOP_bind_vcpu: evtchn_bind_vcpu}

# per-vcpu virqs may be bound on any vcpu, global ones only on vcpu 0 (Xen's
# virq_is_global)
PER_VCPU_VIRQS = {VIRQ_TIMER, VIRQ_DEBUG, VIRQ_XENOPROF, VIRQ_XENPMU}


def do_event_channel_op(vcpu: Vcpu, cmd: int, arg: int, *_: int) -> int:
    struct_type = _ARGS.get(cmd)
    if struct_type is None:
        return -ENOSYS
    try:
        op = struct_type.from_buffer_copy(vcpu.copy_from_guest(arg, ctypes.sizeof(struct_type)))
    except GuestFault:
        return -EFAULT
    ev = vcpu.domain.evtchn
    if cmd == EVTCHNOP_bind_virq:
        if op.virq >= NR_VIRQS or (op.virq not in PER_VCPU_VIRQS and op.vcpu != 0):
            return -EINVAL
        return _port_out(vcpu, arg, op, ev.bind_virq(op.virq, op.vcpu))
    if cmd == EVTCHNOP_bind_ipi:
        return _port_out(vcpu, arg, op, ev.bind_ipi(op.vcpu))
    if cmd == EVTCHNOP_alloc_unbound:
        return _port_out(vcpu, arg, op, ev.alloc_unbound(op.remote_dom))
    if cmd == EVTCHNOP_bind_vcpu:
        return ev.bind_vcpu(op.port, op.vcpu)
    if cmd == EVTCHNOP_close:
        return ev.close(op.port)
    if cmd == EVTCHNOP_send:
        return ev.send(op.port)
    return ev.unmask(op.port)


def _port_out(vcpu: Vcpu, arg: int, op: ctypes.LittleEndianStructure, port: int) -> int:
    """A new port goes back in the caller's struct, as Xen copies the whole
    struct back; an error goes back as the result alone."""
    if port < 0:
        return port
    op.port = port  # type: ignore[attr-defined]
    try:
        vcpu.copy_to_guest(arg, bytes(op))
    except GuestFault:
        return -EFAULT
    return 0

