"""vcpu_op (xen/common/domain.c do_vcpu_op): bring secondary VCPUs up and down."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.cpu.context import CONTEXT_SIZE, set_context
from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EEXIST, EFAULT, EINVAL, ENOENT, ENOSYS
from hypervisor.public.vcpu import VCPUOP_down, VCPUOP_initialise, VCPUOP_is_up, VCPUOP_up

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu


def do_vcpu_op(vcpu: Vcpu, cmd: int, vcpuid: int, arg: int, *_: int) -> int:
    dom = vcpu.domain
    vcpuid &= 0xFFFFFFFF
    if vcpuid >= len(dom.vcpus):
        return -ENOENT
    target = dom.vcpus[vcpuid]
    if cmd == VCPUOP_initialise:
        if target.initialised:
            return -EEXIST
        try:
            raw = vcpu.copy_from_guest(arg, CONTEXT_SIZE)
        except GuestFault:
            return -EFAULT
        rc = set_context(target, raw)
        if rc == 0:
            target.initialised = True
        return rc
    if cmd == VCPUOP_up:
        if not target.initialised:
            return -EINVAL
        if not target.online:
            target.online = True
            target.clock = max(target.clock, vcpu.clock)
        return 0
    if cmd == VCPUOP_down:
        target.online = False
        target.request_stop()
        return 0
    if cmd == VCPUOP_is_up:
        return int(target.online)
    return -ENOSYS
