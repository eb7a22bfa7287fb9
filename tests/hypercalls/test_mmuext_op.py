"""HYPERVISOR_mmuext_op (xen/arch/x86/pv/mm.c do_mmuext_op; validation in
xen/arch/x86/mm.c promote_lN_table, _get_page_type)."""

from __future__ import annotations

from hypervisor.public.arch_x86 import HYPERVISOR_VIRT_START, MACH2PHYS_VIRT_START
from hypervisor.public.errno import EACCES, EBUSY, EFAULT, EINVAL, ENOSYS, EOPNOTSUPP, ESRCH
from hypervisor.public.xen import (
    DOMID_IO,
    DOMID_SELF,
    MMUEXT_CLEAR_PAGE,
    MMUEXT_COPY_PAGE,
    MMUEXT_FLUSH_CACHE,
    MMUEXT_FLUSH_CACHE_GLOBAL,
    MMUEXT_INVLPG_LOCAL,
    MMUEXT_MARK_SUPER,
    MMUEXT_NEW_BASEPTR,
    MMUEXT_PIN_L1_TABLE,
    MMUEXT_PIN_L2_TABLE,
    MMUEXT_PIN_L4_TABLE,
    MMUEXT_SET_LDT,
    MMUEXT_TLB_FLUSH_ALL,
    MMUEXT_TLB_FLUSH_LOCAL,
    MMUEXT_TLB_FLUSH_MULTI,
    MMUEXT_UNPIN_TABLE,
    Hypercall,
)
from tests.hypercalls.guest import RO, RW, TABLE, run_case


def test_pin_needs_the_frame_read_only_everywhere():
    """A frame still mapped writable (type writable, count > 0) cannot become
    an L1 ("Bad type"): -EINVAL; once the mapping is read-only, it can."""
    def case(g):
        pfn, mfn = g.alloc()
        writable = g.mmuext1(MMUEXT_PIN_L1_TABLE, mfn)
        g.set_ro(pfn)
        pinned = g.mmuext1(MMUEXT_PIN_L1_TABLE, mfn)
        twice = g.mmuext1(MMUEXT_PIN_L1_TABLE, mfn)
        unpin = g.mmuext1(MMUEXT_UNPIN_TABLE, mfn)
        again = g.mmuext1(MMUEXT_UNPIN_TABLE, mfn)
        return writable, pinned, twice, unpin, again
    assert run_case(case) == (-EINVAL, 0, -EINVAL, 0, -EINVAL)


def test_pin_or_unpin_of_a_frame_not_owned_is_einval():
    def case(g):
        return g.mmuext1(MMUEXT_PIN_L1_TABLE, 1), g.mmuext1(MMUEXT_UNPIN_TABLE, 1)
    assert run_case(case) == (-EINVAL, -EINVAL)


def test_l1_mapping_a_pagetable_writable_fails_validation_with_ebusy():
    def case(g):
        _, mfn = g.table({0: (g.l4_mfn << 12) | RW})
        return g.mmuext1(MMUEXT_PIN_L1_TABLE, mfn)
    assert run_case(case) == -EBUSY


def test_l2_entry_must_point_at_an_l1():
    """An L2 entry to a page in use as writable data cannot take an L1 type."""
    def case(g):
        data_pfn, data_mfn = g.alloc()                 # still mapped RW by the kernel
        _, l2 = g.table({0: (data_mfn << 12) | TABLE})
        bad = g.mmuext1(MMUEXT_PIN_L2_TABLE, l2)
        return bad
    assert run_case(case) == -EINVAL


def test_pin_l2_validates_the_tree_and_unpin_releases_it():
    def case(g):
        page_pfn, page_mfn = g.alloc()
        _, l1 = g.table({0: (page_mfn << 12) | RW})
        _, l2 = g.table({0: (l1 << 12) | TABLE})
        rc = g.mmuext1(MMUEXT_PIN_L2_TABLE, l2)
        # the L1 is now a validated table: mapping it writable must fail
        probe = g.update_va_mapping(g.va(page_pfn), (l1 << 12) | RW)
        return rc, probe, g.mmuext1(MMUEXT_UNPIN_TABLE, l2)
    assert run_case(case) == (0, -EBUSY, 0)


def test_l4_xen_slots_are_ignored_when_pinning():
    """Validation skips slots 256-271 and Xen fills them itself (init_xen_l4_slots)."""
    def case(g):
        _, l4 = g.table({256: 0xDEAD000 | RW, 261: 0xBEEF000 | RW})
        rc = g.mmuext1(MMUEXT_PIN_L4_TABLE, l4)
        filled = g.read_entry(l4, 256) != 0xDEAD000 | RW
        return rc, filled, g.mmuext1(MMUEXT_UNPIN_TABLE, l4)
    assert run_case(case) == (0, True, 0)


