"""XENMEM_exchange: a PV guest trades frames it holds for new ones, extent for
extent, without changing its reservation (xen/common/memory.c
memory_exchange). Linux uses it to make a buffer machine-contiguous.

The input extents are gmfns (a PV guest's mfns), each frame held by nothing
but its allocation (steal_page: unmapped, no type); the output list names the
gpfns to fill, and the new extents' mfns are written back over it. The work is
done in chunks of the larger order; a chunk that fails is undone, and
``nr_exchanged`` tells the caller how many input extents were exchanged.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any, Protocol

from hypervisor.mm.memflags import DOMU_MAX_ORDER, propagate_node_ok
from hypervisor.mm.walker import GuestFault, addr_ok
from hypervisor.public.errno import EFAULT, EINVAL, ENOMEM, EPERM
from hypervisor.public.memory import xen_memory_exchange
from hypervisor.public.xen import INVALID_MFN, xen_pfn_t

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu
    from hypervisor.domain import Domain

_NR_EXCHANGED = xen_memory_exchange.nr_exchanged.offset
_PFN = ctypes.sizeof(xen_pfn_t)
_ULONG_MAX = 2**64 - 1


class Reservation(Protocol):
    """What the exchange needs of the reservation ops (hypervisor/mm/reservation.py)."""

    machine: Any

    def target(self, vcpu: Vcpu, domid: int) -> Domain | int: ...

    def alloc_frames(self, d: Domain, order: int) -> list[int] | None: ...


def memory_exchange(res: Reservation, vcpu: Vcpu, arg: int) -> int:
    """0 with every extent exchanged, or a negative errno; nr_exchanged is
    written back in both cases (except when there was nothing to do)."""
    exch = vcpu.copy_struct_from_guest(xen_memory_exchange, arg)
    if exch is None:
        return -EFAULT
    rc = _early_checks(exch)
    if rc is None:
        if exch.nr_exchanged == exch.in_.nr_extents:
            return 0
        rc = res.target(vcpu, exch.in_.domid)  # -ESRCH, or XSM's -EPERM
    if not isinstance(rc, int):
        rc = _exchange_chunks(res, vcpu, rc, exch)
    try:
        vcpu.copy_to_guest(arg + _NR_EXCHANGED, bytes(ctypes.c_uint64(exch.nr_exchanged)))
    except GuestFault:
        rc = -EFAULT
    return rc


def _early_checks(exch: xen_memory_exchange) -> int | None:
    """The checks before any domain is looked at: an errno, or None."""
    i, o = exch.in_, exch.out
    if max(i.extent_order, o.extent_order) > DOMU_MAX_ORDER:
        return -EPERM  # max_order(current->domain)
    if (exch.nr_exchanged > i.nr_extents or i.domid != o.domid
            or (_ULONG_MAX >> i.extent_order) < i.nr_extents
            or (_ULONG_MAX >> o.extent_order) < o.nr_extents
            or (i.nr_extents << i.extent_order) != (o.nr_extents << o.extent_order)):
        return -EINVAL
    if not (addr_ok(i.extent_start) and addr_ok(o.extent_start)):
        return -EFAULT  # guest_handle_subrange_okay
    if not propagate_node_ok(o.mem_flags):
        return -EINVAL  # propagate_node
    return None


def _exchange_chunks(res: Reservation, vcpu: Vcpu, d: Domain,
                     exch: xen_memory_exchange) -> int:
    i_ord, o_ord = exch.in_.extent_order, exch.out.extent_order
    in_chunk = o_ord - i_ord if i_ord <= o_ord else 0   # input extents per chunk (log2)
    out_chunk = i_ord - o_ord if i_ord > o_ord else 0   # output extents per chunk (log2)
    first = exch.nr_exchanged >> in_chunk
    for c in range(first, exch.in_.nr_extents >> in_chunk):
        rc = _one_chunk(res, vcpu, d, exch, c, in_chunk, out_chunk)
        if rc:
            exch.nr_exchanged = c << in_chunk
            return rc
    exch.nr_exchanged = exch.in_.nr_extents
    d.flush_tlbs()
    return 0


def _one_chunk(res: Reservation, vcpu: Vcpu, d: Domain, exch: xen_memory_exchange,
               c: int, in_chunk: int, out_chunk: int) -> int:
    """Steal a chunk's input frames, allocate its output extents, then free
    the inputs and give the outputs their gpfns. 0 or a negative errno."""
    stolen: list[int] = []
    for j in range(1 << in_chunk):
        gmfn = _get(vcpu, exch.in_.extent_start, (c << in_chunk) + j)
        if gmfn is None:
            return -EFAULT
        for k in range(1 << exch.in_.extent_order):
            if not _stealable(res, d, gmfn + k) or gmfn + k in stolen:
                return -EINVAL  # steal_page
            stolen.append(gmfn + k)
    outs: list[list[int]] = []
    for _ in range(1 << out_chunk):
        mfns = res.alloc_frames(d, exch.out.extent_order)
        if mfns is None:
            for extent in outs:
                for mfn in extent:
                    res.machine.types.put_page(mfn)
            return -ENOMEM
        outs.append(mfns)
    for mfn in stolen:
        res.machine.m2p[mfn] = INVALID_MFN
        res.machine.frames.allocated[mfn] = False
        res.machine.types.put_page(mfn)  # the allocation reference: freed
    rc = 0
    for j, extent in enumerate(outs):
        slot = (c << out_chunk) + j
        gpfn = _get(vcpu, exch.out.extent_start, slot)
        if gpfn is None:
            rc = -EFAULT
            continue
        for k, mfn in enumerate(extent):
            res.machine.set_m2p(mfn, gpfn + k)
        if not _put(vcpu, exch.out.extent_start, slot, extent[0]):
            rc = -EFAULT
    return rc


def _stealable(res: Reservation, d: Domain, mfn: int) -> bool:
    """steal_page: the domain's frame, not a shared hypervisor page, held by
    its allocation reference alone."""
    ft = res.machine.frames
    return (0 < mfn < ft.nr_frames and ft.owner[mfn] == d.domid and not ft.xenheap[mfn]
            and bool(ft.allocated[mfn]) and int(ft.ref_count[mfn]) == 1)


def _get(vcpu: Vcpu, handle: int, i: int) -> int | None:
    pfn = vcpu.copy_struct_from_guest(xen_pfn_t, handle + _PFN * i)
    return None if pfn is None else pfn.value


def _put(vcpu: Vcpu, handle: int, i: int, value: int) -> bool:
    try:
        vcpu.copy_to_guest(handle + _PFN * i, bytes(xen_pfn_t(value)))
    except GuestFault:
        return False
    return True
