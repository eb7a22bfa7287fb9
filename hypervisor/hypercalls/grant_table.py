"""grant_table_op, as far as a guest needs it at boot (xen/common/grant_table.c):
GNTTABOP_setup_table (the frames of its own table, which it maps),
GNTTABOP_query_size, GNTTABOP_set_version, GNTTABOP_get_version and
GNTTABOP_get_status_frames.

A domain's table is hypervisor frames shared with it (as shared_info is),
made when it first asks (Xen makes INITIAL_NR_GRANT_FRAMES at domain
creation: nothing a guest sees differs) and grown up to max_grant_frames
(Xen's default, opt_max_grant_frames, is 64). Version 2 adds status frames.
Mapping, copying and transferring grants are not modelled: -ENOSYS."""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hypervisor.mm.memory import MachineMemory
from hypervisor.mm.walker import GuestFault
from hypervisor.public import grant_table as public
from hypervisor.public.arch_x86 import HYPERVISOR_VIRT_END
from hypervisor.public.errno import EBUSY, EFAULT, EINVAL, ENOSYS, EPERM, ERANGE, ESRCH
from hypervisor.public.grant_table import (
    GNTTAB_NR_RESERVED_ENTRIES,
    GNTTABOP_CMD_MASK,
    GNTST_bad_domain,
    GNTST_bad_virt_addr,
    GNTST_general_error,
    GNTST_okay,
    GNTST_permission_denied,
    GNTTABOP_cache_flush,
    GNTTABOP_get_status_frames,
    GNTTABOP_get_version,
    GNTTABOP_query_size,
    GNTTABOP_set_version,
    GNTTABOP_setup_table,
    GTF_permit_access,
    GTF_reading,
    GTF_transitive,
    GTF_type_mask,
    GTF_writing,
)
from hypervisor.public.xen import DOMID_SELF, PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu
    from hypervisor.domain import Domain

INITIAL_NR_GRANT_FRAMES = 1
MAX_GRANT_FRAMES = 64          # opt_max_grant_frames, Xen's default
MAX_GRANT_VERSION = 2          # opt_gnttab_max_version, and xl's default
STATUS_PER_FRAME = PAGE_SIZE // 2  # grant_status_t is 16 bits
ENTRIES_V2_PER_FRAME = PAGE_SIZE // 16


@dataclass
class GrantTable:
    """struct grant_table, the part a guest sees: version and frames."""

    version: int = 1
    shared: list[int] = field(default_factory=list)   # mfns of the shared frames
    status: list[int] = field(default_factory=list)   # mfns of the v2 status frames


def grant_table_of(dom: Domain) -> GrantTable:
    gt = dom.grant_table
    if gt is None:
        gt = dom.grant_table = GrantTable()
        _grow(dom, gt, INITIAL_NR_GRANT_FRAMES)
    return gt


def _xen_frame(dom: Domain) -> int:
    """A zeroed hypervisor frame the domain may map (share_xen_page_with_guest)."""
    frames = dom.machine.frames
    mfn = frames.alloc(dom.domid)
    frames.xenheap[mfn] = True
    return mfn


def _grow(dom: Domain, gt: GrantTable, nr_frames: int) -> None:
    """gnttab_grow_table: shared frames, and in v2 the status frames they need."""
    while len(gt.shared) < nr_frames:
        gt.shared.append(_xen_frame(dom))
    if gt.version == 2:
        _populate_status_frames(dom, gt)


def _populate_status_frames(dom: Domain, gt: GrantTable) -> None:
    entries = len(gt.shared) * ENTRIES_V2_PER_FRAME
    while len(gt.status) * STATUS_PER_FRAME < entries:
        gt.status.append(_xen_frame(dom))


def _addr_ok(va: int) -> bool:
    """__addr_ok: outside the hypervisor's part of the address space."""
    return va < 1 << 47 or va >= HYPERVISOR_VIRT_END


def _domain(vcpu: Vcpu, domid: int) -> Domain | None:
    """rcu_lock_domain_by_any_id: DOMID_SELF or a domain's own number."""
    return vcpu.domain if domid == DOMID_SELF else vcpu.domain.domain_by_id(domid)