def test_new_baseptr():
    """NEW_BASEPTR takes an L4 type reference (validating if need be); the
    old base is released. A frame that cannot be an L4 is refused."""
    def case(g):
        data_pfn, data_mfn = g.alloc()
        bad = g.mmuext1(MMUEXT_NEW_BASEPTR, data_mfn)    # mapped RW: not an L4
        again = g.mmuext1(MMUEXT_NEW_BASEPTR, g.l4_mfn)  # the current base: a no-op
        return bad, again
    assert run_case(case) == (-EINVAL, 0)


def test_tlb_flushes():
    def case(g):
        return (g.mmuext1(MMUEXT_TLB_FLUSH_LOCAL), g.mmuext1(MMUEXT_TLB_FLUSH_ALL),
                g.mmuext1(MMUEXT_INVLPG_LOCAL, 0xFFFFFFFF80000000),
                g.mmuext1(MMUEXT_TLB_FLUSH_MULTI, 0, 0x1000))   # unreadable vcpu mask
    assert run_case(case) == (0, 0, 0, -EINVAL)


def test_cache_flushes_are_not_for_a_domu():
    def case(g):
        return g.mmuext1(MMUEXT_FLUSH_CACHE), g.mmuext1(MMUEXT_FLUSH_CACHE_GLOBAL)
    assert run_case(case) == (-EACCES, -EINVAL)


def test_set_ldt_checks_its_arguments():
    def case(g):
        return (g.mmuext1(MMUEXT_SET_LDT, 0xFFFFFFFF80001001, 16),   # unaligned
                g.mmuext1(MMUEXT_SET_LDT, 0xFFFFFFFF80001000, 8193),  # too many entries
                g.mmuext1(MMUEXT_SET_LDT, HYPERVISOR_VIRT_START, 1),  # not __addr_ok
                g.mmuext1(MMUEXT_SET_LDT, 0xFFFFFFFF80001000, 16),
                g.mmuext1(MMUEXT_SET_LDT, 0, 0))
    assert run_case(case) == (-EINVAL, -EINVAL, -EINVAL, 0, 0)


def test_op_list_in_xens_range_is_efault_before_anything_else():
    """guest_handle_okay is do_mmuext_op's first check: an op list in Xen's
    range (the M2P the guest can read) is -EFAULT, pdone untouched, whatever
    foreigndom names."""
    def case(g):
        pdone = g.scratch + 0x400
        g.cpu.write_u64(pdone, 0xD0)
        rcs = [g.cpu.hypercall(Hypercall.mmuext_op, MACH2PHYS_VIRT_START, 1, pdone, fd)
               for fd in (DOMID_SELF, 77)]
        return rcs, g.cpu.read_u64(pdone)
    assert run_case(case) == ([-EFAULT, -EFAULT], 0xD0)


def test_clear_and_copy_page_never_touch_a_pagetable():
    def case(g):
        src_pfn, src = g.alloc()
        g.cpu.write(g.va(src_pfn), b"pvlab" * 10)
        dst_pfn, dst = g.alloc()
        copied = g.mmuext1(MMUEXT_COPY_PAGE, dst, src)
        same = g.cpu.read(g.va(dst_pfn), 50) == b"pvlab" * 10
        cleared = g.mmuext1(MMUEXT_CLEAR_PAGE, dst)
        zero = g.cpu.read(g.va(dst_pfn), 50) == bytes(50)
        return (copied, same, cleared, zero, g.mmuext1(MMUEXT_CLEAR_PAGE, g.l4_mfn),
                g.mmuext1(MMUEXT_COPY_PAGE, dst, 1))
    assert run_case(case) == (0, True, 0, True, -EINVAL, -EINVAL)


def test_unsupported_and_unknown_commands():
    def case(g):
        return g.mmuext1(MMUEXT_MARK_SUPER, 0), g.mmuext1(99)
    assert run_case(case) == (-EOPNOTSUPP, -ENOSYS)


def test_foreign_domain_ids():
    """Own numeric id or unknown domain: -ESRCH; DOMID_IO is no PV guest: -EINVAL."""
    def case(g):
        return (g.mmuext1(MMUEXT_TLB_FLUSH_LOCAL, foreigndom=1),
                g.mmuext1(MMUEXT_TLB_FLUSH_LOCAL, foreigndom=77),
                g.mmuext1(MMUEXT_TLB_FLUSH_LOCAL, foreigndom=DOMID_IO))
    assert run_case(case) == (-ESRCH, -ESRCH, -EINVAL)


def test_batch_reports_done_count():
    def case(g):
        return g.mmuext([(MMUEXT_TLB_FLUSH_LOCAL, 0, 0), (MMUEXT_TLB_FLUSH_LOCAL, 0, 0),
                         (MMUEXT_PIN_L1_TABLE, 1, 0), (MMUEXT_TLB_FLUSH_LOCAL, 0, 0)])
    assert run_case(case) == (-EINVAL, 2)


def test_ro_mapping_of_a_pagetable_is_fine():
    """Read-only mappings of pagetables are how a PV kernel reads its tables."""
    def case(g):
        pfn, _ = g.alloc()
        return g.update_va_mapping(g.va(pfn), (g.l4_mfn << 12) | RO)
    assert run_case(case) == 0
