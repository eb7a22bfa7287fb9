"""Writable pagetables: Xen's emulation of a PV guest kernel's write to one of
its own L1 pagetables through a read-only mapping
(xen/arch/x86/pv/ro-page-fault.c: pv_ro_page_fault, ptwr_do_page_fault,
ptwr_emulated_update; entered from fixup_page_fault in xen/arch/x86/traps.c).

A validated pagetable can only be mapped read-only, so a kernel that stores a
PTE with a plain ``mov`` takes a write fault. When the guest has enabled
VMASST_TYPE_writable_pagetables, Xen looks before it injects the #PF:

* the fault is a write to a present page, from guest kernel mode, not an
  instruction fetch and no reserved bit;
* the kernel's L1 entry for the address is present and read-only, and maps a
  frame of the guest's that is a validated L1 in use;
* the instruction is a store Xen's emulator handles, naturally aligned inside
  the faulting page, of 8 bytes (a smaller one is widened with the rest of
  the entry as it is);
* the new entry passes get_page_from_l1e.

Then the entry is written through the path mmu_update takes (the new entry's
references taken, the old one's dropped), the instruction's register results
and RIP are committed, and the guest runs on. If any check fails the guest
gets the #PF it would have had (x86_emulate's UNHANDLEABLE). Xen leaves TLB
flushing to the guest, as on hardware; pvlab flushes its domain's TLBs after
the write, as after every pagetable change it makes (more flushing than Xen
is invisible to a guest that flushes as it must).

The Python guest kernel reaches the same path through ``emulate_store``: its stores
are made by the hypervisor on its behalf, and one that faults on a read-only
L1 is emulated like an x86 ``mov``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn.x86_const import UC_X86_REG_FS_BASE, UC_X86_REG_GS_BASE

from hypervisor.cpu.insn import (
    FS_PREFIX,
    GS_PREFIX,
    MemWrite,
    decode_mem_write,
    write_reg,
)
from hypervisor.mm.pagetable import pte_mfn
from hypervisor.mm.walker import (
    PFEC_INSN_FETCH,
    PFEC_PRESENT,
    PFEC_RESERVED_BIT,
    PFEC_WRITE,
)
from hypervisor.public.arch_x86 import _PAGE_PRESENT, _PAGE_RW
from hypervisor.public.xen import VMASST_TYPE_writable_pagetables

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu
    from hypervisor.mm.mmu import Mmu

PAGE_MASK = ~0xFFF
# arithmetic flags: carry, parity, adjust, zero, sign, overflow
EFLAGS_CF, EFLAGS_PF, EFLAGS_AF, EFLAGS_ZF, EFLAGS_SF, EFLAGS_OF = (
    1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11)
EFLAGS_ARITH = EFLAGS_CF | EFLAGS_PF | EFLAGS_AF | EFLAGS_ZF | EFLAGS_SF | EFLAGS_OF
RAX = 0


class Unhandleable(Exception):
    """The emulation gives up: the guest gets its #PF (X86EMUL_UNHANDLEABLE)."""


