"""xen_version (xen/common/kernel.c do_xen_version), with the answers the dummy
XSM policy (include/xsm/dummy.h xsm_xen_version) gives a domU: the command
line is "<denied>" and the build id refused; every other sub-op answers."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from hypervisor.mm.memory import PAGE_SIZE
from hypervisor.mm.walker import GuestFault
from hypervisor.public.arch_x86 import HYPERVISOR_VIRT_START
from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS, EPERM
from hypervisor.public.version import (
    XEN_CAPABILITIES_INFO_LEN,
    XEN_CHANGESET_INFO_LEN,
    XEN_EXTRAVERSION_LEN,
    XENFEAT_direct_mapped,
    XENFEAT_dm_msix_all_writes,
    XENFEAT_gnttab_map_avail_bits,
    XENFEAT_highmem_assist,
    XENFEAT_memory_op_vnode_supported,
    XENFEAT_mmu_pt_update_preserve_ad,
    XENFEAT_pae_pgdir_above_4gb,
    XENFEAT_runstate_phys_area,
    XENFEAT_vcpu_time_phys_area,
    xen_compile_info,
    xen_feature_info,
    xen_platform_parameters,
)
from hypervisor.public.xen import (
    VMASST_TYPE_pae_extended_cr3,
    XENVER_build_id,
    XENVER_capabilities,
    XENVER_changeset,
    XENVER_commandline,
    XENVER_compile_info,
    XENVER_extraversion,
    XENVER_get_features,
    XENVER_guest_handle,
    XENVER_pagesize,
    XENVER_platform_parameters,
    XENVER_version,
)

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

XEN_MAJOR, XEN_MINOR = 4, 19  # the ABI modelled: Xen 4.19's public headers
EXTRAVERSION = b"-pvlab"
CAPABILITIES = b"xen-3.0-x86_64"
CHANGESET = b"pvlab"
DENIED = b"<denied>\0"  # xen_deny(): what a guest the policy refuses reads
# submap 0 for a PV guest that is not the hardware domain: the features every
# domain has, those of x86 PV, and direct-mapped as it is not translated
PV_FEATURES = sum(1 << b for b in (
    XENFEAT_memory_op_vnode_supported, XENFEAT_vcpu_time_phys_area,
    XENFEAT_runstate_phys_area, XENFEAT_mmu_pt_update_preserve_ad, XENFEAT_highmem_assist,
    XENFEAT_gnttab_map_avail_bits, XENFEAT_dm_msix_all_writes, XENFEAT_direct_mapped))


def _put(vcpu: Vcpu, arg: int, data: bytes) -> int:
    try:
        vcpu.copy_to_guest(arg, data)
    except GuestFault:
        return -EFAULT
    return 0


def do_xen_version(vcpu: Vcpu, cmd: int, arg: int, *_: int) -> int:
    if cmd == XENVER_version:
        return (XEN_MAJOR << 16) | XEN_MINOR
    if cmd == XENVER_get_features:
        return _get_features(vcpu, arg)
    if cmd == XENVER_pagesize:
        return -EINVAL if arg else PAGE_SIZE
    if cmd == XENVER_build_id:
        return -EPERM
    data = _strings(vcpu).get(cmd)
    if data is None:
        return -ENOSYS
    return _put(vcpu, arg, data)


def _strings(vcpu: Vcpu) -> dict[int, bytes]:
    """What the sub-ops that only copy out give. Platform parameters: the
    start of the hypervisor's range, as a release build gives a 64-bit PV
    guest (a debug build gives 0)."""
    return {
        XENVER_extraversion: EXTRAVERSION.ljust(XEN_EXTRAVERSION_LEN, b"\0"),
        XENVER_capabilities: CAPABILITIES.ljust(XEN_CAPABILITIES_INFO_LEN, b"\0"),
        XENVER_changeset: CHANGESET.ljust(XEN_CHANGESET_INFO_LEN, b"\0"),
        XENVER_compile_info: bytes(xen_compile_info()),
        XENVER_platform_parameters: bytes(xen_platform_parameters(HYPERVISOR_VIRT_START)),
        XENVER_guest_handle: vcpu.domain.handle,
        XENVER_commandline: DENIED,
    }


def _get_features(vcpu: Vcpu, arg: int) -> int:
    """The caller names the submap; only submap 0 exists."""
    try:
        fi = xen_feature_info.from_buffer_copy(
            vcpu.copy_from_guest(arg, ctypes.sizeof(xen_feature_info)))
    except GuestFault:
        return -EFAULT
    if fi.submap_idx != 0:
        return -EINVAL
    fi.submap = PV_FEATURES
    if vcpu.domain.vm_assist >> VMASST_TYPE_pae_extended_cr3 & 1:
        fi.submap |= 1 << XENFEAT_pae_pgdir_above_4gb
    return _put(vcpu, arg, bytes(fi))
