"""Xen's page-type system for paravirtual pagetables (xen/arch/x86/mm.c).

A guest's pagetables hold machine frame numbers and are walked by the real
(emulated) MMU, so the hypervisor must make sure no guest can use them to reach
memory it does not own. Xen's answer, modelled here:

* a frame is used as exactly one of: a pagetable of level 1..4, a writable page,
  or nothing, and changes use only while its type count is zero;
* making a frame an Ln table *validates* it: every present entry must map a frame
  the domain may map, with the right type for the level (an L2 entry points at an
  L1, ...), and no L1 entry may map a pagetable frame writable;
* once validated, a pagetable is read-only to the guest; it changes only through
  ``mmu_update``, which validates each new entry the same way;
* when the last type reference goes, the table is devalidated, dropping the
  references its entries held;
* each present entry validated is *adjusted* in place for a 64-bit PV guest,
  whose code all runs at CPL3: it gets _PAGE_USER (adjust_guest_entry).

Errors are Xen's (negative errno, hypervisor/public/errno.py); the functions
return 0 or a negative errno as Xen's do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from hypervisor.mm.frames import DOMID_XEN, FREE, FrameTable, PageType
from hypervisor.mm.memory import ENTRIES_PER_TABLE, MachineMemory
from hypervisor.public.arch_x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_GNTTAB,
    _PAGE_GUEST_KERNEL,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_USER,
    PTE_FRAME_MASK,
    ROOT_PAGETABLE_FIRST_XEN_SLOT,
    ROOT_PAGETABLE_LAST_XEN_SLOT,
)
from hypervisor.public.errno import EBUSY, EINVAL, EPERM

# an L1 frame field of all ones: Xen's INVALID_MFN (PADDR_MASK >> PAGE_SHIFT),
# refused as invalid rather than as I/O space
_PTE_FRAME_ALL_ONES = PTE_FRAME_MASK >> 12

# Flags a PV guest may set (the complement of Xen's base_disallow_mask):
# present, rw, user, accessed, dirty, the available bits and NX. PWT/PCD/PSE/
# GLOBAL are refused, except GLOBAL in an L1.
_PAGE_AVAIL = 0xE00  # bits 9-11, the software's own
_L2_ALLOWED = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_AVAIL
_L1_ALLOWED = _L2_ALLOWED | _PAGE_GLOBAL
_U64_FRAME = np.uint64(PTE_FRAME_MASK)
_U64_USER, _U64_GUEST_KERNEL = np.uint64(_PAGE_USER), np.uint64(_PAGE_GUEST_KERNEL)
_U64_GLOBAL_USER = np.uint64(_PAGE_GLOBAL | _PAGE_USER)

LEVEL_TYPE = {1: PageType.l1, 2: PageType.l2, 3: PageType.l3, 4: PageType.l4}


def is_guest_l4_slot(slot: int) -> bool:
    return not ROOT_PAGETABLE_FIRST_XEN_SLOT <= slot <= ROOT_PAGETABLE_LAST_XEN_SLOT


def pte_mfn(pte: int) -> int:
    return (pte & PTE_FRAME_MASK) >> 12


def flags_ok(level: int, pte: int) -> bool:
    """Xen's flags are PTE bits 0-11 and 52-63 (get_pte_flags); bits 12-51 are
    the frame. Of the high ones, the available bits (52-62) and NX are allowed,
    but not bit 62 in an L1: _PAGE_GNTTAB (mm.c L1_DISALLOW_MASK)."""
    if level == 1:
        return not (pte & 0xFFF & ~_L1_ALLOWED or pte & _PAGE_GNTTAB)
    return not (pte & 0xFFF & ~_L2_ALLOWED)


def adjust_guest_entry(level: int, pte: int) -> int:
    """Xen's adjust_guest_l1e..l4e for a 64-bit PV guest (pv/mm.h): a present
    entry gets _PAGE_USER, since guest kernel and user both run at CPL3. An L1
    entry made without it is a kernel page, marked _PAGE_GUEST_KERNEL; one made
    with it is a user page and gets _PAGE_GLOBAL. An L4 entry also gets
    _PAGE_ACCESSED. The adjusted value is what the table holds."""
    if not pte & _PAGE_PRESENT:
        return pte
    if level == 1:
        if not pte & _PAGE_USER:
            pte |= _PAGE_GUEST_KERNEL | _PAGE_USER
        if not pte & _PAGE_GUEST_KERNEL:
            pte |= _PAGE_GLOBAL | _PAGE_USER
        return pte
    return pte | _PAGE_USER | (_PAGE_ACCESSED if level == 4 else 0)


def adjust_guest_l1es(ptes: np.ndarray) -> np.ndarray:
    """adjust_guest_entry(1, ...) over present L1 entries at once."""
    ptes = ptes | np.where((ptes & _U64_USER) == 0, _U64_GUEST_KERNEL | _U64_USER,
                           np.uint64(0))
    return ptes | np.where((ptes & _U64_GUEST_KERNEL) == 0, _U64_GLOBAL_USER, np.uint64(0))


def _count_into(counts: np.ndarray, idx: np.ndarray) -> None:
    """counts[i] += 1 for each i in idx, repeats counted (np.add.at for a
    table's entries, bincount for many tables')."""
    if idx.size > 4096:
        counts += np.bincount(idx, minlength=counts.size).astype(counts.dtype)
    else:
        np.add.at(counts, idx, 1)


class DirtyTracking(Protocol):
    """What log-dirty (hypervisor/mm/logdirty.py) is told of type changes:
    a table is dirtied when its type count becomes non-zero and when it
    becomes zero (Xen's validate_page and devalidate_page), and an L1's
    entries are looked at as it starts and stops being one."""

    def mark_dirty(self, mfn: int) -> None: ...
    def l1_validated(self, mfn: int, domid: int) -> None: ...
    def l1_devalidating(self, mfn: int, domid: int) -> None: ...


class PageTypes:
    """Type and reference counting over the frame table, for every domain."""

    def __init__(self, frames: FrameTable, memory: MachineMemory) -> None:
        self.frames = frames
        self.memory = memory
        # called with the domain id when a frame stops being writable and becomes
        # a pagetable: stale writable TLB entries must go (Xen flushes dirty CPUs)
        self.on_type_change = lambda domid: None
        # the L4 slots the hypervisor owns, filled into every validated L4
        self.xen_l4_slots: dict[int, int] = {}
        # whether a domain may map a frame that is not RAM (Xen's
        # iomem_access_permitted: the toolstack grants ranges with
        # XEN_DOMCTL_iomem_permission); the hypervisor sets it
        self.iomem_permitted = lambda domid, mfn: False
        # how a frame of a type other than a pagetable is validated when it
        # takes the type (PGT_seg_desc_page: its descriptors), 0 or -errno;
        # the module that owns the type registers it
        self.validators: dict[PageType, Callable[[int, int], int]] = {}
        # log-dirty, which the machine registers
        self.paging: DirtyTracking | None = None

    # --- general references --------------------------------------------------------

    def get_page(self, mfn: int, domid: int) -> bool:
        """Take a general reference on a frame ``domid`` owns."""
        if not 0 < mfn < self.frames.nr_frames or self.frames.owner[mfn] != domid:
            return False
        self.frames.ref_count[mfn] += 1
        return True

    def put_page(self, mfn: int) -> None:
        ft = self.frames
        assert ft.ref_count[mfn] > 0, f"ref_count underflow on mfn {mfn:#x}"
        ft.ref_count[mfn] -= 1
        if ft.ref_count[mfn] == 0 and ft.owner[mfn] not in (FREE, DOMID_XEN):
            ft.free(mfn)

    # --- type references -------------------------------------------------------------

    def get_page_type(self, mfn: int, ptype: PageType, domid: int) -> int:
        """Take a type reference; validates a pagetable on its first one."""
        ft = self.frames
        count = int(ft.type_count[mfn])
        if count == 0:
            if ft.type[mfn] != ptype:
                if ft.validated[mfn] and 1 <= ft.type[mfn] <= 4:
                    self._devalidate(mfn)  # validated ahead (validate_l1s)
                was_writable = ft.type[mfn] == PageType.writable
                ft.type[mfn] = ptype
                ft.validated[mfn] = False
                if was_writable and ptype != PageType.writable:
                    self.on_type_change(domid)
        elif ft.type[mfn] != ptype:
            return -EINVAL  # "Bad type": a frame has one use at a time
        ft.type_count[mfn] = count + 1
        if not ft.validated[mfn]:
            if ptype in (PageType.none, PageType.writable):
                ft.validated[mfn] = True
            else:
                if self.paging is not None:
                    self.paging.mark_dirty(mfn)  # validate_page
                validate = self.validators.get(ptype)
                rc = validate(mfn, domid) if validate else self._promote(mfn, int(ptype), domid)
                if rc:
                    ft.type_count[mfn] = count
                    if count == 0:
                        ft.type[mfn] = PageType.none
                    return rc
                ft.validated[mfn] = True
                if ptype == PageType.l1 and self.paging is not None:
                    self.paging.l1_validated(mfn, domid)
        return 0

    def put_page_type(self, mfn: int) -> None:
        ft = self.frames
        assert ft.type_count[mfn] > 0, f"type_count underflow on mfn {mfn:#x}"
        ft.type_count[mfn] -= 1
        if ft.type_count[mfn] == 0 and ft.validated[mfn] and 1 <= ft.type[mfn] <= 4:
            self._devalidate(mfn)

    def get_page_and_type(self, mfn: int, ptype: PageType, domid: int) -> int:
        if not self.get_page(mfn, domid):
            return -EINVAL
        rc = self.get_page_type(mfn, ptype, domid)
        if rc:
            self.put_page(mfn)
        return rc

    def put_page_and_type(self, mfn: int) -> None:
        self.put_page_type(mfn)
        self.put_page(mfn)

    # --- entries ---------------------------------------------------------------------

    def get_entry(self, level: int, pte: int, domid: int, table_mfn: int) -> int:
        """Take the references a present entry at ``level`` needs (Xen's
        get_page_from_lNe); 0 or a negative errno."""
        if not pte & _PAGE_PRESENT:
            return 0
        if not flags_ok(level, pte):
            return -EINVAL  # "Bad L%d flags" (PSE above L1 included)
        mfn = pte_mfn(pte)
        ft = self.frames
        if mfn >= ft.nr_frames:
            # not RAM: device memory, mappable by an L1 entry of a domain the
            # toolstack gave access; no frame, so no reference is taken. Above
            # L1 it is no table (get_page_and_type_from_mfn: -EINVAL)
            if level != 1:
                return -EINVAL
            if self.iomem_permitted(domid, mfn):
                return 0
            if mfn == _PTE_FRAME_ALL_ONES:
                return -EINVAL
            return -EPERM  # "non-privileged attempt to map MMIO space"
        if level == 1:
            if ft.owner[mfn] != domid:
                return -EBUSY  # foreign or hypervisor frame: could_not_pin
            if pte & _PAGE_RW:
                if not self.get_page(mfn, domid):
                    return -EBUSY
                if self.get_page_type(mfn, PageType.writable, domid):
                    self.put_page(mfn)
                    return -EBUSY  # "Could not get page type PGT_writable_page"
                return 0
            return 0 if self.get_page(mfn, domid) else -EBUSY
        if ft.owner[mfn] != domid:
            return -EINVAL
        want = LEVEL_TYPE[level - 1]
        if not self.get_page(mfn, domid):
            return -EINVAL
        rc = self.get_page_type(mfn, want, domid)
        if rc == 0:
            return 0
        self.put_page(mfn)
        if rc == -EINVAL and self._get_linear(level, pte, table_mfn, domid):
            return 0
        return rc

    def _get_linear(self, level: int, pte: int, table_mfn: int, domid: int) -> bool:
        """A linear (recursive) entry, as Xen's get_lN_linear_pagetable: read-only
        (XSA-182); a table mapping itself takes no reference and may do so while
        it is being validated; another table must be validated, of the same
        level, hold no linear entries itself, and the table holding the entry
        must not be mapped linearly elsewhere."""
        if pte & _PAGE_RW:
            return False
        mfn = pte_mfn(pte)
        if mfn == table_mfn:
            return True
        ft = self.frames
        if ft.owner[table_mfn] != domid or ft.linear[table_mfn] < 0 or ft.linear[mfn] > 0:
            return False
        if not (int(ft.type[mfn]) == level and ft.validated[mfn] and ft.type_count[mfn] > 0):
            return False
        if not self.get_page(mfn, domid):
            return False
        ft.linear[table_mfn] += 1
        ft.linear[mfn] -= 1
        ft.type_count[mfn] += 1
        return True

    def put_entry(self, level: int, pte: int, table_mfn: int) -> None:
        """Drop what get_entry took for ``pte``, an entry of ``table_mfn``."""
        if not pte & _PAGE_PRESENT:
            return
        mfn = pte_mfn(pte)
        ft = self.frames
        if mfn >= ft.nr_frames:
            return  # device memory: get_entry took nothing
        if level == 1:
            if pte & _PAGE_RW:
                self.put_page_type(mfn)
            self.put_page(mfn)
            return
        if mfn == table_mfn:
            return  # a table mapping itself holds no reference
        if int(ft.type[mfn]) == level:  # a linear entry (Xen's put_pt_page)
            ft.linear[mfn] += 1
            ft.linear[table_mfn] -= 1
        self.put_page_type(mfn)
        self.put_page(mfn)

    # --- whole tables ----------------------------------------------------------------

    def _slots(self, level: int) -> range:
        return range(ENTRIES_PER_TABLE)

    def _promote(self, mfn: int, level: int, domid: int) -> int:
        table = self.memory.frame(mfn)
        if level == 1:
            return self._promote_l1(mfn, table, domid)
        done: list[int] = []
        present = np.flatnonzero(table & np.uint64(_PAGE_PRESENT))
        for slot in present.tolist():
            if level == 4 and not is_guest_l4_slot(slot):
                continue
            pte = int(table[slot])
            rc = self.get_entry(level, pte, domid, mfn)
            if rc:
                for s in reversed(done):
                    self.put_entry(level, int(table[s]), mfn)
                return rc
            table[slot] = adjust_guest_entry(level, pte)
            done.append(slot)
        if level == 4:
            for slot, entry in self.xen_l4_slots.items():
                table[slot] = entry
        return 0

    def _promote_l1(self, mfn: int, table: np.ndarray, domid: int) -> int:
        """Validate an L1 in bulk: the common case (the guest's own RAM) is one
        vectorised pass; anything unusual falls back to the per-entry rules."""
        present = (table & np.uint64(_PAGE_PRESENT)) != 0
        if not present.any():
            return 0
        ptes = table[present]
        frames = self._l1_simple(ptes, domid)
        if frames is not None:
            self._take_l1(*frames)
            table[present] = adjust_guest_l1es(ptes)
            return 0
        # slow path: exact per-entry semantics and error
        done: list[int] = []
        for slot in np.flatnonzero(present).tolist():
            pte = int(table[slot])
            rc = self.get_entry(1, pte, domid, mfn)
            if rc:
                for s in reversed(done):
                    self.put_entry(1, int(table[s]), mfn)
                return rc
            table[slot] = adjust_guest_entry(1, pte)
            done.append(slot)
        return 0

    def _l1_simple(self, ptes: np.ndarray, domid: int, busy: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Present L1 entries that the vectorised pass may take: flags an L1
        allows, no grant mapping, RAM the domain owns, and no writable
        mapping of a frame in use as a pagetable (this table itself counts:
        its own type ref is already taken) or of one in ``busy`` (a bool per
        frame: the tables a bulk validation is about to type). Returns what
        _take_l1 takes (the frames mapped, the ones mapped writable, which
        of those are untyped), or None."""
        ft = self.frames
        if (ptes & np.uint64((~_L1_ALLOWED & 0xFFF) | _PAGE_GNTTAB)).any():
            return None
        mfns = ((ptes & _U64_FRAME) >> np.uint64(12)).astype(np.intp)
        if mfns.size and int(mfns.max()) >= ft.nr_frames:
            return None
        if not (ft.owner[mfns] == domid).all():
            return None
        rw_mfns = mfns[(ptes & np.uint64(_PAGE_RW)) != 0]
        untyped = ft.type_count[rw_mfns] == 0
        bad_rw = ~untyped & (ft.type[rw_mfns] != PageType.writable)
        if busy is not None:
            bad_rw |= busy[rw_mfns]
        return None if bad_rw.any() else (mfns, rw_mfns, untyped)

    def _take_l1(self, mfns: np.ndarray, rw_mfns: np.ndarray, untyped: np.ndarray) -> None:
        """What get_entry takes for present L1 entries that _l1_simple let
        through (given its answer): a general reference each, and a writable
        type reference for each writable one (the frame becoming writable if
        it was nothing)."""
        ft = self.frames
        _count_into(ft.ref_count, mfns)
        ft.type[rw_mfns[untyped]] = PageType.writable
        ft.validated[rw_mfns] = True
        _count_into(ft.type_count, rw_mfns)

    def validate_l1s(self, mfns: np.ndarray, busy: np.ndarray, domid: int) -> bool:
        """Validate many L1s at once, ahead of the pins that will reference
        them (a restore's: Xen validates each table as its first type
        reference is taken, and the rules are the same here, over all the
        tables' entries in one vectorised pass). Every one must be the
        domain's, of no type in use, and pass _l1_simple with ``busy`` (a
        bool per frame: every table the pins will type, these included).
        Then each becomes a validated L1 with no type reference yet (the
        pins take them; release_unreferenced puts back the ones they did
        not). Returns False if any table needs the one-by-one rules, having
        changed no type or reference (an absent table among them has been
        filled, as any read fills it): the pins then validate as usual, with
        their exact errors."""
        ft = self.frames
        if not mfns.size:
            return True
        if not ((ft.owner[mfns] == domid) & (ft.type_count[mfns] == 0)).all():
            return False
        rows = self.memory.u64.reshape(-1, ENTRIES_PER_TABLE)
        self.memory.populate_many(mfns)
        tables = rows[mfns]
        present = (tables & np.uint64(_PAGE_PRESENT)) != 0
        frames = self._l1_simple(tables[present], domid, busy)
        if frames is None:
            return False
        was_writable = ft.type[mfns] == PageType.writable
        ft.type[mfns] = PageType.l1
        ft.validated[mfns] = True
        self._take_l1(*frames)
        rows[mfns] = np.where(present, adjust_guest_l1es(tables), tables)
        if was_writable.any():
            self.on_type_change(domid)
        if self.paging is not None:
            for m in mfns.tolist():
                self.paging.mark_dirty(m)  # validate_page
                self.paging.l1_validated(m, domid)
        return True

    def release_unreferenced(self, mfns: np.ndarray) -> None:
        """The L1s validate_l1s validated that no pin referenced: devalidated
        again (the state a type count of zero has)."""
        ft = self.frames
        for m in mfns[(ft.type_count[mfns] == 0) & ft.validated[mfns]].tolist():
            self._devalidate(m)

    def _devalidate(self, mfn: int) -> None:
        """A pagetable with no type reference left (its last put_page_type, or
        one validate_l1s validated ahead that nothing took) loses its
        validation and what its entries took (devalidate_page)."""
        ft = self.frames
        ft.validated[mfn] = False
        level = int(ft.type[mfn])
        if self.paging is not None:
            self.paging.mark_dirty(mfn)  # devalidate_page
            if level == 1:
                self.paging.l1_devalidating(mfn, int(ft.owner[mfn]))
        self._demote(mfn, level)

    def _demote(self, mfn: int, level: int) -> None:
        table = self.memory.frame(mfn)
        present = np.flatnonzero(table & np.uint64(_PAGE_PRESENT))
        if level == 1:
            ptes = table[present]
            mfns = ((ptes & _U64_FRAME) >> np.uint64(12)).astype(np.int64)
            ft = self.frames
            ram = mfns < ft.nr_frames  # device memory holds no references
            ptes, mfns = ptes[ram], mfns[ram]
            rw = mfns[(ptes & np.uint64(_PAGE_RW)) != 0]
            if (ft.type_count[rw] == 0).any() or (ft.ref_count[mfns] == 0).any():
                raise AssertionError(f"count underflow demoting L1 {mfn:#x}")
            np.subtract.at(ft.type_count, rw, 1)
            np.subtract.at(ft.ref_count, mfns, 1)
            gone = np.unique(mfns[ft.ref_count[mfns] == 0])
            for m in gone.tolist():
                if ft.owner[m] not in (FREE, DOMID_XEN):
                    ft.free(m)
            return
        for slot in present.tolist():
            if level == 4 and not is_guest_l4_slot(slot):
                continue
            self.put_entry(level, int(table[slot]), mfn)


__all__ = ["PageTypes", "LEVEL_TYPE", "is_guest_l4_slot", "pte_mfn", "flags_ok",
           "adjust_guest_entry",
           "_PAGE_PSE"]
