"""vm_assist (common/domain.c do_vm_assist): the assists a PV guest turns on,
kept in the domain's vm_assist word and carried in vcpu 0's context."""

from __future__ import annotations

from hypervisor import domctl
from hypervisor.public.errno import EINVAL, ENOSYS
from hypervisor.public.xen import (
    Hypercall,
    VMASST_CMD_disable,
    VMASST_CMD_enable,
    VMASST_TYPE_m2p_strict,
    VMASST_TYPE_writable_pagetables,
)


def test_vm_assist_enables_and_disables_known_types(booted):
    """do_vm_assist (common/domain.c): a type outside PV64_VM_ASSIST_MASK is
    -EINVAL before the command is looked at; an unknown command -ENOSYS."""
    hv, dom = booted()
    v = dom.vcpus[0]

    def vm_assist(cmd: int, vmtype: int) -> int:
        return hv.hypercall(v, Hypercall.vm_assist, (cmd, vmtype))

    assert vm_assist(VMASST_CMD_enable, VMASST_TYPE_writable_pagetables) == 0
    assert vm_assist(VMASST_CMD_enable, VMASST_TYPE_m2p_strict) == 0
    assert dom.vm_assist == 1 << 2 | 1 << 32
    assert vm_assist(VMASST_CMD_disable, VMASST_TYPE_m2p_strict) == 0
    assert dom.vm_assist == 1 << 2
    assert vm_assist(VMASST_CMD_enable, 6) == -EINVAL
    assert vm_assist(VMASST_CMD_enable, 64) == -EINVAL
    assert vm_assist(2, 6) == -EINVAL
    assert vm_assist(2, VMASST_TYPE_writable_pagetables) == -ENOSYS
    assert dom.vm_assist == 1 << 2


def test_vm_assist_rides_in_vcpu0s_context(booted):
    """Every vcpu's context carries the domain's vm_assist word, and vcpu 0's
    sets it (arch_get_info_guest / arch_set_info_guest), so a restored guest
    keeps its writable pagetables; unknown bits are -EINVAL."""
    hv, dom = booted()
    assert hv.hypercall(dom.vcpus[0], Hypercall.vm_assist,
                        (VMASST_CMD_enable, VMASST_TYPE_writable_pagetables)) == 0
    ctx = domctl.getvcpucontext(dom, 0)
    assert ctx.vm_assist == 1 << VMASST_TYPE_writable_pagetables
    ctx.vm_assist = 0
    assert domctl.setvcpucontext(dom, 0, ctx) == 0
    assert dom.vm_assist == 0
    ctx.vm_assist = 1 << VMASST_TYPE_writable_pagetables
    assert domctl.setvcpucontext(dom, 0, ctx) == 0
    assert dom.vm_assist == 1 << VMASST_TYPE_writable_pagetables
    ctx.vm_assist = 1 << 6
    assert domctl.setvcpucontext(dom, 0, ctx) == -EINVAL
    assert dom.vm_assist == 1 << VMASST_TYPE_writable_pagetables
