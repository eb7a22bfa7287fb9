"""Memory: a bump allocator of pfns, pfn <-> mfn through the p2m list, and
building a user address space the Xen-PV way (tables built while unpinned,
made read-only in the kernel's own mapping, then pinned)."""

from __future__ import annotations

import struct

from guestos.kdata import AREAS, kernel
from guestos.layout import Layout, Ref
from hypervisor.public.arch_x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    MACH2PHYS_VIRT_START,
)
from hypervisor.public.native import VIRT_BASE, NativeCpu
from hypervisor.public.xen import Hypercall, arch_shared_info, shared_info

PAGE_SIZE = 4096
PTE_RW = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
PTE_RO = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
FRAME = 0x000FFFFFFFFFF000


# the page allocator's globals (Linux keeps them in struct zone and mem_map)
ZONE = Layout("zone", [
    ("next_free_pfn", "u64"),  # bump allocator: every pfn below it is taken
    ("free_head", "u64"),      # first pfn of the free-page list (0: empty)
    ("free_pages", "u64"),
    ("mem_map", "u64"),        # VA of the page flags, a byte per pfn
    ("totalram_pages", "u64"), # the RAM the kernel counts as its own (less the balloon)
])
assert ZONE.size <= AREAS["mm"].size


def zone(cpu: NativeCpu) -> Ref:
    return ZONE.at(cpu, AREAS["mm"].va(cpu))


class KernelPanic(Exception):
    pass


class OutOfMemory(KernelPanic):
    """No free page: a caller that can fail (spawn) reports it; others panic."""


def va(pfn: int) -> int:
    return VIRT_BASE + (pfn << 12)


def pfn_of(addr: int) -> int:
    return (addr - VIRT_BASE) >> 12


def pfn_to_mfn(cpu: NativeCpu, pfn: int) -> int:
    return cpu.read_u64(kernel(cpu).mfn_list + 8 * pfn)


def mfn_to_pfn(cpu: NativeCpu, mfn: int) -> int:
    """Through the read-only M2P the hypervisor maps into every guest."""
    return cpu.read_u64(MACH2PHYS_VIRT_START + 8 * mfn)


def our_pfn(cpu: NativeCpu, mfn: int) -> int | None:
    """mfn's pfn if the M2P names one whose p2m entry is this mfn (Xen's
    mfn_in_pseudophysmap, from the guest's side), else None: so for a stale
    mfn, one a pagetable kept from another machine."""
    pfn = mfn_to_pfn(cpu, mfn)
    return pfn if pfn < kernel(cpu).nr_pages and pfn_to_mfn(cpu, pfn) == mfn else None


_ARCH = shared_info.arch.offset
INVALID_FRAME_LIST_LIST = (1 << 64) - 1  # the p2m is a virtual list: see p2m_vaddr


def xen_setup_mfn_list_list(cpu: NativeCpu) -> None:
    """Tell the toolstack where the p2m list is (Linux's xen_setup_mfn_list_list,
    the SIF_VIRT_P2M_4TOOLS way): a virtual list at p2m_vaddr, mapped by the
    L4 at p2m_cr3, max_pfn entries long. At boot, and after every suspend:
    shared_info and the L4's mfn may be new."""
    k = kernel(cpu)
    arch = k.shared_info + _ARCH
    cpu.write_u64(arch + arch_shared_info.max_pfn.offset, k.nr_pages)
    cpu.write_u64(arch + arch_shared_info.pfn_to_mfn_frame_list_list.offset,
                  INVALID_FRAME_LIST_LIST)
    cpu.write_u64(arch + arch_shared_info.p2m_cr3.offset,
                  pfn_to_mfn(cpu, k.kernel_l4_pfn) << 12)
    cpu.write_u64(arch + arch_shared_info.p2m_vaddr.offset, k.mfn_list)
    cpu.write_u64(arch + arch_shared_info.p2m_generation.offset, 0)


