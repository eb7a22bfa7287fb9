"""xen_version (xen/common/kernel.c do_xen_version)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EFAULT, ENOSYS
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
HYPERVISOR_VIRT_START = 0xFFFF800000000000


def _put(vcpu: Vcpu, arg: int, data: bytes) -> int:
    try:
        vcpu.domain.hypervisor.copy_to_guest(vcpu, arg, data)
    except GuestFault:
        return -EFAULT
    return 0


def do_xen_version(vcpu: Vcpu, cmd: int, arg: int, *_: int) -> int:
    if cmd == XENVER_version:
        return (XEN_MAJOR << 16) | XEN_MINOR
    if cmd == XENVER_extraversion:
        return _put(vcpu, arg, EXTRAVERSION.ljust(16, b"\0"))
    if cmd == XENVER_capabilities:
        return _put(vcpu, arg, CAPABILITIES.ljust(1024, b"\0"))
    if cmd == XENVER_changeset:
        return _put(vcpu, arg, b"pvlab".ljust(64, b"\0"))
    if cmd == XENVER_compile_info:
        return _put(vcpu, arg, b"\0" * (64 + 16 + 32 + 32))
    if cmd == XENVER_platform_parameters:
        return _put(vcpu, arg, struct.pack("<Q", HYPERVISOR_VIRT_START))
    if cmd == XENVER_get_features:
        return _put(vcpu, arg, struct.pack("<II", 0, 0))
    if cmd == XENVER_pagesize:
        return 4096
    return -ENOSYS