def do_grant_table_op(vcpu: Vcpu, cmd: int, uop: int, count: int, *_: int) -> int:
    cmd, count = cmd & 0xFFFFFFFF, count & 0xFFFFFFFF
    if count >> 31:
        return -EINVAL  # (int)count < 0
    opaque, cmd = cmd & ~GNTTABOP_CMD_MASK, cmd & GNTTABOP_CMD_MASK
    if opaque and cmd != GNTTABOP_cache_flush:
        return -EINVAL
    handler = _OPS.get(cmd)
    if handler is None:
        return -ENOSYS
    return handler(vcpu, uop, count)


def _read(vcpu: Vcpu, uop: int, struct_type: type) -> ctypes.Structure | None:
    return vcpu.copy_struct_from_guest(struct_type, uop)


def _write_back(vcpu: Vcpu, uop: int, data: bytes) -> int:
    try:
        vcpu.copy_to_guest(uop, data)
    except GuestFault:
        return -EFAULT
    return 0


def gnttab_setup_table(vcpu: Vcpu, uop: int, count: int) -> int:
    """The frames of a table, grown to nr_frames first; the result is in status."""
    if count != 1:
        return -EINVAL
    op = _read(vcpu, uop, public.gnttab_setup_table)
    if op is None:
        return -EFAULT
    if not _addr_ok(op.frame_list):
        return -EFAULT  # guest_handle_okay
    op.status = _setup(vcpu, op)
    status = public.gnttab_setup_table.status
    return _write_back(vcpu, uop + status.offset, struct.pack("<h", op.status))


def _setup(vcpu: Vcpu, op: public.gnttab_setup_table) -> int:
    d = _domain(vcpu, op.dom)
    if d is None:
        return GNTST_bad_domain
    if d is not vcpu.domain:
        return GNTST_permission_denied  # xsm_grant_setup (XSM_TARGET)
    if op.nr_frames > MAX_GRANT_FRAMES:
        return GNTST_general_error
    gt = grant_table_of(d)
    _grow(d, gt, op.nr_frames)
    return _frames_out(vcpu, op.frame_list, gt.shared[:op.nr_frames])


def _frames_out(vcpu: Vcpu, frame_list: int, frames: list[int]) -> int:
    """The frames' numbers written to the guest's list, one u64 each."""
    for i, mfn in enumerate(frames):
        try:
            vcpu.copy_to_guest(frame_list + 8 * i, struct.pack("<Q", mfn))
        except GuestFault:
            return GNTST_bad_virt_addr
    return GNTST_okay


def gnttab_get_status_frames(vcpu: Vcpu, uop: int, count: int) -> int:
    """The v2 status frames (none in v1: asking for any is GNTST_general_error)."""
    if count != 1:
        return -EINVAL
    op = _read(vcpu, uop, public.gnttab_get_status_frames)
    if op is None:
        return -EFAULT
    if not _addr_ok(op.frame_list):
        return -EFAULT  # guest_handle_okay
    d = _domain(vcpu, op.dom)
    if d is None:
        status = GNTST_bad_domain
    elif d is not vcpu.domain:
        status = GNTST_permission_denied  # xsm_grant_setup (XSM_TARGET)
    elif op.nr_frames > len(grant_table_of(d).status):
        status = GNTST_general_error
    else:
        status = _frames_out(vcpu, op.frame_list, grant_table_of(d).status[:op.nr_frames])
    offset = public.gnttab_get_status_frames.status.offset
    return _write_back(vcpu, uop + offset, struct.pack("<h", status))


def gnttab_query_size(vcpu: Vcpu, uop: int, count: int) -> int:
    if count != 1:
        return -EINVAL
    op = _read(vcpu, uop, public.gnttab_query_size)
    if op is None:
        return -EFAULT
    d = _domain(vcpu, op.dom)
    if d is None:
        op.status = GNTST_bad_domain
    elif d is not vcpu.domain:
        op.status = GNTST_permission_denied  # xsm_grant_query_size (XSM_TARGET)
    else:
        op.nr_frames = len(grant_table_of(d).shared)
        op.max_nr_frames = MAX_GRANT_FRAMES
        op.status = GNTST_okay
    return _write_back(vcpu, uop, bytes(op))


