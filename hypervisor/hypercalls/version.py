"""xen_version (xen/common/kernel.c do_xen_version)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.mm.memory import PAGE_SIZE
from hypervisor.mm.walker import GuestFault
from hypervisor.public.arch_x86 import HYPERVISOR_VIRT_START
from hypervisor.public.errno import EFAULT, ENOSYS
from hypervisor.public.version import (
    XEN_CAPABILITIES_INFO_LEN,
    XEN_CHANGESET_INFO_LEN,
    XEN_EXTRAVERSION_LEN,
    xen_compile_info,
    xen_feature_info,
    xen_platform_parameters,
)
from hypervisor.public.xen import (
    XENVER_capabilities,
    XENVER_changeset,
    XENVER_compile_info,
    XENVER_extraversion,
    XENVER_get_features,
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


def _put(vcpu: Vcpu, arg: int, data: bytes) -> int:
    try:
        vcpu.copy_to_guest(arg, data)
    except GuestFault:
        return -EFAULT
    return 0


def do_xen_version(vcpu: Vcpu, cmd: int, arg: int, *_: int) -> int:
    if cmd == XENVER_version:
        return (XEN_MAJOR << 16) | XEN_MINOR
    if cmd == XENVER_extraversion:
        return _put(vcpu, arg, EXTRAVERSION.ljust(XEN_EXTRAVERSION_LEN, b"\0"))
    if cmd == XENVER_capabilities:
        return _put(vcpu, arg, CAPABILITIES.ljust(XEN_CAPABILITIES_INFO_LEN, b"\0"))
    if cmd == XENVER_changeset:
        return _put(vcpu, arg, CHANGESET.ljust(XEN_CHANGESET_INFO_LEN, b"\0"))
    if cmd == XENVER_compile_info:
        return _put(vcpu, arg, bytes(xen_compile_info()))
    if cmd == XENVER_platform_parameters:
        return _put(vcpu, arg, bytes(xen_platform_parameters(HYPERVISOR_VIRT_START)))
    if cmd == XENVER_get_features:
        return _put(vcpu, arg, bytes(xen_feature_info(0, 0)))
    if cmd == XENVER_pagesize:
        return PAGE_SIZE
    return -ENOSYS

