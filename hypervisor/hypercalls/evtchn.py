"""event_channel_op (xen/common/event_channel.c do_event_channel_op)."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

from hypervisor.evtchn import PER_VCPU_VIRQS, Port, PortState
from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS, EPERM, ESRCH
from hypervisor.public.event_channel import (
    EVTCHNOP_alloc_unbound,
    EVTCHNOP_bind_interdomain,
    EVTCHNOP_bind_ipi,
    EVTCHNOP_bind_vcpu,
    EVTCHNOP_bind_virq,
    EVTCHNOP_close,
    EVTCHNOP_send,
    EVTCHNOP_status,
    EVTCHNOP_unmask,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_ipi,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_virq,
    evtchn_alloc_unbound,
    evtchn_bind_interdomain,
    evtchn_bind_ipi,
    evtchn_bind_vcpu,
    evtchn_bind_virq,
    evtchn_close,
    evtchn_send,
    evtchn_status,
    evtchn_unmask,
)
from hypervisor.public.xen import DOMID_SELF, NR_VIRQS

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

# the argument struct of each command
_ARGS: dict[int, type[ctypes.LittleEndianStructure]] = {
    EVTCHNOP_bind_virq: evtchn_bind_virq, EVTCHNOP_bind_ipi: evtchn_bind_ipi,
    EVTCHNOP_close: evtchn_close, EVTCHNOP_send: evtchn_send, EVTCHNOP_unmask: evtchn_unmask,
    EVTCHNOP_alloc_unbound: evtchn_alloc_unbound, EVTCHNOP_bind_vcpu: evtchn_bind_vcpu,
    EVTCHNOP_status: evtchn_status, EVTCHNOP_bind_interdomain: evtchn_bind_interdomain}

_STATUS = {PortState.free: EVTCHNSTAT_closed, PortState.reserved: EVTCHNSTAT_closed,
           PortState.unbound: EVTCHNSTAT_unbound, PortState.interdomain: EVTCHNSTAT_interdomain,
           PortState.virq: EVTCHNSTAT_virq, PortState.ipi: EVTCHNSTAT_ipi}


def do_event_channel_op(vcpu: Vcpu, cmd: int, arg: int, *_: int) -> int:
    struct_type = _ARGS.get(cmd)
    if struct_type is None:
        return -ENOSYS
    op = vcpu.copy_struct_from_guest(struct_type, arg)
    if op is None:
        return -EFAULT
    ev = vcpu.domain.evtchn
    if cmd == EVTCHNOP_bind_virq:
        if op.virq >= NR_VIRQS or (op.virq not in PER_VCPU_VIRQS and op.vcpu != 0):
            return -EINVAL
        return _port_out(vcpu, arg, op, ev.bind_virq(op.virq, op.vcpu))
    if cmd == EVTCHNOP_bind_ipi:
        return _port_out(vcpu, arg, op, ev.bind_ipi(op.vcpu))
    if cmd == EVTCHNOP_alloc_unbound:
        return _alloc_unbound(vcpu, arg, op)
    if cmd == EVTCHNOP_bind_interdomain:
        return _bind_interdomain(vcpu, arg, op)
    if cmd == EVTCHNOP_status:
        return _status(vcpu, arg, op)
    if cmd == EVTCHNOP_bind_vcpu:
        return ev.bind_vcpu(op.port, op.vcpu)
    if cmd == EVTCHNOP_close:
        return ev.close(op.port)
    if cmd == EVTCHNOP_send:
        return ev.send(op.port)
    return ev.unmask(op.port)


def _by_any_id(vcpu: Vcpu, domid: int) -> Any:
    """Xen's rcu_lock_domain_by_any_id: DOMID_SELF or an existing domain."""
    return vcpu.domain if domid == DOMID_SELF else vcpu.domain.domain_by_id(domid)


def _alloc_unbound(vcpu: Vcpu, arg: int, op: Any) -> int:
    """evtchn_alloc_unbound: ``dom`` must exist (-ESRCH) and be the caller
    (xsm_evtchn_unbound, XSM_TARGET: -EPERM for another domain); the remote
    domain is not looked up, DOMID_SELF there means the caller."""
    d = _by_any_id(vcpu, op.dom)
    if d is None:
        return -ESRCH
    if d is not vcpu.domain:
        return -EPERM
    remote = vcpu.domain.domid if op.remote_dom == DOMID_SELF else op.remote_dom
    return _port_out(vcpu, arg, op, d.evtchn.alloc_unbound(remote))


def _bind_interdomain(vcpu: Vcpu, arg: int, op: Any) -> int:
    remote = _by_any_id(vcpu, op.remote_dom)
    if remote is None:
        return -ESRCH
    port = vcpu.domain.evtchn.bind_interdomain(remote, op.remote_port)
    if port < 0:
        return port
    op.local_port = port
    return _copy_back(vcpu, arg, op)


def _status(vcpu: Vcpu, arg: int, op: Any) -> int:
    """evtchn_status: the port's state, the vcpu it notifies and, by state,
    the remote end or the virq (xsm_evtchn_status, XSM_TARGET: only one's own)."""
    d = _by_any_id(vcpu, op.dom)
    if d is None:
        return -ESRCH
    p = d.evtchn.status(op.port)
    if isinstance(p, int):
        return p
    if d is not vcpu.domain:
        return -EPERM
    _fill_status(op, p)
    return _copy_back(vcpu, arg, op)


def _fill_status(op: Any, p: Port) -> None:
    op.status = _STATUS[p.state]
    op.vcpu = p.vcpu
    if p.state == PortState.unbound:
        op.u.unbound_dom = p.remote_dom
    elif p.state == PortState.interdomain:
        op.u.interdomain.dom = p.remote_dom
        op.u.interdomain.port = p.remote_port
    elif p.state == PortState.virq:
        op.u.virq = p.virq


def _copy_back(vcpu: Vcpu, arg: int, op: ctypes.LittleEndianStructure) -> int:
    try:
        vcpu.copy_to_guest(arg, bytes(op))
    except GuestFault:
        return -EFAULT
    return 0


def _port_out(vcpu: Vcpu, arg: int, op: ctypes.LittleEndianStructure, port: int) -> int:
    """A new port goes back in the caller's struct, as Xen copies the whole
    struct back; an error goes back as the result alone."""
    if port < 0:
        return port
    op.port = port  # type: ignore[attr-defined]
    return _copy_back(vcpu, arg, op)
