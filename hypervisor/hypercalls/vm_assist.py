"""vm_assist (xen/common/domain.c do_vm_assist): a PV guest turns on or off
the help it wants from the hypervisor, one VMASST_TYPE_* bit of the domain's
vm_assist word at a time. Of the types, pvlab acts on writable_pagetables
(hypervisor/mm/ptwr.py); the others a 64-bit PV guest may set as on Xen."""

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

# the types a 64-bit PV guest may name (Xen's PV64_VM_ASSIST_MASK, asm/domain.h)
PV64_VM_ASSIST_MASK = sum(1 << t for t in (
    VMASST_TYPE_4gb_segments, VMASST_TYPE_4gb_segments_notify,
    VMASST_TYPE_writable_pagetables, VMASST_TYPE_pae_extended_cr3,
    VMASST_TYPE_architectural_iopl, VMASST_TYPE_runstate_update_flag,
    VMASST_TYPE_m2p_strict))
BITS_PER_LONG = 64


def do_vm_assist(vcpu: Vcpu, cmd: int, vmtype: int, *_: int) -> int:
    """The type is checked before the command, as in Xen: an unknown type
    is -EINVAL whatever the command, an unknown command -ENOSYS."""
    cmd &= 0xFFFFFFFF
    vmtype &= 0xFFFFFFFF
    if vmtype >= BITS_PER_LONG or not PV64_VM_ASSIST_MASK >> vmtype & 1:
        return -EINVAL
    dom = vcpu.domain
    if cmd == VMASST_CMD_enable:
        dom.vm_assist |= 1 << vmtype
        return 0
    if cmd == VMASST_CMD_disable:
        dom.vm_assist &= ~(1 << vmtype)
        return 0
    return -ENOSYS
