"""Log-dirty mode: the pfns a domain's memory was written at since the last
CLEAN, for live migration's rounds (Xen's paging log-dirty,
xen/arch/x86/mm/paging.c: paging_log_dirty_enable/disable, paging_log_dirty_op,
paging_mark_dirty, paging_mark_pfn_dirty).

How a write is seen:

* **x86 stores, kernel or user.** The emulated MMU sets the dirty bit (D) of
  the L1 entry a store goes through, as a real one does. ENABLE, CLEAN and
  PEEK take the D bit off every entry of the domain's L1 tables that maps one
  of its frames writable, and each entry found with D set again marks the
  frame it maps; then every TLB of the domain is flushed, so that the next
  store through the entry walks the tables and sets D once more. Xen's PV
  log-dirty runs the guest on shadow pagetables with write access removed and
  marks the page on the write fault (sh_page_fault); the D bit is the same
  fact for nothing per store (bench/logdirty.py measures both).
* **The guest keeps its D bits.** A bit taken off is remembered (``hidden``)
  and the guest sees it wherever the hypervisor reads its tables for it: the
  walker's reads (the Python kernel's loads, copy_from_guest), the old entry
  that MMU_PT_UPDATE_PRESERVE_AD keeps, the writable-pagetable emulation,
  the toolstack's copies through its foreign mappings. It is written back
  when the entry is rewritten, when the frame stops being an L1, and at OFF.
  (An x86 load of a pagetable entry through the guest's own read-only
  mapping would see the bit off: pvlab's kernel is Python and reads its
  tables through the walker.)
* **Writes made in software.** The walker marks every frame it translates a
  write to: copy_to_guest, bounce frames, the Python kernel's stores. The
  hypervisor marks its other writes where Xen calls paging_mark_dirty: a
  pagetable entry written, a frame becoming or ceasing to be a validated
  table, a pin or unpin, MMUEXT_CLEAR_PAGE/COPY_PAGE, update_descriptor,
  MMU_MACHPHYS_UPDATE (its pfn), a pfn populated again, a device's DMA into
  the domain's memory, and what the toolstack's backends tell it they wrote
  (modified_memory).

As in Xen, only frames the domain owns are marked, by their pfn in the M2P; a
pfn with the top bit set (no pfn, as shared_info's) and hypervisor pages
shared with the domain are not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hypervisor.mm.frames import FrameTable, PageType
from hypervisor.mm.memory import ENTRIES_PER_TABLE, PAGE_SHIFT, MachineMemory
from hypervisor.mm.walker import Walker
from hypervisor.public.arch_x86 import _PAGE_DIRTY, _PAGE_PRESENT, _PAGE_RW, PTE_FRAME_MASK
from hypervisor.public.errno import EINVAL

_D = np.uint64(_PAGE_DIRTY)
_WRITTEN = np.uint64(_PAGE_PRESENT | _PAGE_RW | _PAGE_DIRTY)
_FRAME = np.uint64(PTE_FRAME_MASK)
_PFN_INVALID_BIT = 1 << 63  # Xen's VALID_M2P: a pfn with the top bit set is none
UINT32_MAX = 0xFFFFFFFF


@dataclass
class DirtyLog:
    """One domain's log (Xen's d->arch.paging.log_dirty): the dirty pfns and
    the counts since the last CLEAN. ``faults`` counts the L1 entries found
    written: the write faults Xen's shadow mode would have taken."""

    pfns: set[int] = field(default_factory=set)
    faults: int = 0


@dataclass(frozen=True)
class LogDirtyStats:
    """xen_domctl_shadow_op_stats, each capped at UINT32_MAX as Xen does."""

    fault_count: int
    dirty_count: int


