"""The frame table: per machine frame, who owns it and what it is used as.

Xen keeps a ``struct page_info`` per frame; pvlab keeps the same facts in numpy
arrays indexed by mfn so that invariant checks and bulk work (save, restore,
recounts) are vectorised:

* ``owner``: domain id, ``DOMID_XEN`` for the hypervisor's own frames, or FREE;
* ``type``: what the frame is used as (none, writable, L1..L4), only changeable
  while ``type_count`` is zero;
* ``type_count``: references that need the frame to stay of its type (pins,
  pagetable entries pointing at it, writable mappings, a VCPU's CR3);
* ``ref_count``: general references (allocation, every mapping, every type ref);
* ``pinned`` and ``validated`` bits, and ``allocated`` (Xen's PGC_allocated: the
  domain still holds the reference its allocation gave it);
* ``linear``: Xen's linear_pt_count: a table's linear (same-level) entries
  when positive, the linear entries mapping it when negative; never both.

Allocation is shuffled with a seed, so a guest's pfn->mfn map is never the
identity and a restored guest lands on different frames. It is shuffled by
2 MiB chunk: a seeded order of chunks, each shuffled inside and filled before
the next is opened. Scattering every frame over the whole machine would leave
no free aligned 2 MiB run, and no order-9 extent could ever be allocated.
"""

from __future__ import annotations

import enum

import numpy as np

from hypervisor.mm.memory import MachineMemory
from hypervisor.public.xen import DOMID_XEN, INVALID_MFN

FREE = -1
CHUNK_FRAMES = 512  # 2 MiB


class PageType(enum.IntEnum):
    """Xen's PGT_* page types (asm/mm.h), in pvlab's numbering."""

    none = 0
    l1 = 1
    l2 = 2
    l3 = 3
    l4 = 4
    seg_desc = 5  # a GDT or LDT frame (PGT_seg_desc_page)
    writable = 7


class OutOfMemory(Exception):
    """No free machine frame is left."""