class Ptwr:
    """The writable-pagetable emulation of one machine."""

    def __init__(self, mmu: Mmu) -> None:
        self.mmu = mmu
        self.memory = mmu.memory
        self.emulations = 0  # Xen's perfc ptwr_emulations

    # --- the way in: a #PF, or a store of the Python kernel ------------------------

    def fixup(self, vcpu: Vcpu, error_code: int, cr2: int) -> bool:
        """Xen's fixup_page_fault for writable pagetables: True if the write
        at ``cr2`` was emulated and the guest goes on past the instruction."""
        if not (vcpu.in_kernel and error_code & PFEC_WRITE and error_code & PFEC_PRESENT
                and not error_code & (PFEC_RESERVED_BIT | PFEC_INSN_FETCH)):
            return False
        l1 = self.l1_of(vcpu, cr2)
        if l1 is None:
            return False
        insn = self._fetch_and_decode(vcpu)
        if insn is None:
            return False
        try:
            self._emulate(vcpu, insn, cr2, l1)
        except Unhandleable:
            return False
        self.emulations += 1
        vcpu.domain.flush_tlbs()
        return True

    def emulate_store(self, vcpu: Vcpu, va: int, data: bytes) -> bool:
        """The Python kernel's store of ``data`` at ``va`` faulted on a
        read-only page: emulate it as the ``mov`` it stands for; False if
        Xen would not (the kernel takes the fault)."""
        if not vcpu.in_kernel or len(data) not in (4, 8):
            return False
        l1 = self.l1_of(vcpu, va)
        if l1 is None:
            return False
        try:
            self._update(vcpu, va, va, int.from_bytes(data, "little"), len(data), l1)
        except Unhandleable:
            return False
        self.emulations += 1
        vcpu.domain.flush_tlbs()
        return True

    # --- the checks before emulating ----------------------------------------------

    def l1_of(self, vcpu: Vcpu, va: int) -> int | None:
        """The L1 frame the kernel maps read-only at ``va``, if the guest asked
        for writable pagetables and it is a validated L1 of its own in use
        (pv_ro_page_fault's guest_get_eff_kern_l1e; ptwr_do_page_fault's
        get_page_from_mfn and page_lock)."""
        dom = vcpu.domain
        if not dom.vm_assist >> VMASST_TYPE_writable_pagetables & 1:
            return None
        maddr = self.mmu.machine.walker.l1e_maddr(vcpu.guest_table, va)
        if maddr is None:
            return None
        self.memory.populate(maddr >> 12)
        pte = int(self.memory.u64[maddr >> 3])
        if pte & (_PAGE_PRESENT | _PAGE_RW) != _PAGE_PRESENT:
            return None
        mfn = pte_mfn(pte)
        if not self.mmu.owned(mfn, dom) or self.mmu.table_level(mfn) != 1:
            return None
        return mfn

    def _fetch_and_decode(self, vcpu: Vcpu) -> MemWrite | None:
        """The instruction at RIP (ptwr_emulated_insn_fetch): as many of its
        15 bytes as are mapped."""
        rip = vcpu.get_rip()
        code = vcpu.fetch_insn(rip)
        if code is None:
            return None
        bases = {FS_PREFIX: vcpu.uc.reg_read(UC_X86_REG_FS_BASE),
                 GS_PREFIX: vcpu.uc.reg_read(UC_X86_REG_GS_BASE)}
        return decode_mem_write(code, rip, list(vcpu.gpr), bases)

    # --- x86_emulate's part: the instruction's effect --------------------------------

    def _emulate(self, vcpu: Vcpu, insn: MemWrite, cr2: int, l1: int) -> None:
        """Do what x86_emulate does with the ptwr callbacks for ``insn``:
        a read-modify-write reads the entry first (ptwr_emulated_read) and
        writes it back through ptwr_emulated_update; the registers, flags and
        RIP change only once the write is done. Raises Unhandleable."""
        gpr, size = vcpu.gpr, insn.size
        if insn.op == "mov":
            self._update(vcpu, insn.addr, cr2, insn.src, size, l1)
        else:
            current = self._read(insn.addr, size, cr2, l1)
            if insn.op == "cmpxchg":
                self._cmpxchg(vcpu, insn, cr2, l1, current)
            elif insn.op == "xchg":
                self._update(vcpu, insn.addr, cr2, insn.src, size, l1)
                write_reg(gpr, insn.reg, insn.reg_shift, size, current)
            else:
                new, flags, changed = rmw(insn.op, current, insn.src, size)
                self._update(vcpu, insn.addr, cr2, new, size, l1)
                vcpu.rflags.write(vcpu.rflags.read() & ~changed | flags)
        vcpu.set_rip(vcpu.get_rip() + insn.length)

    def _cmpxchg(self, vcpu: Vcpu, insn: MemWrite, cr2: int, l1: int, current: int) -> None:
        """x86_emulate compares with the accumulator itself; only a match
        reaches ptwr_emulated_cmpxchg (which validates the new entry)."""
        mask = (1 << (8 * insn.size)) - 1
        acc = vcpu.gpr[RAX] & mask
        rflags = vcpu.rflags.read() & ~EFLAGS_ARITH
        if current == acc:
            self._update(vcpu, insn.addr, cr2, insn.src, insn.size, l1)
            vcpu.rflags.write(rflags | EFLAGS_ZF | EFLAGS_PF)
        else:
            # a miss: nothing written, the accumulator gets what memory holds
            vcpu.rflags.write(rflags | sub_flags(acc, current, insn.size))
            write_reg(vcpu.gpr, RAX, 0, insn.size, current)

    def _read(self, addr: int, size: int, cr2: int, l1: int) -> int:
        """What the L1 holds at ``addr`` (ptwr_emulated_read: the faulting
        page, which is the L1 itself)."""
        _check_access(addr, size, cr2)
        slot = (addr & 0xFFF) >> 3
        full = self.mmu.paging.guest_entry(l1, slot, int(self.memory.frame(l1)[slot]))
        return (full >> ((addr & 7) * 8)) & ((1 << (8 * size)) - 1)

    # --- ptwr_emulated_update ----------------------------------------------------------

    def _update(self, vcpu: Vcpu, addr: int, cr2: int, val: int, size: int, l1: int) -> None:
        """Write ``size`` bytes of ``val`` into the L1 entry at ``addr``:
        validated and applied as mmu_update applies an L1 entry."""
        _check_access(addr, size, cr2)
        slot = (addr & 0xFFF) >> 3
        if size != 8:
            # a sub-word store: the rest of the entry as it stands
            shift = (addr & 7) * 8
            field = ((1 << (size * 8)) - 1) << shift
            full = self.mmu.paging.guest_entry(l1, slot, int(self.memory.frame(l1)[slot]))
            val = full & ~field | (val << shift) & field
        if self.mmu.mod_entry(vcpu.domain, l1, slot, val):
            raise Unhandleable("could not get_page_from_l1e()")


