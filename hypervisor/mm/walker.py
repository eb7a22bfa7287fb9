"""One software pagetable walker, shared by the hypervisor and the guest kernel.

``uc.mem_read`` takes machine addresses once paging is on, so every access the
hypervisor makes on a guest's behalf (hypercall arguments, bounce frames) and
every access of the Python guest kernel goes through the guest's live pagetables
here. A small software TLB caches translations; it is flushed exactly when the
VCPUs' TLBs are (any pagetable update, TLB-flush op or CR3 load), so it can never
see a mapping the emulated MMU would not.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hypervisor.mm.memory import PAGE_SHIFT, MachineMemory
from hypervisor.public.arch_x86 import (
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    HYPERVISOR_VIRT_END,
    PTE_FRAME_MASK,
)

# x86 page-fault error code bits
PFEC_PRESENT = 1
PFEC_WRITE = 2
PFEC_USER = 4
PFEC_RESERVED_BIT = 8
PFEC_INSN_FETCH = 16



def addr_ok(addr: int) -> bool:
    """Xen's __addr_ok: a guest address, in the lower half of the 48-bit space
    or above the hypervisor's range (a range from there faults on a
    non-canonical address before it reaches the hypervisor's)."""
    return addr < 1 << 47 or addr >= HYPERVISOR_VIRT_END


def is_canonical_address(addr: int) -> bool:
    """Bits 63..47 all equal (Xen's is_canonical_address, 48-bit addresses)."""
    top = addr >> 47
    return top == 0 or top == (1 << 17) - 1

class GuestFault(Exception):
    """A guest virtual address could not be accessed: what a #PF would report."""

    def __init__(self, va: int, error_code: int) -> None:
        kind = "write" if error_code & PFEC_WRITE else "read"
        why = "protection" if error_code & PFEC_PRESENT else "not present"
        super().__init__(f"{kind} of {va:#x}: {why}")
        self.va = va
        self.error_code = error_code


class Walker:
    """Translate guest virtual addresses through 4-level pagetables in machine
    memory, with a software TLB keyed by (cr3 mfn, virtual page)."""

    def __init__(self, memory: MachineMemory) -> None:
        self.u64 = memory.u64
        self.memory = memory
        self.tlb: dict[tuple[int, int], tuple[int, bool]] = {}
        # log-dirty's (hypervisor/mm/logdirty.py): told of every frame a write
        # is translated to, and the D bits it took off L1 entries (mfn -> the
        # slots), which every read gives back
        self.on_write: Callable[[int], None] | None = None
        self.hidden_dirty: dict[int, np.ndarray] = {}

    def flush(self) -> None:
        self.tlb.clear()

    def translate(self, cr3_mfn: int, va: int, write: bool = False) -> int:
        """Machine address of ``va``; raises GuestFault like the MMU would."""
        key = (cr3_mfn, va >> PAGE_SHIFT)
        hit = self.tlb.get(key)
        if hit is not None and (hit[1] or not write):
            if write and self.on_write is not None:
                self.on_write(hit[0])
            return (hit[0] << PAGE_SHIFT) | (va & 0xFFF)
        u64 = self.u64
        absent = self.memory.absent
        table = cr3_mfn
        writable = True
        for shift in (39, 30, 21, 12):
            if absent.count:  # a table not here yet is fetched before it is read
                absent.populate(table)
            pte = int(u64[(table << 9) | ((va >> shift) & 511)])
            if not pte & _PAGE_PRESENT:
                raise GuestFault(va, PFEC_WRITE if write else 0)
            writable = writable and bool(pte & _PAGE_RW)
            if shift != 12 and pte & _PAGE_PSE:
                raise GuestFault(va, PFEC_PRESENT)  # no superpages for PV guests
            table = (pte & PTE_FRAME_MASK) >> PAGE_SHIFT
        if write and not writable:
            raise GuestFault(va, PFEC_PRESENT | PFEC_WRITE)
        # the TLB caches only frames that are here; device memory (the balloon's
        # registers, beyond RAM) is never absent
        if absent.count and table < absent.nr_frames:
            absent.populate(table)
        self.tlb[key] = (table, writable)
        if write and self.on_write is not None:
            self.on_write(table)
        return (table << PAGE_SHIFT) | (va & 0xFFF)

    def l1e_maddr(self, cr3_mfn: int, va: int) -> int | None:
        """Machine address of the L1 entry mapping ``va`` (for update_va_mapping),
        or None if an upper level is missing or ``va`` is not a guest address
        (Xen's ``__addr_ok``: canonical and outside the hypervisor's range)."""
        if not addr_ok(va):
            return None
        u64 = self.u64
        absent = self.memory.absent
        table = cr3_mfn
        for shift in (39, 30, 21):
            if absent.count:
                absent.populate(table)
            pte = int(u64[(table << 9) | ((va >> shift) & 511)])
            if not pte & _PAGE_PRESENT or pte & _PAGE_PSE:
                return None
            table = (pte & PTE_FRAME_MASK) >> PAGE_SHIFT
        return (table << PAGE_SHIFT) | (((va >> 12) & 511) << 3)

    # --- byte access ---------------------------------------------------------------

    def read(self, cr3_mfn: int, va: int, size: int) -> bytes:
        buf = self.memory.buf
        if (va & 0xFFF) + size <= 4096:
            ma = self.translate(cr3_mfn, va)
            if self.hidden_dirty and (ma >> PAGE_SHIFT) in self.hidden_dirty:
                return self._as_written(ma, size)
            return buf[ma:ma + size]
        out = bytearray()
        while size:
            n = min(size, 4096 - (va & 0xFFF))
            out += self.read(cr3_mfn, va, n)
            va += n
            size -= n
        return bytes(out)

    def _as_written(self, ma: int, size: int) -> bytes:
        """Bytes of an L1 whose D bits log-dirty took, with the bits given back."""
        mfn = ma >> PAGE_SHIFT
        table = self.memory.frame(mfn).copy()
        table[self.hidden_dirty[mfn]] |= np.uint64(_PAGE_DIRTY)
        off = ma & 0xFFF
        return table.tobytes()[off:off + size]

    def write(self, cr3_mfn: int, va: int, data: bytes) -> None:
        buf = self.memory.buf
        size = len(data)
        if (va & 0xFFF) + size <= 4096:
            ma = self.translate(cr3_mfn, va, write=True)
            buf[ma:ma + size] = data
            return
        pos = 0
        while pos < size:
            n = min(size - pos, 4096 - (va & 0xFFF))
            ma = self.translate(cr3_mfn, va, write=True)
            buf[ma:ma + n] = data[pos:pos + n]
            va += n
            pos += n

    def read_u64(self, cr3_mfn: int, va: int) -> int:
        if va & 7:
            return int.from_bytes(self.read(cr3_mfn, va, 8), "little")
        ma = self.translate(cr3_mfn, va)
        value = int(self.u64[ma >> 3])
        hidden = self.hidden_dirty.get(ma >> PAGE_SHIFT) if self.hidden_dirty else None
        if hidden is not None and hidden[(ma & 0xFFF) >> 3]:
            value |= _PAGE_DIRTY
        return value

    def write_u64(self, cr3_mfn: int, va: int, value: int) -> None:
        if va & 7:
            self.write(cr3_mfn, va, value.to_bytes(8, "little"))
        else:
            self.u64[self.translate(cr3_mfn, va, write=True) >> 3] = value
