"""HYPERVISOR_update_va_mapping (xen/arch/x86/pv/mm.c __do_update_va_mapping)."""

from __future__ import annotations

from hypervisor.public.errno import EBUSY, EFAULT, EINVAL
from hypervisor.public.xen import UVMF_INVLPG, UVMF_TLB_FLUSH
from tests.hypercalls.guest import RO, RW, run_case


def test_remap_with_each_flush_type():
    def case(g):
        pfn, mfn = g.alloc()
        return [g.update_va_mapping(g.va(pfn), (mfn << 12) | f, flags)
                for f, flags in ((RO, UVMF_INVLPG), (RW, UVMF_TLB_FLUSH), (RO, 4 | 1), (RW, 0))]
    assert run_case(case) == [0, 0, 0, 0]


def test_no_l1_for_the_address_is_einval():
    """map_guest_l1e finds no L1 for an address nothing maps."""
    def case(g):
        return g.update_va_mapping(0x0000_1234_5000_0000, 0, 0)
    assert run_case(case) == -EINVAL


def test_writable_mapping_of_a_pagetable_is_ebusy():
    def case(g):
        pfn, _ = g.alloc()
        return g.update_va_mapping(g.va(pfn), (g.l4_mfn << 12) | RW, 0)
    assert run_case(case) == -EBUSY


def test_bad_vcpu_bitmap_is_efault():
    """UVMF_MULTI: flags above the flush type are a pointer to a vcpu bitmap."""
    def case(g):
        pfn, mfn = g.alloc()
        return g.update_va_mapping(g.va(pfn), (mfn << 12) | RO, 0x1000 | UVMF_TLB_FLUSH)
    assert run_case(case) == -EFAULT
