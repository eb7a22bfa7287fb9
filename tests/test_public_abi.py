"""The public ABI matches Xen's headers: struct sizes and offsets as gcc lays
them out for x86-64 (xen/include/public/*.h), hypercall numbers, errno values."""

from __future__ import annotations

import ctypes

from hypervisor.public import arch_x86, callback, errno, event_channel, sched, version, xen
from hypervisor.public.arch_x86 import cpu_user_regs, trap_info, vcpu_guest_context
from hypervisor.public.native import pvlab_image_header
from hypervisor.public.xen import (
    Hypercall,
    mmu_update,
    mmuext_op,
    shared_info,
    start_info,
    vcpu_info,
)


def off(struct, field):
    return getattr(struct, field).offset


def test_struct_sizes():
    assert ctypes.sizeof(start_info) == 1168
    assert ctypes.sizeof(shared_info) == 3136
    assert ctypes.sizeof(vcpu_info) == 64
    assert ctypes.sizeof(vcpu_guest_context) == 5168
    assert ctypes.sizeof(cpu_user_regs) == 200
    assert ctypes.sizeof(trap_info) == 16
    assert ctypes.sizeof(mmu_update) == 16
    assert ctypes.sizeof(mmuext_op) == 24
    assert ctypes.sizeof(arch_x86.iret_context) == 72
    assert ctypes.sizeof(pvlab_image_header) == 72


def test_shadow_op_layout():
    """struct xen_domctl_shadow_op (domctl.h): the bitmap handle 64-bit aligned."""
    from hypervisor.public.domctl import xen_domctl_shadow_op
    assert ctypes.sizeof(xen_domctl_shadow_op) == 40
    assert off(xen_domctl_shadow_op, "dirty_bitmap") == 16
    assert off(xen_domctl_shadow_op, "pages") == 24
    assert off(xen_domctl_shadow_op, "stats") == 32


def test_hypercall_argument_struct_sizes():
    """The structs hypercall arguments are read through (callback.h,
    event_channel.h, sched.h, xen.h, version.h)."""
    assert ctypes.sizeof(callback.callback_register) == 16
    assert callback.callback_register.address.offset == 8
    assert ctypes.sizeof(callback.callback_unregister) == 4
    assert ctypes.sizeof(event_channel.evtchn_bind_virq) == 12
    assert event_channel.evtchn_bind_virq.port.offset == 8
    assert ctypes.sizeof(event_channel.evtchn_bind_ipi) == 8
    assert event_channel.evtchn_bind_ipi.port.offset == 4
    assert ctypes.sizeof(event_channel.evtchn_alloc_unbound) == 8
    assert event_channel.evtchn_alloc_unbound.port.offset == 4
    assert ctypes.sizeof(event_channel.evtchn_bind_vcpu) == 8
    for op in (event_channel.evtchn_close, event_channel.evtchn_send,
               event_channel.evtchn_unmask):
        assert ctypes.sizeof(op) == 4
    assert ctypes.sizeof(sched.sched_shutdown) == 4
    assert ctypes.sizeof(xen.multicall_entry) == xen.MULTICALL_ENTRY_SIZE == 64
    assert xen.multicall_entry.result.offset == 8 and xen.multicall_entry.args.offset == 16
    assert ctypes.sizeof(xen.domid_t) == 2 and ctypes.sizeof(xen.xen_pfn_t) == 8
    assert ctypes.sizeof(version.xen_compile_info) == 144
    assert ctypes.sizeof(version.xen_platform_parameters) == 8
    assert ctypes.sizeof(version.xen_feature_info) == 8


def test_offsets():
    assert off(start_info, "shared_info") == 40
    assert off(start_info, "store_mfn") == 56 and off(start_info, "store_evtchn") == 64
    assert off(start_info, "console") == 72
    assert off(start_info, "pt_base") == 88 and off(start_info, "mfn_list") == 104
    assert off(start_info, "cmd_line") == 128 and off(start_info, "nr_p2m_frames") == 1160
    assert off(shared_info, "evtchn_pending") == 2048 and off(shared_info, "evtchn_mask") == 2560
    assert off(shared_info, "arch") == 3088
    assert off(vcpu_info, "evtchn_pending_sel") == 8 and off(vcpu_info, "time") == 32
    assert off(vcpu_guest_context, "user_regs") == 520
    assert off(vcpu_guest_context, "trap_ctxt") == 720
    assert off(vcpu_guest_context, "kernel_sp") == 4976
    assert off(vcpu_guest_context, "ctrlreg") == 4984
    assert off(vcpu_guest_context, "event_callback_eip") == 5112
    assert off(vcpu_guest_context, "gs_base_user") == 5160
    assert off(cpu_user_regs, "rax") == 80 and off(cpu_user_regs, "rdx") == 96
    assert off(cpu_user_regs, "rip") == 128 and off(cpu_user_regs, "cs") == 136
    assert off(cpu_user_regs, "saved_upcall_mask") == 140
    assert off(cpu_user_regs, "rflags") == 144 and off(cpu_user_regs, "gs") == 192


def test_numbers():
    assert (Hypercall.set_trap_table, Hypercall.mmu_update, Hypercall.console_io) == (0, 1, 18)
    assert (Hypercall.iret, Hypercall.vcpu_op, Hypercall.mmuext_op) == (23, 24, 26)
    assert (Hypercall.sched_op, Hypercall.event_channel_op) == (29, 32)
    assert (errno.EPERM, errno.ESRCH, errno.EFAULT, errno.EBUSY) == (1, 3, 14, 16)
    assert (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) == (22, 38, 95)
    assert errno.errno_name(-22) == "-EINVAL"
    assert xen.DOMID_SELF == 0x7FF0 and xen.NR_EVENT_CHANNELS == 4096
    assert arch_x86.FLAT_RING3_CS64 == 0xE033 and arch_x86.FLAT_RING3_SS64 == 0xE02B


def test_the_hypervisors_native_cpu_offers_the_whole_public_protocol():
    """A native kernel function may use every member of public/native.py's
    NativeCpu; the hypervisor's own NativeCpu must have each of them."""
    import typing

    from hypervisor import native
    from hypervisor.public.native import NativeCpu
    members = set(typing.get_type_hints(NativeCpu)) | {
        name for name, value in vars(NativeCpu).items()
        if callable(value) and not name.startswith("_")}
    assert members and all(hasattr(native.NativeCpu, m) for m in members), \
        sorted(m for m in members if not hasattr(native.NativeCpu, m))
