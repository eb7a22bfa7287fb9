"""Portable hypercall cases for the hypercalls an unmodified guest makes at boot (set_gdt,
grant tables, sysctl and domctl from a guest).
The step format is described in tests/hypercalls/portable.py; the shared
constants are in tests/hypercalls/steps.py."""

from __future__ import annotations

from hypervisor.public.arch_x86 import FIRST_RESERVED_GDT_ENTRY, HYPERVISOR_VIRT_START
from hypervisor.public.domctl import XEN_DOMCTL_INTERFACE_VERSION, XEN_DOMCTL_createdomain
from hypervisor.public.errno import EACCES, EBUSY, EFAULT, EINVAL, ENOSYS, EPERM, ESRCH
from hypervisor.public.grant_table import (
    GNTST_bad_domain,
    GNTST_general_error,
    GNTST_okay,
    GNTTABOP_get_status_frames,
    GNTTABOP_get_version,
    GNTTABOP_query_size,
    GNTTABOP_set_version,
    GNTTABOP_setup_table,
)
from hypervisor.public.sysctl import XEN_SYSCTL_INTERFACE_VERSION
from hypervisor.public.xen import DOMID_SELF, Hypercall
from tests.hypercalls.steps import ANY, BUF, OWN_DOMID, RO, RW, struct, word

GNTTAB = Hypercall.grant_table_op
CODE64_DPL0 = 0x00AF9A000000FFFF  # present, S, code, L, DPL 0
TSS64 = 0x0000890000000067        # a system descriptor a PV guest may not have
XEN_DOMCTL_getdomaininfo = 5
XEN_SYSCTL_physinfo = 3


def _header(cmd: int, version: int) -> list[int]:
    """The first words of a sysctl or domctl: cmd, then interface_version."""
    return [cmd, version]


def _setup(dom: int, nr_frames: int, frame_list: object) -> list[object]:
    """A gnttab_setup_table: dom, nr_frames, status (and padding), frame_list."""
    return [dom, nr_frames, 0, 0, ("q", frame_list)]


def _status(gntst: int) -> int:
    """A GNTST_* status as the 32-bit word holding it reads (int16, zero padding)."""
    return gntst & 0xFFFF


FRAME_LIST = ("buf", 24)  # just after the gnttab_setup_table: words 6 and 7

