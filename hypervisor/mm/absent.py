"""Absent frames: machine frames whose contents are "not yet here".

A lazy restore (the rest of the image read when touched) and post-copy (the
rest of the guest still at the source) both start a domain before all its
memory has arrived. Here a frame may be marked *absent*; whoever made it so
registers the handler that fetches it (``fetch(mfns)`` writes the frames'
contents into machine memory), and every access to an absent frame calls that
handler first and then goes on as if the frame had always been there. This is
Xen's paged-out frame (p2m_ram_paged, populated by p2m_mem_paging_populate
through the pager's ring) and QEMU's userfaultfd-registered RAM, made one
mechanism under every reader of machine memory:

* the hypervisor's, the toolstack's and the Python kernel's reads and writes,
  through ``MachineMemory``'s accessors and the walker (a check of one integer
  when nothing is absent);
* the VCPUs' loads, stores and fetches: a 2 MiB *chunk* of machine memory that
  holds an absent frame is left unmapped in each Unicorn engine, whose
  unmapped-memory hook fills the whole chunk and maps it (Unicorn's cost grows
  with its number of regions, so the unit there is the chunk, not the frame);
* the MMU's own pagetable walk, which reads an unmapped chunk silently as
  zeros and raises a #PF: the VCPU's fault path fills the chunks the walk
  crosses and runs the instruction again, so the guest never sees that fault.

A frame filled once stays present: nothing here makes it absent again but a
new ``mark_absent``. The low layer never names its clients: the handler is
registered.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CHUNK_SHIFT = 9            # frames per chunk: 512, 2 MiB (an order-9 extent)
CHUNK_FRAMES = 1 << CHUNK_SHIFT

Fetch = Callable[[np.ndarray], None]
Poll = Callable[[], None]


class AbsentFrames:
    """Which machine frames are absent, and who fetches them."""

    def __init__(self, nr_frames: int) -> None:
        self.nr_frames = nr_frames
        self.absent = np.zeros(nr_frames, dtype=bool)
        nr_chunks = -(-nr_frames // CHUNK_FRAMES)
        self.chunk_absent = np.zeros(nr_chunks, dtype=np.int32)  # absent frames per chunk
        self.count = 0             # absent frames on the machine: 0 is the fast path
        self.generation = 0        # bumped by each mark_absent: engines resync
        self.fetch: Fetch | None = None
        self.fetched = 0           # frames the handler filled
        self.fetch_calls = 0       # its calls (a batch is one)
        self.background = 0        # frames the background pass fills between slices
        self.poll: Poll | None = None  # the pager's own work between slices
        # the VCPUs' faults served, by kind: "read", "write", "fetch" (an
        # access to an unmapped chunk) and "walk" (the MMU's walk crossed one)
        self.faults = dict.fromkeys(("read", "write", "fetch", "walk"), 0)
        self._cursor = 0           # where it goes on from

    def register(self, fetch: Fetch | None) -> None:
        """The handler that fills absent frames (None: none; an access to an
        absent frame is then a bug, and raises)."""
        self.fetch = fetch

    def mark_absent(self, mfns: np.ndarray) -> None:
        """These frames' contents are not here yet (p2m_mem_paging_evict, or
        xc_mem_paging_populate_evicted for a frame that never had them)."""
        wanted = np.zeros(self.nr_frames, dtype=bool)
        wanted[np.asarray(mfns, dtype=np.int64)] = True
        mfns = np.flatnonzero(wanted & ~self.absent)
        if not mfns.size:
            return
        self.absent[mfns] = True
        self.chunk_absent += np.bincount(mfns >> CHUNK_SHIFT,
                                         minlength=self.chunk_absent.size).astype(np.int32)
        self.count += int(mfns.size)
        self.generation += 1

    def discard(self, mfns: np.ndarray | int) -> None:
        """These frames are being overwritten whole (a new allocation, a
        zeroed frame): their absent contents are no longer wanted."""
        if not self.count:
            return
        mfns = np.atleast_1d(np.asarray(mfns, dtype=np.int64))
        self._present(mfns[self.absent[mfns]])

    def _present(self, mfns: np.ndarray) -> None:
        if not mfns.size:
            return
        self.absent[mfns] = False
        self.chunk_absent -= np.bincount(mfns >> CHUNK_SHIFT,
                                         minlength=self.chunk_absent.size).astype(np.int32)
        self.count -= int(mfns.size)

    # --- filling -------------------------------------------------------------------

    def populate(self, mfn: int) -> None:
        """Make one frame present (p2m_mem_paging_populate): call the handler
        if it is absent. The callers check ``count`` first."""
        if self.absent[mfn]:
            self.populate_many(np.array([mfn], dtype=np.int64))

    def populate_range(self, maddr: int, size: int) -> None:
        """Every frame the machine range [maddr, maddr + size) touches."""
        first, last = maddr >> 12, (maddr + max(size, 1) - 1) >> 12
        if first == last:
            self.populate(first)
        else:
            self.populate_many(np.arange(first, min(last, self.nr_frames - 1) + 1))

    def populate_many(self, mfns: np.ndarray) -> None:
        """The absent ones among these frames, in one call of the handler."""
        mfns = np.asarray(mfns, dtype=np.int64)
        want = np.unique(mfns[self.absent[mfns]])
        if not want.size:
            return
        if self.fetch is None:
            raise RuntimeError(f"{want.size} absent frames touched and no handler "
                               "registered to fetch them")
        self.fetch_calls += 1
        self.fetch(want)
        self.fetched += int(want.size)
        self._present(want)

    def populate_chunk(self, chunk: int) -> None:
        """Every absent frame of one chunk (what a VCPU's access fills)."""
        if self.chunk_absent[chunk]:
            base = chunk << CHUNK_SHIFT
            self.populate_many(base + np.flatnonzero(self.absent[base:base + CHUNK_FRAMES]))

    def populate_some(self, limit: int) -> int:
        """Up to ``limit`` absent frames, lowest first: a background pass's
        step (QEMU's eager thread beside its fault thread). Returns how many
        it filled."""
        if not self.count:
            return 0
        start = self._cursor
        mfns = start + np.flatnonzero(self.absent[start:])[:limit]
        if not mfns.size:  # a frame below the cursor was marked absent again
            self._cursor = 0
            return self.populate_some(limit)
        self._cursor = int(mfns[-1])
        self.populate_many(mfns)
        return int(mfns.size)

    def background_step(self) -> None:
        """Between slices: the pager's ``poll`` (a post-copy's pages that have
        arrived, applied without waiting), then ``background`` frames (0: no
        background pass)."""
        if self.poll is not None:
            self.poll()
        if self.count and self.background:
            self.populate_some(self.background)

    def absent_chunks(self) -> np.ndarray:
        """Chunks that hold an absent frame."""
        return np.flatnonzero(self.chunk_absent)
