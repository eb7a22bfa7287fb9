"""Machine memory: one host buffer of machine frames shared by every VCPU.

The buffer is an anonymous mmap mapped into each Unicorn engine with
``mem_map_ptr`` at machine address 0, so machine frame number ``mfn`` lives at
machine address ``mfn << 12``. numpy views on the same buffer let the
hypervisor read and write frames with no copies.

Every accessor here first fills an absent frame (``hypervisor/mm/absent.py``):
one integer test when none is absent. Code that takes the raw arrays
(``u64``, ``u8``, ``buf``) for a frame calls ``populate`` itself.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

from hypervisor.mm.absent import AbsentFrames
from hypervisor.public.xen import PAGE_SHIFT, PAGE_SIZE

ENTRIES_PER_TABLE = PAGE_SIZE // 8

__all__ = ["ENTRIES_PER_TABLE", "PAGE_SHIFT", "PAGE_SIZE", "MachineMemory"]


class MachineMemory:
    """The machine's RAM: ``nr_frames`` frames of 4 KiB."""

    def __init__(self, nr_frames: int) -> None:
        if nr_frames <= 0:
            raise ValueError("machine memory needs at least one frame")
        self.nr_frames = nr_frames
        self.size = nr_frames * PAGE_SIZE
        self.buf = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.u8 = np.frombuffer(self.buf, dtype=np.uint8)
        self.u64 = np.frombuffer(self.buf, dtype=np.uint64)
        # the host address Unicorn maps; keep self.buf alive as long as any engine
        # uses it (mem_map_ptr does not hold a reference)
        self.host_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.absent = AbsentFrames(nr_frames)

    def populate(self, mfn: int) -> None:
        """Frame ``mfn``'s contents are here (fetched first if absent)."""
        if self.absent.count:
            self.absent.populate(mfn)

    def populate_many(self, mfns: np.ndarray) -> None:
        if self.absent.count:
            self.absent.populate_many(mfns)

    def frame(self, mfn: int) -> np.ndarray:
        """The 512 64-bit words of frame ``mfn`` (a view, not a copy)."""
        if self.absent.count:
            self.absent.populate(mfn)
        base = mfn * ENTRIES_PER_TABLE
        return self.u64[base:base + ENTRIES_PER_TABLE]

    def frame_bytes(self, mfn: int) -> np.ndarray:
        if self.absent.count:
            self.absent.populate(mfn)
        base = mfn << PAGE_SHIFT
        return self.u8[base:base + PAGE_SIZE]

    def read(self, maddr: int, size: int) -> bytes:
        if self.absent.count:
            self.absent.populate_range(maddr, size)
        return self.buf[maddr:maddr + size]

    def write(self, maddr: int, data: bytes) -> None:
        if self.absent.count:
            self.absent.populate_range(maddr, len(data))
        self.buf[maddr:maddr + len(data)] = data

    def read_u64(self, maddr: int) -> int:
        if self.absent.count:
            self.absent.populate_range(maddr, 8)
        return int(self.u64[maddr >> 3]) if not maddr & 7 else int.from_bytes(
            self.buf[maddr:maddr + 8], "little")

    def write_u64(self, maddr: int, value: int) -> None:
        if self.absent.count:
            self.absent.populate_range(maddr, 8)
        if maddr & 7:
            self.buf[maddr:maddr + 8] = value.to_bytes(8, "little")
        else:
            self.u64[maddr >> 3] = value

    def clear_frame(self, mfn: int) -> None:
        self.absent.discard(mfn)  # overwritten whole: nothing to fetch
        base = mfn * ENTRIES_PER_TABLE
        self.u64[base:base + ENTRIES_PER_TABLE] = 0
