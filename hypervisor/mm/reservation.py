"""memory_op: a domain's memory reservation (xen/common/memory.c).

For a PV guest the hypervisor keeps only the M2P; the guest keeps its own p2m.
So populate_physmap takes guest pfns and writes the new mfns back into the
caller's list, increase_reservation hands out mfns with no pfn, and
decrease_reservation takes *mfns* (a PV guest's gmfns).

The three reservation ops return how many extents they completed and never an
errno: a bad list, a bad domain, an order too large, a refusal all return the
starting extent (0 on a fresh call). Xen continues a long call by re-issuing it
with the resume point in ``cmd >> MEMOP_EXTENT_SHIFT``; here a call runs to the
end at once, but the encoding is honoured on the way in.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from hypervisor.mm.exchange import memory_exchange
from hypervisor.mm.frames import OutOfMemory
from hypervisor.mm.memflags import DOMU_MAX_ORDER, mem_flags_ok
from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS, ENXIO, EPERM, ESRCH
from hypervisor.public.memory import (
    MEMOP_CMD_MASK,
    MEMOP_EXTENT_SHIFT,
    XENMEM_current_reservation,
    XENMEM_decrease_reservation,
    XENMEM_exchange,
    XENMEM_increase_reservation,
    XENMEM_maximum_gpfn,
    XENMEM_maximum_ram_page,
    XENMEM_maximum_reservation,
    XENMEM_populate_physmap,
    XENMEMF_populate_on_demand,
    xen_memory_reservation,
)
from hypervisor.public.xen import DOMID_SELF, INVALID_MFN, domid_t, xen_pfn_t

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu
    from hypervisor.domain import Domain
    from hypervisor.machine import Machine

_PFN_SIZE = ctypes.sizeof(xen_pfn_t)
UINT_MAX = 0xFFFFFFFF


class Reservation:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def target(self, vcpu: Vcpu, domid: int) -> Domain | int:
        """The domain a memory op names: the caller (DOMID_SELF or its own id);
        another existing domain is refused as XSM refuses a domU (-EPERM)."""
        if domid in (DOMID_SELF, vcpu.domain.domid):
            return vcpu.domain
        if vcpu.domain.domain_by_id(domid) is None:
            return -ESRCH
        return -EPERM

    def memory_op(self, vcpu: Vcpu, cmd: int, arg: int, *_: int) -> int:
        op = cmd & MEMOP_CMD_MASK
        start = cmd >> MEMOP_EXTENT_SHIFT
        if op in (XENMEM_increase_reservation, XENMEM_decrease_reservation,
                  XENMEM_populate_physmap):
            return self._reservation(vcpu, op, start, arg)
        if op == XENMEM_maximum_ram_page:
            return -EINVAL if start else self.machine.nr_frames - 1
        if op in (XENMEM_current_reservation, XENMEM_maximum_reservation, XENMEM_maximum_gpfn):
            return -EINVAL if start else self._query(vcpu, op, arg)
        if op == XENMEM_exchange:
            return -EINVAL if start else memory_exchange(self, vcpu, arg)
        return -ENOSYS

    def _query(self, vcpu: Vcpu, op: int, arg: int) -> int:
        try:
            domid = domid_t.from_buffer_copy(
                vcpu.copy_from_guest(arg, ctypes.sizeof(domid_t))).value
        except GuestFault:
            return -EFAULT
        d = self.target(vcpu, domid)
        if isinstance(d, int):
            return d
        if op == XENMEM_current_reservation:
            return d.tot_pages
        if op == XENMEM_maximum_reservation:
            return d.max_pages
        # domain_get_maximum_gpfn: a PV guest states its p2m size in shared_info
        return (int(d.shared_info.arch.max_pfn) or 1) - 1 if d.shared_info else 0

    def _reservation(self, vcpu: Vcpu, op: int, start: int, arg: int) -> int:
        res = vcpu.copy_struct_from_guest(xen_memory_reservation, arg)
        if res is None:
            return start
        if res.nr_extents > (UINT_MAX >> MEMOP_EXTENT_SHIFT) or start >= res.nr_extents:
            return start
        d = self.target(vcpu, res.domid)
        if isinstance(d, int) or res.extent_order > DOMU_MAX_ORDER \
                or not mem_flags_ok(res.mem_flags):
            return start
        if op == XENMEM_populate_physmap and res.mem_flags & XENMEMF_populate_on_demand:
            return start  # populate_physmap: "Disallow populating PoD pages on oneself"
        step = {XENMEM_increase_reservation: self._increase_one,
                XENMEM_decrease_reservation: self._decrease_one,
                XENMEM_populate_physmap: self._populate_one}[op]
        done = start
        for i in range(start, res.nr_extents):
            slot = res.extent_start + _PFN_SIZE * i
            if not step(vcpu, d, slot, res.extent_start, res.extent_order):
                break
            done = i + 1
        d.flush_tlbs()
        return done

    # --- one extent each ------------------------------------------------------------

    def alloc_frames(self, d: Domain, order: int) -> list[int] | None:
        """An extent for ``d`` whatever its reservation (XENMEM_exchange keeps
        the reservation as it is), or None if no free run is left."""
        try:
            return self.machine.frames.alloc_contiguous(d.domid, order)
        except OutOfMemory:
            return None

    def _alloc_extent(self, d: Domain, order: int) -> list[int] | None:
        n = 1 << order
        if d.tot_pages + n > d.max_pages:
            return None  # over the domain's maximum reservation
        return self.alloc_frames(d, order)

    def _put_u64(self, vcpu: Vcpu, va: int, value: int) -> bool:
        try:
            vcpu.copy_to_guest(va, bytes(xen_pfn_t(value)))
        except GuestFault:
            return False
        return True

    def _get_u64(self, vcpu: Vcpu, va: int) -> int | None:
        pfn = vcpu.copy_struct_from_guest(xen_pfn_t, va)
        return None if pfn is None else pfn.value

    def _increase_one(self, vcpu: Vcpu, d: Domain, slot: int, handle: int, order: int) -> bool:
        mfns = self._alloc_extent(d, order)
        if mfns is None:
            return False
        # a null handle is allowed: the caller does not want the mfns back
        return not handle or self._put_u64(vcpu, slot, mfns[0])

    def _populate_one(self, vcpu: Vcpu, d: Domain, slot: int, handle: int, order: int) -> bool:
        gpfn = self._get_u64(vcpu, slot)
        if gpfn is None:
            return False
        mfns = self._alloc_extent(d, order)
        if mfns is None:
            return False
        for j, mfn in enumerate(mfns):
            self.machine.set_m2p(mfn, gpfn + j)
            # the pfn has a new (zeroed) frame: log-dirty must send it again.
            # Xen marks it for translated guests only (guest_physmap_add_entry),
            # a known gap for PV ballooning, which pvlab closes here
            self.machine.paging.mark_pfn_dirty(d.domid, gpfn + j)
        # a PV guest learns the new extent's machine address from its list
        return self._put_u64(vcpu, slot, mfns[0])

    def _decrease_one(self, vcpu: Vcpu, d: Domain, slot: int, handle: int, order: int) -> bool:
        gmfn = self._get_u64(vcpu, slot)
        if gmfn is None:
            return False
        return all(self.remove_page(d, gmfn + j) == 0 for j in range(1 << order))

    def remove_page(self, d: Domain, mfn: int) -> int:
        """Xen's guest_remove_page for a PV domain: drop the frame from the
        domain's reservation; it is freed when its last reference goes."""
        ft = self.machine.frames
        types = self.machine.types
        if not 0 < mfn < ft.nr_frames:
            return -EINVAL
        if ft.xenheap[mfn] or not types.get_page(mfn, d.domid):
            return -ENXIO  # "Bad page free for domain"
        # since the XSA-252 fix a pinned table stays pinned: the guest unpins it
        self.machine.m2p[mfn] = INVALID_MFN
        if ft.allocated[mfn]:
            ft.allocated[mfn] = False
            types.put_page(mfn)
        types.put_page(mfn)
        return 0