def gnttab_set_version(vcpu: Vcpu, uop: int, count: int) -> int:
    """Version 1 or 2; the version in force is written back whatever the result.
    No grant is ever in use here (nothing maps one), so a change never meets
    Xen's -EBUSY; the shared frames are cleared but for the reserved entries."""
    op = _read(vcpu, uop, public.gnttab_set_version)
    if op is None:
        return -EFAULT
    dom = vcpu.domain
    gt = grant_table_of(dom)
    if op.version not in (1, 2):
        rc = -EINVAL
    elif op.version == 2 and MAX_GRANT_VERSION == 1:
        rc = -ENOSYS
    elif op.version == gt.version:
        rc = 0
    else:
        rc = _change_version(dom, gt, op.version)
    op.version = gt.version
    wrote = _write_back(vcpu, uop, bytes(op))
    return wrote or rc


def _change_version(dom: Domain, gt: GrantTable, version: int) -> int:
    """The middle of gnttab_set_version: the reserved entries read in the old
    format, the status frames made or let go, the shared frames cleared, the
    reserved entries written back in the new format."""
    memory = dom.machine.memory
    kept = _reserved_entries(memory, gt)
    if kept is None:
        return -ERANGE  # a v2 entry v1 cannot hold
    if version == 1:
        types = dom.machine.types
        if any(dom.machine.frames.ref_count[mfn] > 1 for mfn in gt.status):
            return -EBUSY  # the guest still maps a status frame
        for mfn in gt.status:
            types.put_page(mfn)
        gt.status = []
    for mfn in gt.shared:
        memory.frame(mfn)[:] = 0
    gt.version = version
    if version == 2:
        _populate_status_frames(dom, gt)
    _write_reserved(memory, gt, kept)
    return 0


def _reserved_entries(memory: MachineMemory, gt: GrantTable) -> list[tuple] | None:
    """The first GNTTAB_NR_RESERVED_ENTRIES as v1 (flags, domid, frame)."""
    raw = memory.frame_bytes(gt.shared[0])
    if gt.version == 1:
        return [tuple(struct.unpack_from("<HHI", raw, 8 * i))
                for i in range(GNTTAB_NR_RESERVED_ENTRIES)]
    status = memory.frame_bytes(gt.status[0])
    kept = []
    for i in range(GNTTAB_NR_RESERVED_ENTRIES):
        flags, domid, _, frame = struct.unpack_from("<HHIQ", raw, 16 * i)
        kind = flags & GTF_type_mask
        if kind == GTF_transitive or (kind == GTF_permit_access and frame >> 32):
            return None
        if kind != GTF_permit_access:
            kept.append((0, 0, 0))
            continue
        (st,) = struct.unpack_from("<H", status, 2 * i)
        kept.append((flags | st, domid, frame))
    return kept


def _write_reserved(memory: MachineMemory, gt: GrantTable, kept: list[tuple]) -> None:
    raw = memory.frame_bytes(gt.shared[0])
    for i, (flags, domid, frame) in enumerate(kept):
        if gt.version == 1:
            struct.pack_into("<HHI", raw, 8 * i, flags, domid, frame)
            continue
        busy = flags & (GTF_reading | GTF_writing)
        struct.pack_into("<HHIQ", raw, 16 * i, flags & ~busy, domid, 0, frame)
        struct.pack_into("<H", memory.frame_bytes(gt.status[0]), 2 * i, busy)


def gnttab_get_version(vcpu: Vcpu, uop: int, count: int) -> int:
    op = _read(vcpu, uop, public.gnttab_get_version)
    if op is None:
        return -EFAULT
    d = _domain(vcpu, op.dom)
    if d is None:
        return -ESRCH
    if d is not vcpu.domain:
        return -EPERM  # xsm_grant_query_size (XSM_TARGET)
    op.version = grant_table_of(d).version
    return _write_back(vcpu, uop + public.gnttab_get_version.version.offset,
                       struct.pack("<I", op.version))


_OPS = {GNTTABOP_setup_table: gnttab_setup_table, GNTTABOP_query_size: gnttab_query_size,
        GNTTABOP_set_version: gnttab_set_version, GNTTABOP_get_version: gnttab_get_version,
        GNTTABOP_get_status_frames: gnttab_get_status_frames}
