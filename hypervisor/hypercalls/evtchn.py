"""event_channel_op (xen/common/event_channel.c do_event_channel_op)."""

from __future__ import annotations

import struct
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
)
from hypervisor.public.xen import NR_VIRQS, VIRQ_TIMER

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

# argument struct sizes (event_channel.h)
_SIZES = {EVTCHNOP_bind_virq: 12, EVTCHNOP_bind_ipi: 8, EVTCHNOP_close: 4, EVTCHNOP_send: 4,
          EVTCHNOP_unmask: 4, EVTCHNOP_alloc_unbound: 8, EVTCHNOP_bind_vcpu: 8}
# per-vcpu virqs may be bound on any vcpu, global ones only on vcpu 0
PER_VCPU_VIRQS = {VIRQ_TIMER, 1, 6}  # TIMER, DEBUG, XENOPROF


def do_event_channel_op(vcpu: Vcpu, cmd: int, arg: int, *_: int) -> int:
    size = _SIZES.get(cmd)
    if size is None:
        return -ENOSYS
    hv = vcpu.domain.hypervisor
    ev = vcpu.domain.evtchn
    try:
        raw = hv.copy_from_guest(vcpu, arg, size)
    except GuestFault:
        return -EFAULT
    out: tuple[int, int] | None = None  # (offset, port) written back on success
    if cmd == EVTCHNOP_bind_virq:
        virq, target, _ = struct.unpack("<III", raw)
        if virq >= NR_VIRQS or (virq not in PER_VCPU_VIRQS and target != 0):
            return -EINVAL
        rc = ev.bind_virq(virq, target)
        out = (8, rc)
    elif cmd == EVTCHNOP_bind_ipi:
        target, _ = struct.unpack("<II", raw)
        rc = ev.bind_ipi(target)
        out = (4, rc)
    elif cmd == EVTCHNOP_alloc_unbound:
        _dom, remote, _ = struct.unpack("<HHI", raw)
        rc = ev.alloc_unbound(remote)
        out = (4, rc)
    elif cmd == EVTCHNOP_bind_vcpu:
        port, target = struct.unpack("<II", raw)
        rc = ev.bind_vcpu(port, target)
    else:
        (port,) = struct.unpack("<I", raw)
        if cmd == EVTCHNOP_close:
            rc = ev.close(port)
        elif cmd == EVTCHNOP_send:
            rc = ev.send(port)
        else:
            rc = ev.unmask(port)
    if out is not None:
        if out[1] < 0:
            return out[1]
        try:
            hv.copy_to_guest(vcpu, arg + out[0], struct.pack("<I", out[1]))
        except GuestFault:
            return -EFAULT
        return 0
    return rc if rc is not None else -EINVAL