def _check_access(addr: int, size: int, cr2: int) -> None:
    """Xen's ptwr callbacks take only a naturally aligned access inside the
    faulting page (the L1 itself)."""
    if (addr ^ cr2) & PAGE_MASK or addr & (size - 1):
        raise Unhandleable("access outside the faulting page, or unaligned")


def rmw(op: str, current: int, src: int, size: int) -> tuple[int, int, int]:
    """A read-modify-write's result: (new value, flags, flags it sets or
    clears). or/and: CF and OF clear, ZF, SF and PF from the result (AF is
    undefined: cleared). bts/btr: CF is the bit's old value, the others are
    left alone."""
    bits = 8 * size
    if op in ("bts", "btr"):
        bit = src & (bits - 1)
        cf = EFLAGS_CF if current >> bit & 1 else 0
        new = current | 1 << bit if op == "bts" else current & ~(1 << bit)
        return new, cf, EFLAGS_CF
    new = current | src if op == "or" else current & src
    return new, result_flags(new, size), EFLAGS_ARITH


def result_flags(res: int, size: int) -> int:
    """ZF, SF and PF of a result of ``size`` bytes."""
    flags = EFLAGS_ZF if res == 0 else 0
    flags |= EFLAGS_SF if res >> (8 * size - 1) & 1 else 0
    flags |= EFLAGS_PF if bin(res & 0xFF).count("1") % 2 == 0 else 0
    return flags


def sub_flags(a: int, b: int, size: int) -> int:
    """The arithmetic flags of ``cmp`` (a - b) at ``size`` bytes."""
    bits = 8 * size
    res = (a - b) & ((1 << bits) - 1)
    flags = result_flags(res, size) | (EFLAGS_CF if a < b else 0)
    flags |= EFLAGS_OF if ((a ^ b) & (a ^ res)) >> (bits - 1) & 1 else 0
    flags |= EFLAGS_AF if (a ^ b ^ res) & 0x10 else 0
    return flags