class FrameTable:
    """Frame table and allocator for all of machine memory."""

    def __init__(self, memory: MachineMemory, seed: int) -> None:
        n = memory.nr_frames
        self.memory = memory
        self.nr_frames = n
        self.owner = np.full(n, FREE, dtype=np.int32)
        self.type = np.zeros(n, dtype=np.uint8)
        self.type_count = np.zeros(n, dtype=np.uint32)
        self.ref_count = np.zeros(n, dtype=np.uint32)
        self.pinned = np.zeros(n, dtype=bool)
        self.validated = np.zeros(n, dtype=bool)
        self.allocated = np.zeros(n, dtype=bool)
        self.linear = np.zeros(n, dtype=np.int16)
        # a hypervisor page shared with a domain (shared_info): mappable by it,
        # not part of its reservation (Xen's PGC_xen_heap)
        self.xenheap = np.zeros(n, dtype=bool)
        # never handed out since the machine's memory was mapped (an anonymous
        # mapping: zeros): such a frame needs no zeroing, nor its pages touched
        self.pristine = np.ones(n, dtype=bool)
        self.m2p: np.ndarray | None = None  # set by the machine: entries die with frames
        rng = np.random.default_rng(seed)
        # the free list is a stack of mfns, popped from its end (``_top``: how
        # many are on it), an array so that a restore takes 262144 frames in
        # one slice; frame 0 is never handed out so that a zero mfn in a guest
        # structure is always a bug
        order = [rng.permutation(np.arange(max(first, 1), min(first + CHUNK_FRAMES, n),
                                           dtype=np.int64))
                 for first in (rng.permutation(-(-n // CHUNK_FRAMES)) * CHUNK_FRAMES).tolist()]
        self._stack = np.concatenate(order)[::-1].copy()
        self._top = self._stack.size
        self.owner[0] = DOMID_XEN

    @property
    def nr_free(self) -> int:
        return self._top

    def free_mfns(self) -> np.ndarray:
        """The free list, last to be handed out first (for the audit)."""
        return self._stack[:self._top]

    def unlist(self, mfns: np.ndarray) -> None:
        """Take these frames off the free list (the machine's own), keeping
        the order of the rest."""
        live = self._stack[:self._top]
        drop = np.zeros(self.nr_frames, dtype=bool)
        drop[mfns] = True
        keep = live[~drop[live]]
        self._stack[:keep.size] = keep
        self._top = int(keep.size)

    def alloc(self, owner: int) -> int:
        """Take one free frame for ``owner``, zeroed, holding one allocation ref."""
        if not self._top:
            raise OutOfMemory("no free machine frames")
        self._top -= 1
        mfn = int(self._stack[self._top])
        self._take(mfn, owner)
        return mfn

    def _take(self, mfns: int | np.ndarray, owner: int, zero: bool = True) -> None:
        """A frame, or an array of them, to ``owner`` with its allocation ref."""
        self.owner[mfns] = owner
        self.type[mfns] = PageType.none
        self.type_count[mfns] = 0
        self.ref_count[mfns] = 1
        self.pinned[mfns] = False
        self.validated[mfns] = False
        self.allocated[mfns] = True
        self.linear[mfns] = 0
        # a new allocation's contents are its taker's: nothing left to fetch
        self.memory.absent.discard(mfns)
        if zero:
            used = np.atleast_1d(mfns)
            used = used[~self.pristine[used]]
            if used.size:
                self.memory.u64.reshape(self.nr_frames, -1)[used] = 0
        self.pristine[mfns] = False

    def alloc_many(self, owner: int, count: int, zero: bool = True) -> list[int]:
        """``count`` frames, as ``count`` calls of alloc would give them, in bulk;
        ``zero=False`` for a caller that overwrites every byte of them at once."""
        return self.alloc_array(owner, count, zero).tolist()

    def alloc_array(self, owner: int, count: int, zero: bool = True) -> np.ndarray:
        """alloc_many's frames as an array of mfns (int64)."""
        if count > self._top:
            raise OutOfMemory(f"{count} frames wanted, {self._top} free")
        if count <= 0:
            return np.zeros(0, dtype=np.int64)
        mfns = self._stack[self._top - count:self._top][::-1].copy()
        self._top -= count
        self._take(mfns, owner, zero)
        return mfns

    def alloc_contiguous(self, owner: int, order: int) -> list[int]:
        """2**order machine-contiguous frames, aligned to their size (an extent
        of order > 0, which a PV guest addresses as mfn + j)."""
        n = 1 << order
        if order == 0:
            return [self.alloc(owner)]
        free = self.owner == FREE
        blocks = free[: len(free) // n * n].reshape(-1, n).all(axis=1)
        candidates = np.flatnonzero(blocks)
        if not candidates.size:
            raise OutOfMemory(f"no free run of {n} contiguous frames")
        first = int(candidates[0]) * n
        self.unlist(np.arange(first, first + n))
        self._take(np.arange(first, first + n), owner)
        return list(range(first, first + n))

    def free(self, mfn: int) -> None:
        """Return a frame whose last reference has gone to the free list."""
        if self.ref_count[mfn] or self.type_count[mfn]:
            raise AssertionError(f"freeing referenced mfn {mfn:#x}")
        self.owner[mfn] = FREE
        self.type[mfn] = PageType.none
        self.pinned[mfn] = False
        self.validated[mfn] = False
        self.allocated[mfn] = False
        self.xenheap[mfn] = False
        self.linear[mfn] = 0
        self.memory.absent.discard(mfn)  # a freed frame's contents are nobody's
        if self.m2p is not None:
            self.m2p[mfn] = INVALID_MFN
        self._stack[self._top] = mfn
        self._top += 1

    def owned_by(self, domid: int) -> np.ndarray:
        return np.flatnonzero(self.owner == domid)
