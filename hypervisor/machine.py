"""The machine: machine memory, the frame table, the M2P, the software pagetable
walker every access on a guest's behalf goes through, and the hypervisor's own
mappings that every guest L4 carries in the slots Xen reserves for itself.

Hypervisor frames sit at the bottom of machine memory (frame 0 is never used, so
a zero mfn is always a bug), and everything above is handed out shuffled.

Xen L4 slots filled into every validated L4 (Xen's init_xen_l4_slots):

* slot 256: the M2P, read-only and user-visible at MACH2PHYS_VIRT_START, so a PV
  guest can translate mfn -> pfn itself;
* slot 261: hypervisor text, supervisor-only: the one ``iretq`` that takes a new
  VCPU from CPL0 to CPL3, its stack, and the GDT page holding the flat ring-3
  selectors (FLAT_RING3_CS64 and FLAT_RING3_SS64).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from hypervisor.mm.frames import DOMID_XEN, FrameTable
from hypervisor.mm.logdirty import Paging
from hypervisor.mm.memory import ENTRIES_PER_TABLE, PAGE_SHIFT, PAGE_SIZE, MachineMemory
from hypervisor.mm.pagetable import PageTypes
from hypervisor.mm.walker import Walker
from hypervisor.public.arch_x86 import (
    _PAGE_ACCESSED,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    FLAT_RING3_CS64,
    FLAT_RING3_SS64,
    MACH2PHYS_VIRT_START,
)
from hypervisor.public.xen import INVALID_MFN


def l4_slot(va: int) -> int:
    return (va >> 39) & 511


XEN_TEXT_VIRT = 0xFFFF828000000000
XEN_TEXT_SLOT = l4_slot(XEN_TEXT_VIRT)   # 261
BOOT_STUB_VA = XEN_TEXT_VIRT
BOOT_STACK_VA = XEN_TEXT_VIRT + PAGE_SIZE
GDT_VA = XEN_TEXT_VIRT + 0x10000
GDT_RESERVED_PAGE = 14  # selectors 0xe000.. live in GDT page 14, as in Xen
M2P_SLOT = l4_slot(MACH2PHYS_VIRT_START)  # 256


def _descriptor(code: bool) -> int:
    """A flat 64-bit ring-3 code or data segment descriptor, accessed bit set
    (so the CPU never has to write the GDT when loading it)."""
    access = 0xF0 | (0x0B if code else 0x03)  # present, DPL3, S, type (+accessed)
    flags = 0xA if code else 0xC  # L=1 G=1 for code; D/B=1 G=1 for data
    return 0xFFFF | (access << 40) | (0xF << 48) | (flags << 52)


@dataclass
class XenArea:
    l4_slots: dict[int, int]
    m2p_first_mfn: int
    stub_mfn: int
    stack_mfn: int


class Machine:
    """Machine memory with its frame table, page types, M2P and walker."""

    def __init__(self, memory_mib: int, seed: int = 0) -> None:
        nr_frames = memory_mib * (1 << 20) // PAGE_SIZE
        self.memory = MachineMemory(nr_frames)
        self.frames = FrameTable(self.memory, seed)
        self.types = PageTypes(self.frames, self.memory)
        # one walker and software TLB for the machine: flushed whenever any
        # VCPU's TLB is (Domain.flush_tlbs)
        self.walker = Walker(self.memory)
        self.seed = seed
        self._build_xen_area()
        # log-dirty for every domain, told of writes by the walker and types
        self.paging = Paging(self.frames, self.memory, self.m2p, self.walker)
        self.types.paging = self.paging

    @property
    def nr_frames(self) -> int:
        return self.memory.nr_frames

    # --- the hypervisor's frames -----------------------------------------------------

    def _xen_frames(self, count: int) -> list[int]:
        """Hypervisor frames come from the bottom of memory, in order."""
        ft = self.frames
        taken: list[int] = []
        for mfn in range(1, ft.nr_frames):
            if len(taken) == count:
                break
            if ft.owner[mfn] == -1:
                taken.append(mfn)
        if len(taken) < count:
            raise MemoryError("machine memory too small for the hypervisor")
        ft.unlist(np.array(taken, dtype=np.int64))
        for mfn in taken:
            ft.owner[mfn] = DOMID_XEN
            ft.ref_count[mfn] = 1
            ft.allocated[mfn] = True
            ft.pristine[mfn] = False
            self.memory.clear_frame(mfn)
        return taken

    def _build_xen_area(self) -> None:
        mem = self.memory
        n = self.nr_frames
        m2p_frames = -(-n * 8 // PAGE_SIZE)
        # the M2P must be contiguous so one numpy view covers it: take it before
        # anything else, straight from the bottom
        m2p_mfns = self._xen_frames(m2p_frames)
        assert m2p_mfns == list(range(m2p_mfns[0], m2p_mfns[0] + m2p_frames))
        base = m2p_mfns[0] * ENTRIES_PER_TABLE
        self.m2p: np.ndarray = mem.u64[base:base + n]
        self.m2p[:] = INVALID_MFN
        self.frames.m2p = self.m2p

        ro_user = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_NX
        m2p_l3 = self._map_range(m2p_mfns, ro_user, MACH2PHYS_VIRT_START)

        stub, stack, gdt = self._xen_frames(3)
        sup_rx = _PAGE_PRESENT | _PAGE_ACCESSED
        sup_rw = _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_NX
        text_l3 = self._map_pages(
            {BOOT_STUB_VA: (stub, sup_rx), BOOT_STACK_VA: (stack, sup_rw),
             GDT_VA + GDT_RESERVED_PAGE * PAGE_SIZE: (gdt, sup_rw)})
        mem.write(stub << PAGE_SHIFT, b"\x48\xcf")  # iretq
        g = mem.frame(gdt)
        g[(FLAT_RING3_CS64 >> 3) & 511] = _descriptor(code=True)
        g[(FLAT_RING3_SS64 >> 3) & 511] = _descriptor(code=False)

        table = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED
        self.xen = XenArea(
            l4_slots={M2P_SLOT: (m2p_l3 << PAGE_SHIFT) | table,
                      XEN_TEXT_SLOT: (text_l3 << PAGE_SHIFT) | (table & ~_PAGE_USER)},
            m2p_first_mfn=m2p_mfns[0], stub_mfn=stub, stack_mfn=stack)
        self.types.xen_l4_slots = self.xen.l4_slots

    def _map_range(self, mfns: list[int], flags: int, va: int) -> int:
        return self._map_pages({va + i * PAGE_SIZE: (m, flags) for i, m in enumerate(mfns)})

    def _map_pages(self, pages: dict[int, tuple[int, int]]) -> int:
        """Build hypervisor-owned L3/L2/L1 tables under one L4 slot mapping
        ``va -> (mfn, flags)``; returns the L3's mfn."""
        mem = self.memory
        table = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED
        (l3,) = self._xen_frames(1)
        tables: dict[tuple[int, int], int] = {}
        for va, (mfn, flags) in sorted(pages.items()):
            parent = l3
            for level, shift in ((3, 30), (2, 21)):
                key = (level, va >> shift)
                if key not in tables:
                    (tables[key],) = self._xen_frames(1)
                    mem.frame(parent)[(va >> shift) & 511] = (tables[key] << PAGE_SHIFT) | table
                parent = tables[key]
            mem.frame(parent)[(va >> 12) & 511] = (mfn << PAGE_SHIFT) | flags
        return l3

    # --- the M2P ---------------------------------------------------------------------

    def set_m2p(self, mfn: int, pfn: int) -> None:
        self.m2p[mfn] = pfn

    def boot_frame(self, rip: int, rsp: int, rflags: int) -> bytes:
        """The iretq frame the boot stub pops to enter CPL3."""
        return struct.pack("<5Q", rip, FLAT_RING3_CS64, rflags, rsp, FLAT_RING3_SS64)
