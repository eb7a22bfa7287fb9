"""Xen adjusts a 64-bit PV guest's pagetable entries as it validates them
(xen/arch/x86/pv/mm.h adjust_guest_l1e..l4e, called from mm.c mod_lN_entry
and promote_lN_table): all guest code runs at CPL3, so every present entry
gets _PAGE_USER. An L1 entry the guest made without it is a kernel page and is
marked with _PAGE_GUEST_KERNEL (bit 52); one the guest made with it is a user
page and gets _PAGE_GLOBAL; an L4 entry also gets _PAGE_ACCESSED. The guest
reads the adjusted value back. A write to a page that is not a pagetable in
use is not adjusted (it is plain data)."""

from __future__ import annotations

from hypervisor.public.arch_x86 import (
    _PAGE_ACCESSED,
    _PAGE_GLOBAL,
    _PAGE_GUEST_KERNEL,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
)
from hypervisor.public.xen import MMUEXT_PIN_L1_TABLE, MMUEXT_PIN_L4_TABLE, MMUEXT_UNPIN_TABLE
from tests.hypercalls.guest import RO, run_case

KERNEL_RO = _PAGE_PRESENT | _PAGE_ACCESSED  # no _PAGE_USER
UPPER = _PAGE_PRESENT | _PAGE_RW            # an upper-level entry without U or A


def test_l1_entry_without_the_user_bit_is_a_kernel_page():
    def case(g):
        pfn, mfn = g.alloc()
        ptr = g.l1e_maddr(g.va(pfn))
        rc = g.mmu_update([(ptr, (mfn << 12) | KERNEL_RO)])
        back = g.read_entry(ptr >> 12, (ptr & 0xFFF) >> 3)
        return rc, back, g.cpu.read(g.va(pfn), 8)
    rc, back, data = run_case(case)
    assert rc == (0, 1)
    assert back & 0xFFF0_0000_0000_0FFF == KERNEL_RO | _PAGE_USER | _PAGE_GUEST_KERNEL
    assert data == bytes(8)  # still mapped and readable


def test_l1_entry_with_the_user_bit_is_a_global_user_page():
    def case(g):
        pfn, mfn = g.alloc()
        rc = g.update_va_mapping(g.va(pfn), (mfn << 12) | RO)
        ptr = g.l1e_maddr(g.va(pfn))
        return rc, g.read_entry(ptr >> 12, (ptr & 0xFFF) >> 3) & 0xFFF0_0000_0000_0FFF
    assert run_case(case) == (0, RO | _PAGE_GLOBAL)


def test_pinning_adjusts_every_present_entry():
    """promote_l1_table and promote_l4_table rewrite the entries they validate;
    not-present entries are left alone."""
    def case(g):
        data, data_mfn = g.alloc()
        g.set_ro(data)
        l1, l1_mfn = g.table({0: (data_mfn << 12) | KERNEL_RO, 1: 0x1000})
        rc1 = g.mmuext1(MMUEXT_PIN_L1_TABLE, l1_mfn)
        e0, e1 = g.read_entry(l1_mfn, 0), g.read_entry(l1_mfn, 1)
        rc2 = g.mmuext1(MMUEXT_UNPIN_TABLE, l1_mfn)
        l2, l2_mfn = g.table({0: (l1_mfn << 12) | UPPER})
        l3, l3_mfn = g.table({0: (l2_mfn << 12) | UPPER})
        l4, l4_mfn = g.table({0: (l3_mfn << 12) | UPPER})
        rc3 = g.mmuext1(MMUEXT_PIN_L4_TABLE, l4_mfn)
        ups = [g.read_entry(m, 0) & 0xFFF for m in (l2_mfn, l3_mfn, l4_mfn)]
        rc4 = g.mmuext1(MMUEXT_UNPIN_TABLE, l4_mfn)
        return (rc1, rc2, rc3, rc4), e0 & 0xFFF0_0000_0000_0FFF, e1, ups
    rcs, e0, e1, ups = run_case(case)
    assert rcs == (0, 0, 0, 0)
    assert e0 == KERNEL_RO | _PAGE_USER | _PAGE_GUEST_KERNEL
    assert e1 == 0x1000
    assert ups == [UPPER | _PAGE_USER, UPPER | _PAGE_USER,
                   UPPER | _PAGE_USER | _PAGE_ACCESSED]