CASES: dict[str, list[tuple]] = {
    # pv/descriptor-tables.c do_set_gdt, pv_set_gdt
    "set_gdt_limits": [
        ("hypercall", Hypercall.set_gdt, 0, FIRST_RESERVED_GDT_ENTRY + 1, -EINVAL),
        ("hypercall", Hypercall.set_gdt, 0, 1, -EFAULT)],  # the frame list at 0 is unmapped
    "set_gdt_frame_mapped_writable": [
        struct([("q", "free_mfn")], Hypercall.set_gdt, BUF, 1, -EINVAL)],
    "set_gdt_frame_not_owned": [
        struct([("q", "xen_frame")], Hypercall.set_gdt, BUF, 1, -EINVAL)],
    "set_gdt_read_only_frame": [
        ("uvm", "free_va", ("pte", "free_mfn", RO), 0, 0),
        struct([("q", "free_mfn")], Hypercall.set_gdt, BUF, 512, 0),
        ("uvm", "free_va", ("pte", "free_mfn", RW), 0, -EBUSY),  # a GDT frame stays read-only
        ("hypercall", Hypercall.set_gdt, 0, 0, 0),  # an empty GDT lets the frame go
        ("uvm", "free_va", ("pte", "free_mfn", RW), 0, 0)],
    # pv/descriptor-tables.c do_update_descriptor: pa is a machine address
    "update_descriptor": [
        ("hypercall", Hypercall.update_descriptor, ("or", ("pte", "free_mfn", 0), 4),
         CODE64_DPL0, -EINVAL),  # not 8-byte aligned
        ("hypercall", Hypercall.update_descriptor, ("pte", "free_mfn", 0), TSS64, -EINVAL),
        ("hypercall", Hypercall.update_descriptor, ("pte", "xen_frame", 0), 0, -EINVAL),
        ("hypercall", Hypercall.update_descriptor, ("slot", "l4_mfn", 300), 0, -EINVAL),
        ("hypercall", Hypercall.update_descriptor, ("pte", "free_mfn", 8), CODE64_DPL0, 0),
        ("hypercall", Hypercall.update_descriptor, ("pte", "free_mfn", 8), 0, 0)],
    "update_descriptor_of_a_gdt_frame": [
        ("uvm", "free_va", ("pte", "free_mfn", RO), 0, 0),
        struct([("q", "free_mfn")], Hypercall.set_gdt, BUF, 512, 0),
        ("hypercall", Hypercall.update_descriptor, ("pte", "free_mfn", 16), CODE64_DPL0, 0),
        ("hypercall", Hypercall.update_descriptor, ("pte", "free_mfn", 16), 0, 0),
        ("hypercall", Hypercall.set_gdt, 0, 0, 0),
        ("uvm", "free_va", ("pte", "free_mfn", RW), 0, 0)],
    # common/sysctl.c do_sysctl, common/domctl.c do_domctl, xsm/dummy.h
    "sysctl_from_a_guest": [
        ("hypercall", Hypercall.sysctl, 0, -EFAULT),
        struct(_header(XEN_SYSCTL_physinfo, 0), Hypercall.sysctl, BUF, -EACCES),
        struct(_header(XEN_SYSCTL_physinfo, XEN_SYSCTL_INTERFACE_VERSION),
         Hypercall.sysctl, BUF, -EPERM)],
    "domctl_from_a_guest": [
        ("hypercall", Hypercall.domctl, 0, -EFAULT),
        struct([*_header(XEN_DOMCTL_getdomaininfo, 0), OWN_DOMID],
         Hypercall.domctl, BUF, -EACCES),
        struct([*_header(XEN_DOMCTL_getdomaininfo, XEN_DOMCTL_INTERFACE_VERSION), OWN_DOMID],
         Hypercall.domctl, BUF, -EPERM),
        struct([*_header(XEN_DOMCTL_getdomaininfo, XEN_DOMCTL_INTERFACE_VERSION), 77],
         Hypercall.domctl, BUF, -ESRCH),
        # looked up by id only: DOMID_SELF names no domain
        struct([*_header(XEN_DOMCTL_getdomaininfo, XEN_DOMCTL_INTERFACE_VERSION), DOMID_SELF],
         Hypercall.domctl, BUF, -ESRCH),
        # createdomain looks no domain up
        struct([*_header(XEN_DOMCTL_createdomain, XEN_DOMCTL_INTERFACE_VERSION), 77],
         Hypercall.domctl, BUF, -EPERM)],
    # common/grant_table.c do_grant_table_op
    "gnttab_bad_calls": [
        ("hypercall", GNTTAB, 99, 0, 1, -ENOSYS),
        struct([DOMID_SELF], GNTTAB, GNTTABOP_query_size | 1 << 12, BUF, 1, -EINVAL),
        struct([DOMID_SELF], GNTTAB, GNTTABOP_query_size, BUF, 2, -EINVAL),
        struct([DOMID_SELF], GNTTAB, GNTTABOP_query_size, BUF, 1 << 31, -EINVAL),
        ("hypercall", GNTTAB, GNTTABOP_query_size, 0, 1, -EFAULT)],
    "gnttab_query_size": [
        struct([DOMID_SELF, 0, 0, 0], GNTTAB, GNTTABOP_query_size, BUF, 1, 0),
        word(1, 1),   # nr_frames: INITIAL_NR_GRANT_FRAMES
        word(2, 64),  # max_nr_frames: opt_max_grant_frames
        word(3, _status(GNTST_okay)),
        struct([OWN_DOMID, 0, 0, 0], GNTTAB, GNTTABOP_query_size, BUF, 1, 0),
        word(3, _status(GNTST_okay)),
        struct([77, 0, 0, 0], GNTTAB, GNTTABOP_query_size, BUF, 1, 0),
        word(3, _status(GNTST_bad_domain))],
    "gnttab_setup_table": [
        struct(_setup(DOMID_SELF, 1, FRAME_LIST), GNTTAB, GNTTABOP_setup_table, BUF, 1, 0),
        word(2, _status(GNTST_okay)),
        word(6, ANY),  # the table's frame
        struct(_setup(77, 1, 0), GNTTAB, GNTTABOP_setup_table, BUF, 1, 0),
        word(2, _status(GNTST_bad_domain)),
        struct(_setup(DOMID_SELF, 65, 0), GNTTAB, GNTTABOP_setup_table, BUF, 1, 0),
        word(2, _status(GNTST_general_error)),  # more than max_grant_frames
        struct(_setup(DOMID_SELF, 1, HYPERVISOR_VIRT_START), GNTTAB,
         GNTTABOP_setup_table, BUF, 1, -EFAULT),  # guest_handle_okay
        struct(_setup(DOMID_SELF, 1, FRAME_LIST), GNTTAB, GNTTABOP_setup_table,
         BUF, 2, -EINVAL)],
    "gnttab_versions": [
        struct([DOMID_SELF, 0], GNTTAB, GNTTABOP_get_version, BUF, 1, 0),
        word(1, 1),
        struct([2], GNTTAB, GNTTABOP_set_version, BUF, 1, 0),
        word(0, 2),
        struct([3], GNTTAB, GNTTABOP_set_version, BUF, 1, -EINVAL),
        word(0, 2),  # the version in force, written back
        struct([77, 0], GNTTAB, GNTTABOP_get_version, BUF, 1, -ESRCH),
        struct([1], GNTTAB, GNTTABOP_set_version, BUF, 1, 0),
        word(0, 1)],
    "gnttab_status_frames": [  # nr_frames, then dom and status in word 1, then frame_list
        struct([1, DOMID_SELF, ("q", FRAME_LIST)], GNTTAB, GNTTABOP_get_status_frames,
         BUF, 1, 0),
        word(1, DOMID_SELF | _status(GNTST_general_error) << 16),  # v1 has none
        struct([0, DOMID_SELF, ("q", 0)], GNTTAB, GNTTABOP_get_status_frames, BUF, 1, 0),
        word(1, DOMID_SELF | _status(GNTST_okay) << 16),
        struct([1, DOMID_SELF, ("q", FRAME_LIST)], GNTTAB, GNTTABOP_get_status_frames,
         BUF, 2, -EINVAL),
        struct([2], GNTTAB, GNTTABOP_set_version, BUF, 1, 0),
        struct([1, DOMID_SELF, ("q", FRAME_LIST)], GNTTAB, GNTTABOP_get_status_frames,
         BUF, 1, 0),
        word(1, DOMID_SELF | _status(GNTST_okay) << 16),
        word(6, ANY),  # the status frame
        struct([1, 77, ("q", FRAME_LIST)], GNTTAB, GNTTABOP_get_status_frames,
         BUF, 1, 0),
        word(1, 77 | _status(GNTST_bad_domain) << 16),
        struct([1], GNTTAB, GNTTABOP_set_version, BUF, 1, 0)],
}
