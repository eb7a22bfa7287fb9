"""Memory: a bump allocator of pfns, pfn <-> mfn through the p2m list, and
building a user address space the Xen-PV way (tables built while unpinned,
made read-only in the kernel's own mapping, then pinned)."""

from __future__ import annotations

import struct
from typing import Any

from guestos.hypercall import mmuext
from guestos.kdata import VIRT_BASE, kernel
from hypervisor.public.arch_x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
)
from hypervisor.public.xen import MMUEXT_NEW_USER_BASEPTR, MMUEXT_PIN_L4_TABLE, Hypercall

PAGE_SIZE = 4096
PTE_RW = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
PTE_RO = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
FRAME = 0x000FFFFFFFFFF000


class KernelPanic(Exception):
    pass


def va(pfn: int) -> int:
    return VIRT_BASE + (pfn << 12)


def pfn_of(addr: int) -> int:
    return (addr - VIRT_BASE) >> 12


def pfn_to_mfn(cpu: Any, pfn: int) -> int:
    return cpu.read_u64(kernel(cpu).mfn_list + 8 * pfn)


def alloc_pages(cpu: Any, n: int = 1) -> int:
    """n zeroed, contiguous pfns."""
    k = kernel(cpu)
    pfn = k.next_free_pfn
    if pfn + n > k.nr_pages:
        raise KernelPanic("out of memory")
    k.next_free_pfn = pfn + n
    cpu.write(va(pfn), bytes(PAGE_SIZE * n))
    return pfn


def set_page_ro(cpu: Any, pfn: int) -> None:
    """Make the kernel's mapping of a page read-only before it becomes a pagetable."""
    rc = cpu.hypercall(Hypercall.update_va_mapping, va(pfn),
                       (pfn_to_mfn(cpu, pfn) << 12) | PTE_RO, 0)
    if rc:
        raise KernelPanic(f"update_va_mapping of pfn {pfn:#x} failed: {rc}")


class AddressSpace:
    """A user address space under construction: tables are ordinary pages
    until ``activate`` pins the L4."""

    def __init__(self, cpu: Any) -> None:
        self.cpu = cpu
        self.l4 = alloc_pages(cpu)
        self.tables = [self.l4]

    def _next(self, table_pfn: int, index: int) -> int:
        cpu = self.cpu
        e = cpu.read_u64(va(table_pfn) + 8 * index)
        if e & _PAGE_PRESENT:
            mfn = (e & FRAME) >> 12
            return cpu.read_u64(0xFFFF800000000000 + 8 * mfn)  # M2P: mfn -> pfn
        new = alloc_pages(cpu)
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

    def activate(self) -> int:
        """Pin and install as this VCPU's user L4; returns the L4's mfn."""
        cpu = self.cpu
        for pfn in self.tables:
            set_page_ro(cpu, pfn)
        mfn = pfn_to_mfn(cpu, self.l4)
        for cmd in (MMUEXT_PIN_L4_TABLE, MMUEXT_NEW_USER_BASEPTR):
            rc = mmuext(cpu, cmd, mfn)
            if rc:
                raise KernelPanic(f"mmuext_op {cmd} on mfn {mfn:#x} failed: {rc}")
        return mfn


def read_cstr(cpu: Any, addr: int, size: int) -> str:
    return cpu.read(addr, size).split(b"\0")[0].decode(errors="replace")


def u64s(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 8}Q", data)
