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
* ``pinned`` and ``validated`` bits.

Allocation is shuffled with a seed, so a guest's pfn->mfn map is never the
identity and a restored guest lands on different frames.
"""

from __future__ import annotations

import enum

import numpy as np

from hypervisor.mm.memory import MachineMemory

FREE = -1
DOMID_XEN = 0x7FF2  # xen.h: the hypervisor's own frames
INVALID_M2P = np.uint64(0xFFFFFFFFFFFFFFFF)


class PageType(enum.IntEnum):
    """Xen's PGT_* page types (asm/mm.h), in pvlab's numbering."""

    none = 0
    l1 = 1
    l2 = 2
    l3 = 3
    l4 = 4
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
        rng = np.random.default_rng(seed)
        # the free list is a shuffled stack of mfns; frame 0 is never handed out
        # so that a zero mfn in a guest structure is always a bug
        order = rng.permutation(np.arange(1, n, dtype=np.int64))
        self._free = [int(m) for m in order[::-1]]
        self.owner[0] = DOMID_XEN

    @property
    def nr_free(self) -> int:
        return len(self._free)

    def alloc(self, owner: int) -> int:
        """Take one free frame for ``owner``, zeroed, holding one allocation ref."""
        if not self._free:
            raise OutOfMemory("no free machine frames")
        mfn = self._free.pop()
        self.owner[mfn] = owner
        self.type[mfn] = PageType.none
        self.type_count[mfn] = 0
        self.ref_count[mfn] = 1
        self.pinned[mfn] = False
        self.validated[mfn] = False
        self.memory.clear_frame(mfn)
        return mfn

    def alloc_many(self, owner: int, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfMemory(f"{count} frames wanted, {len(self._free)} free")
        return [self.alloc(owner) for _ in range(count)]

    def free(self, mfn: int) -> None:
        """Return a frame whose last reference has gone to the free list."""
        if self.ref_count[mfn] or self.type_count[mfn]:
            raise AssertionError(f"freeing referenced mfn {mfn:#x}")
        self.owner[mfn] = FREE
        self.type[mfn] = PageType.none
        self.pinned[mfn] = False
        self.validated[mfn] = False
        self._free.append(mfn)

    def owned_by(self, domid: int) -> np.ndarray:
        return np.flatnonzero(self.owner == domid)
