"""sysctl and domctl from a guest (xen/common/sysctl.c do_sysctl,
xen/common/domctl.c do_domctl). Both are the control domain's; with Xen's
default XSM policy (xsm/dummy.h, XSM_PRIV) a domU is refused with -EPERM once
its request is read (-EFAULT if it cannot be), its interface version matches
(-EACCES if not) and, for domctl, its target domain exists (-ESRCH)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hypervisor.mm.walker import GuestFault
from hypervisor.public.domctl import (
    XEN_DOMCTL_INTERFACE_VERSION,
    XEN_DOMCTL_SIZE,
    XEN_DOMCTL_assign_device,
    XEN_DOMCTL_createdomain,
    XEN_DOMCTL_deassign_device,
    XEN_DOMCTL_test_assign_device,
    XEN_DOMCTL_vm_event_op,
)
from hypervisor.public.errno import EACCES, EFAULT, EPERM, ESRCH
from hypervisor.public.sysctl import XEN_SYSCTL_INTERFACE_VERSION, XEN_SYSCTL_SIZE
from hypervisor.public.xen import DOMID_INVALID, DOMID_IO

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu


def do_sysctl(vcpu: Vcpu, arg: int, *_: int) -> int:
    try:
        _cmd, version = struct.unpack("<II", vcpu.copy_from_guest(arg, XEN_SYSCTL_SIZE)[:8])
    except GuestFault:
        return -EFAULT
    if version != XEN_SYSCTL_INTERFACE_VERSION:
        return -EACCES
    return -EPERM  # xsm_sysctl: XSM_PRIV, and a domU is not the control domain


def do_domctl(vcpu: Vcpu, arg: int, *_: int) -> int:
    try:
        cmd, version, domid = struct.unpack("<IIH", vcpu.copy_from_guest(arg, XEN_DOMCTL_SIZE)[:10])
    except GuestFault:
        return -EFAULT
    if version != XEN_DOMCTL_INTERFACE_VERSION:
        return -EACCES
    if _target_missing(vcpu, cmd, domid):
        return -ESRCH
    return -EPERM  # xsm_domctl: XSM_PRIV (or DM_PRIV, XS_PRIV) refuses a domU


def _target_missing(vcpu: Vcpu, cmd: int, domid: int) -> bool:
    """do_domctl's lookup of op->domain (by id: DOMID_SELF is no domain's)."""
    if cmd == XEN_DOMCTL_createdomain:
        return False
    if cmd in (XEN_DOMCTL_assign_device, XEN_DOMCTL_deassign_device):
        if domid == DOMID_IO:
            return False
        if domid == DOMID_INVALID:
            return True
    if cmd in (XEN_DOMCTL_assign_device, XEN_DOMCTL_deassign_device,
               XEN_DOMCTL_test_assign_device, XEN_DOMCTL_vm_event_op) and domid == DOMID_INVALID:
        return False
    return vcpu.domain.domain_by_id(domid) is None
