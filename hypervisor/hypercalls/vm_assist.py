"""vm_assist (xen/common/domain.c do_vm_assist): a domain turns on or off one
of the assists the hypervisor may give it. pvlab records them (they travel in
vcpu0's context, as Xen's arch_get_info_guest writes d->vm_assist there); the
memory code does not change behaviour with them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.public.errno import EINVAL, ENOSYS
from hypervisor.public.xen import (
    VMASST_CMD_disable,
    VMASST_CMD_enable,
    VMASST_TYPE_4gb_segments,
    VMASST_TYPE_4gb_segments_notify,
    VMASST_TYPE_architectural_iopl,
    VMASST_TYPE_m2p_strict,
    VMASST_TYPE_pae_extended_cr3,
    VMASST_TYPE_runstate_update_flag,
    VMASST_TYPE_writable_pagetables,
)

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

# the types a 64-bit PV domain may set (Xen's PV64_VM_ASSIST_MASK)
PV64_VM_ASSIST_MASK = sum(1 << t for t in (
    VMASST_TYPE_4gb_segments, VMASST_TYPE_4gb_segments_notify,
    VMASST_TYPE_writable_pagetables, VMASST_TYPE_pae_extended_cr3,
    VMASST_TYPE_architectural_iopl, VMASST_TYPE_runstate_update_flag,
    VMASST_TYPE_m2p_strict))


def do_vm_assist(vcpu: Vcpu, cmd: int, vm_type: int, *_: int) -> int:
    dom = vcpu.domain
    vm_type &= 0xFFFFFFFF
    if vm_type >= 64 or not PV64_VM_ASSIST_MASK >> vm_type & 1:
        return -EINVAL
    if cmd == VMASST_CMD_enable:
        dom.vm_assist |= 1 << vm_type
        return 0
    if cmd == VMASST_CMD_disable:
        dom.vm_assist &= ~(1 << vm_type)
        return 0
    return -ENOSYS