def alloc_pages(cpu: NativeCpu, n: int = 1, zero: bool = True) -> int:
    """n zeroed, contiguous pfns: a single page from the free list if it has
    one, else (and for runs, which only boot asks for) from the bump pointer.
    ``zero=False`` for a page that is given away at once (to the balloon)."""
    z = zone(cpu)
    pfn = z.free_head if n == 1 else 0
    if pfn:
        z.free_head = cpu.read_u64(va(pfn))  # a free page holds the next one's pfn
        z.free_pages = z.free_pages - 1
    else:
        pfn = z.next_free_pfn
        if pfn + n > kernel(cpu).nr_pages:
            raise OutOfMemory(f"out of memory ({n} pages asked)")
        z.next_free_pfn = pfn + n
    if zero:
        cpu.write(va(pfn), bytes(PAGE_SIZE * n))
    return pfn


def free_page(cpu: NativeCpu, pfn: int) -> None:
    """Give a page back; it must be writable in the kernel's mapping."""
    if page_flags(cpu, pfn) & PG_PINNED:
        raise KernelPanic(f"freeing pfn {pfn:#x}, which is a pinned pagetable")
    set_page_flags(cpu, pfn, clear=PG_TABLE)
    z = zone(cpu)
    cpu.write_u64(va(pfn), z.free_head)
    z.free_head = pfn
    z.free_pages = z.free_pages + 1


def nr_free_pages(cpu: NativeCpu) -> int:
    z = zone(cpu)
    return z.free_pages + kernel(cpu).nr_pages - z.next_free_pfn


# page flags (Linux's struct page flags, here a byte per pfn in mem_map)
PG_PINNED = 1       # a pagetable Xen has pinned (PG_pinned)
PG_SAVEPINNED = 2   # pinned by xen_mm_pin_all for a save (PG_savepinned)
PG_TABLE = 4        # a pagetable page of a user address space (PG_table)
PG_BALLOON = 8      # in the balloon: no frame behind it (PageOffline, the balloon list)


def page_flags(cpu: NativeCpu, pfn: int) -> int:
    mem_map = zone(cpu).mem_map
    return cpu.read(mem_map + pfn, 1)[0] if mem_map else 0


def set_page_flags(cpu: NativeCpu, pfn: int, set_: int = 0, clear: int = 0) -> None:
    mem_map = zone(cpu).mem_map
    old = cpu.read(mem_map + pfn, 1)[0]
    cpu.write(mem_map + pfn, bytes([(old | set_) & ~clear & 0xFF]))


def set_page_ro(cpu: NativeCpu, pfn: int, ro: bool = True) -> None:
    """The kernel's mapping of a page: read-only while it is a pagetable."""
    rc = cpu.hypercall(Hypercall.update_va_mapping, va(pfn),
                       (pfn_to_mfn(cpu, pfn) << 12) | (PTE_RO if ro else PTE_RW), 0)
    if rc:
        raise KernelPanic(f"update_va_mapping of pfn {pfn:#x} failed: {rc}")


class AddressSpace:
    """A user address space under construction: its tables are ordinary
    writable pages until guestos.pgd pins the L4."""

    def __init__(self, cpu: NativeCpu) -> None:
        self.cpu = cpu
        self.l4 = alloc_pages(cpu)
        set_page_flags(cpu, self.l4, set_=PG_TABLE)
        self.tables = [self.l4]
        self.stack_top = 0

    def _next(self, table_pfn: int, index: int) -> int:
        cpu = self.cpu
        e = cpu.read_u64(va(table_pfn) + 8 * index)
        if e & _PAGE_PRESENT:
            mfn = (e & FRAME) >> 12
            return mfn_to_pfn(cpu, mfn)
        new = alloc_pages(cpu)
        set_page_flags(cpu, new, set_=PG_TABLE)
        self.tables.append(new)
        cpu.write_u64(va(table_pfn) + 8 * index, (pfn_to_mfn(cpu, new) << 12) | PTE_RW)
        return new

    def map(self, uva: int, pfn: int, writable: bool) -> None:
        t = self.l4
        for shift in (39, 30, 21):
            t = self._next(t, (uva >> shift) & 511)
        flags = PTE_RW if writable else PTE_RO
        pte = (pfn_to_mfn(self.cpu, pfn) << 12) | flags
        self.cpu.write_u64(va(t) + 8 * ((uva >> 12) & 511), pte)


def read_u32(cpu: NativeCpu, addr: int) -> int:
    return struct.unpack("<I", cpu.read(addr, 4))[0]


def read_cstr(cpu: NativeCpu, addr: int, size: int) -> str:
    return cpu.read(addr, size).split(b"\0")[0].decode(errors="replace")