class Paging:
    """Log-dirty for every domain of a machine. The walker, the page-type
    system, the MMU hypercalls and the devices are handed its marking
    functions; it names none of them."""

    def __init__(self, frames: FrameTable, memory: MachineMemory, m2p: np.ndarray,
                 walker: Walker) -> None:
        self.frames = frames
        self.memory = memory
        self.m2p = m2p
        self.walker = walker
        self.logs: dict[int, DirtyLog] = {}
        # L1 mfn -> the slots whose D bit the guest set and log-dirty took off
        self.hidden: dict[int, np.ndarray] = {}
        walker.hidden_dirty = self.hidden

    def enabled(self, domid: int) -> bool:
        return domid in self.logs

    # --- the domctls ---------------------------------------------------------------

    def enable(self, domid: int) -> int:
        """paging_log_dirty_enable: an empty log (-EINVAL if there is one); the
        D bits of the domain's L1 entries are taken now, so that the first
        CLEAN reports only what was written after this."""
        if domid in self.logs:
            return -EINVAL
        self.logs[domid] = DirtyLog()
        self.walker.on_write = self.mark_dirty
        self._collect(domid, self._l1_tables(domid), mark=False)
        return 0

    def disable(self, domid: int) -> int:
        """paging_log_dirty_disable: the log goes and the guest gets its D bits back."""
        if self.logs.pop(domid, None) is None:
            return 0
        for mfn in self._l1_tables(domid).tolist():
            self._give_back(mfn)
        if not self.logs:
            self.walker.on_write = None
        return 0

    def forget(self, domid: int) -> None:
        """The domain is being destroyed: drop its log, write nothing back."""
        self.logs.pop(domid, None)
        for mfn in [m for m in self.hidden if self.frames.owner[m] == domid]:
            del self.hidden[mfn]
        if not self.logs:
            self.walker.on_write = None

    def log_dirty_op(self, domid: int, clean: bool, pages: int,
                     bitmap: np.ndarray | None) -> tuple[int, LogDirtyStats]:
        """paging_log_dirty_op (CLEAN or PEEK): the dirty state the MMU holds is
        collected first; the bits of pfns below ``pages`` go to ``bitmap``
        (uint8, bit pfn % 8 of byte pfn // 8, as Xen's unsigned-long bitmap
        lies in memory; None: the counts only); CLEAN then empties the log
        and zeroes its counts. Returns the bits produced and the counts. The
        caller flushes the domain's TLBs. A domain not in log-dirty mode has
        an empty log, as in Xen."""
        log = self.logs.get(domid)
        if log is None:
            log = DirtyLog()
        else:
            self._collect(domid, self._l1_tables(domid), mark=True)
        stats = LogDirtyStats(min(log.faults, UINT32_MAX), min(len(log.pfns), UINT32_MAX))
        if bitmap is not None:
            self._copy_out(log, pages, bitmap)
        if clean:
            log.pfns.clear()
            log.faults = 0
        return pages, stats

    @staticmethod
    def _copy_out(log: DirtyLog, pages: int, bitmap: np.ndarray) -> None:
        bits = np.zeros(-(-pages // 8) * 8, dtype=bool)
        pfns = np.fromiter((p for p in log.pfns if p < pages), dtype=np.int64)
        bits[pfns] = True
        out = np.packbits(bits, bitorder="little")
        bitmap[:out.size] = out

    # --- marking -------------------------------------------------------------------

    def mark_dirty(self, mfn: int) -> None:
        """paging_mark_dirty: frame ``mfn`` was written; its owner's log gets
        its pfn if the owner is in log-dirty mode."""
        if not self.logs or not 0 <= mfn < self.frames.nr_frames:
            return
        log = self.logs.get(int(self.frames.owner[mfn]))
        if log is None or self.frames.xenheap[mfn]:
            return
        pfn = int(self.m2p[mfn])
        if not pfn & _PFN_INVALID_BIT:
            log.pfns.add(pfn)

    def mark_range(self, maddr: int, length: int) -> None:
        """Every frame of machine memory [maddr, maddr + length) was written
        (a device's DMA)."""
        if self.logs and length > 0:
            for mfn in range(maddr >> PAGE_SHIFT, ((maddr + length - 1) >> PAGE_SHIFT) + 1):
                self.mark_dirty(mfn)

    def mark_pfn_dirty(self, domid: int, pfn: int) -> None:
        """paging_mark_pfn_dirty: by pfn (MMU_MACHPHYS_UPDATE, the toolstack's
        modified_memory)."""
        log = self.logs.get(domid)
        if log is not None and not pfn & _PFN_INVALID_BIT:
            log.pfns.add(pfn)

    # --- the guest's L1 entries ----------------------------------------------------

    def _l1_tables(self, domid: int) -> np.ndarray:
        ft = self.frames
        return np.flatnonzero((ft.owner == domid) & (ft.type == PageType.l1) & ft.validated)

    def _written(self, domid: int, entries: np.ndarray) -> np.ndarray:
        """Which entries map a frame of ``domid`` writable with D set."""
        ft = self.frames
        mfns = ((entries & _FRAME) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        ram = mfns < ft.nr_frames
        mfns = np.where(ram, mfns, 0)
        return ((entries & _WRITTEN) == _WRITTEN) & ram & (ft.owner[mfns] == domid) \
            & ~ft.xenheap[mfns]

    def _collect(self, domid: int, l1s: np.ndarray, mark: bool) -> None:
        """Take the D bit off every written entry of these L1 tables, marking
        the frames they map (``mark``) and remembering the bits for the guest."""
        if not l1s.size:
            return
        self.memory.populate_many(l1s)
        rows = self.memory.u64.reshape(-1, ENTRIES_PER_TABLE)
        tables = rows[l1s]
        written = self._written(domid, tables)
        hit = np.flatnonzero(written.any(axis=1))
        if not hit.size:
            return
        if mark:
            log = self.logs[domid]
            mfns = ((tables[written] & _FRAME) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            log.faults += int(mfns.size)
            pfns = self.m2p[mfns]
            log.pfns.update(int(p) for p in pfns[(pfns >> np.uint64(63)) == 0].tolist())
            # the MMU wrote the D bit into these tables: they are dirty too,
            # as when Xen's guest_walk_tables sets an A/D bit
            for mfn in l1s[hit].tolist():
                self.mark_dirty(mfn)
        rows[l1s[hit]] = tables[hit] & ~(written[hit].astype(np.uint64) * _D)
        for i in hit.tolist():
            mfn = int(l1s[i])
            mask = self.hidden.get(mfn)
            self.hidden[mfn] = written[i].copy() if mask is None else mask | written[i]

    def _give_back(self, mfn: int) -> None:
        """Write the D bits the guest set back into an L1 and forget them."""
        mask = self.hidden.pop(mfn, None)
        if mask is not None:
            table = self.memory.frame(mfn)
            table[mask] |= _D

    def l1_validated(self, mfn: int, domid: int) -> None:
        """A frame became a validated L1: its entries hold the D bits the
        guest wrote, no evidence of a store. Take them without marking."""
        if domid in self.logs:
            self._collect(domid, np.array([mfn], dtype=np.int64), mark=False)

    def l1_devalidating(self, mfn: int, domid: int) -> None:
        """An L1 stops being one (Xen's devalidate_page): what was written
        through its entries is marked before the entries go, and it gets its
        D bits back, as a page of data the guest may read."""
        if domid in self.logs:
            self._collect(domid, np.array([mfn], dtype=np.int64), mark=True)
        self._give_back(mfn)

    def l1_entry_written(self, table_mfn: int, slot: int, old: int, domid: int) -> None:
        """An L1 entry was rewritten (mmu_update, update_va_mapping, the
        writable-pagetable emulation): what was written through the old one
        is marked, the new one's D bit is the guest's and is taken."""
        log = self.logs.get(domid)
        if log is None:
            return
        if self._written(domid, np.array([old], dtype=np.uint64))[0]:
            log.faults += 1
            self.mark_dirty((old & PTE_FRAME_MASK) >> PAGE_SHIFT)
        table = self.memory.frame(table_mfn)
        new = table[slot:slot + 1]
        took = bool(self._written(domid, new)[0])
        mask = self.hidden.setdefault(table_mfn, np.zeros(ENTRIES_PER_TABLE, dtype=bool))
        mask[slot] = took
        if took:
            table[slot] = new[0] & ~_D

    def as_written(self, mfns: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Copies of frames ``mfns`` (``rows``, one per frame) as the guest
        wrote them: the D bits taken given back, in place."""
        if self.hidden and rows.size:
            for i in np.flatnonzero(np.isin(mfns, np.fromiter(self.hidden, dtype=np.int64))):
                rows[i][self.hidden[int(mfns[i])]] |= _D
        return rows

    def guest_entry(self, table_mfn: int, slot: int, raw: int) -> int:
        """An entry as the guest wrote it: ``raw`` with the D bit log-dirty took."""
        mask = self.hidden.get(table_mfn)
        return raw | _PAGE_DIRTY if mask is not None and mask[slot] else raw


__all__ = ["DirtyLog", "LogDirtyStats", "Paging"]
