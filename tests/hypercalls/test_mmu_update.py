"""HYPERVISOR_mmu_update (xen/arch/x86/pv/mm.c do_mmu_update, mod_lN_entry;
xen/arch/x86/mm.c get_page_from_lNe). Each case makes the call from the guest
kernel and checks Xen's exact result and done count."""

from __future__ import annotations

from hypervisor.public.arch_x86 import _PAGE_GLOBAL, MACH2PHYS_VIRT_START
from hypervisor.public.errno import EBUSY, EFAULT, EINVAL, EPERM, ESRCH
from hypervisor.public.xen import (
    DOMID_SELF,
    MMU_MACHPHYS_UPDATE,
    MMU_NORMAL_PT_UPDATE,
    MMU_PT_UPDATE_PRESERVE_AD,
    MMUEXT_PIN_L2_TABLE,
    MMUEXT_PIN_L4_TABLE,
    MMUEXT_UNPIN_TABLE,
    Hypercall,
)
from tests.hypercalls.guest import RO, RW, TABLE, run_case


def test_l1_update_maps_a_page():
    """A valid L1 entry is written and takes its references (mod_l1_entry),
    adjusted as Xen does: a user page gets _PAGE_GLOBAL (pv/mm.h
    adjust_guest_l1e; tests/hypercalls/test_pte_adjust.py has the rules)."""
    def case(g):
        pfn, mfn = g.alloc()
        ptr = g.l1e_maddr(g.va(pfn))
        rc = g.mmu_update([(ptr | MMU_NORMAL_PT_UPDATE, (mfn << 12) | RO)])
        want = (mfn << 12) | RO | _PAGE_GLOBAL
        return rc, g.read_entry(ptr >> 12, (ptr & 0xFFF) >> 3) == want
    assert run_case(case) == ((0, 1), True)


def test_l1_writable_mapping_of_a_pagetable_is_ebusy():
    """No L1 may map a pagetable frame writable (get_page_from_l1e: could not
    get PGT_writable_page -> could_not_pin -> -EBUSY)."""
    def case(g):
        pfn, _ = g.alloc()
        return g.mmu_update([(g.l1e_maddr(g.va(pfn)), (g.l4_mfn << 12) | RW)])
    assert run_case(case) == (-EBUSY, 0)


def test_l1_mapping_of_a_hypervisor_frame_is_ebusy():
    """A frame the domain does not own (here the hypervisor's) cannot be mapped."""
    def case(g):
        pfn, _ = g.alloc()
        return g.mmu_update([(g.l1e_maddr(g.va(pfn)), (1 << 12) | RO)])
    assert run_case(case) == (-EBUSY, 0)


def test_l1_mapping_beyond_ram_is_eperm():
    """A frame number that is not RAM is MMIO: a domU may not map it (-EPERM)."""
    def case(g):
        pfn, _ = g.alloc()
        return g.mmu_update([(g.l1e_maddr(g.va(pfn)), (1 << 40) | RO)])
    assert run_case(case) == (-EPERM, 0)


def test_l1_disallowed_flags_are_einval():
    """PCD/PWT/PAT are outside a domU's L1 flags ("Bad L1 flags")."""
    def case(g):
        pfn, mfn = g.alloc()
        return g.mmu_update([(g.l1e_maddr(g.va(pfn)), (mfn << 12) | RW | 0x10)])
    assert run_case(case) == (-EINVAL, 0)


def test_l1_gnttab_bit_is_einval_and_the_other_available_high_bits_are_fine():
    """Bits 52-62 are available to the guest (base_disallow_mask allows
    _PAGE_AVAIL_HIGH) but an L1 may not carry bit 62, _PAGE_GNTTAB
    (xen/arch/x86/mm.c L1_DISALLOW_MASK): "Bad L1 flags", -EINVAL."""
    def case(g):
        pfn, mfn = g.alloc()
        slot = g.l1e_maddr(g.va(pfn))
        return (g.mmu_update([(slot, (mfn << 12) | RW | 1 << 62)]),
                g.mmu_update([(slot, (mfn << 12) | RW | 1 << 61 | 1 << 53)]))
    assert run_case(case) == ((-EINVAL, 0), (0, 1))


def test_update_in_a_frame_not_owned_is_einval():
    """The PTE's page must belong to the caller ("Could not get page for normal update")."""
    def case(g):
        return g.mmu_update([((1 << 12) | MMU_NORMAL_PT_UPDATE, 0)])
    assert run_case(case) == (-EINVAL, 0)


def test_l4_xen_slot_is_einval():
    """Slots 256-271 of an L4 are Xen's ("L4 update in Xen-private area")."""
    def case(g):
        return g.mmu_update([((g.l4_mfn << 12) + 8 * 256, 0)])
    assert run_case(case) == (-EINVAL, 0)


def test_l2_superpage_is_einval():
    """PSE in an L2 entry: no superpages for PV ("Bad L2 flags")."""
    def case(g):
        l1pfn, l1mfn = g.table()
        l2pfn, l2mfn = g.table()
        assert g.mmuext1(MMUEXT_PIN_L2_TABLE, l2mfn) == 0
        rc = g.mmu_update([((l2mfn << 12) + 8, (l1mfn << 12) | TABLE | 0x80)])
        assert g.mmuext1(MMUEXT_UNPIN_TABLE, l2mfn) == 0
        return rc
    assert run_case(case) == (-EINVAL, 0)


def test_l2_entry_naming_a_frame_that_is_not_ram_is_einval():
    """Above L1 a frame that is not RAM is no table: get_page_from_l2e's
    get_page_and_type_from_mfn fails (-EINVAL), and so does the linear
    pagetable path; the L1 rule for device memory (-EPERM) is not applied."""
    def case(g):
        _, l2mfn = g.table()
        assert g.mmuext1(MMUEXT_PIN_L2_TABLE, l2mfn) == 0
        rc = g.mmu_update([((l2mfn << 12) + 8, (1 << 40) | RO)])
        assert g.mmuext1(MMUEXT_UNPIN_TABLE, l2mfn) == 0
        return rc
    assert run_case(case) == (-EINVAL, 0)


def test_update_of_a_plain_page_just_writes():
    """A page that is not a pagetable in use is written as data."""
    def case(g):
        pfn, mfn = g.alloc()
        rc = g.mmu_update([((mfn << 12) + 16, 0x1234)])
        return rc, g.cpu.read_u64(g.va(pfn) + 16)
    assert run_case(case) == ((0, 1), 0x1234)


def test_linear_pagetable_read_only_is_allowed_and_writable_refused():
    """A recursive L4 entry is allowed read-only and refused writable (XSA-182,
    XTF tests/xsa-182)."""
    def case(g):
        slot = 300
        ro = g.mmu_update([((g.l4_mfn << 12) + 8 * slot, (g.l4_mfn << 12) | RO)])
        rw = g.mmu_update([((g.l4_mfn << 12) + 8 * slot, (g.l4_mfn << 12) | RW)])
        off = g.mmu_update([((g.l4_mfn << 12) + 8 * slot, 0)])
        return ro, rw, off
    assert run_case(case) == ((0, 1), (-EINVAL, 0), (0, 1))


def test_linear_entries_do_not_chain():
    """get_l4_linear_pagetable: a table used as a linear table may not hold
    linear entries (inc_linear_entries), and one holding them may not be used
    as one (inc_linear_uses); once the first entry goes, the other is allowed."""
    def case(g):
        _, l4b = g.table()
        _, l4c = g.table()
        assert g.mmuext1(MMUEXT_PIN_L4_TABLE, l4b) == g.mmuext1(MMUEXT_PIN_L4_TABLE, l4c) == 0
        cur, b300 = (g.l4_mfn << 12) + 8 * 300, (l4b << 12) + 8 * 300
        out = [g.mmu_update([(cur, (l4b << 12) | RO)]),
               g.mmu_update([(b300, (l4c << 12) | RO)]),     # L4b is used linearly
               g.mmu_update([(cur, 0)]),
               g.mmu_update([(b300, (l4c << 12) | RO)]),
               g.mmu_update([(cur, (l4b << 12) | RO)])]      # L4b holds a linear entry
        assert g.mmu_update([(b300, 0)]) == (0, 1)
        assert g.mmuext1(MMUEXT_UNPIN_TABLE, l4b) == g.mmuext1(MMUEXT_UNPIN_TABLE, l4c) == 0
        return out
    assert run_case(case) == [(0, 1), (-EINVAL, 0), (0, 1), (0, 1), (-EINVAL, 0)]


def test_batch_stops_at_the_first_failure_with_done_count():
    """Requests before the failing one stay applied; pdone says how many."""
    def case(g):
        a, amfn = g.alloc()
        b, bmfn = g.alloc()
        return g.mmu_update([(g.l1e_maddr(g.va(a)), (amfn << 12) | RO),
                             ((1 << 12), 0),
                             (g.l1e_maddr(g.va(b)), (bmfn << 12) | RO)])
    assert run_case(case) == (-EINVAL, 1)


def test_machphys_update():
    """MMU_MACHPHYS_UPDATE sets the M2P of a frame the caller owns, and only then."""
    def case(g):
        pfn, mfn = g.alloc()
        ok = g.mmu_update([((mfn << 12) | MMU_MACHPHYS_UPDATE, pfn)])
        bad = g.mmu_update([((1 << 12) | MMU_MACHPHYS_UPDATE, 5)])
        return ok, g.m2p(mfn) == pfn, bad
    assert run_case(case) == ((0, 1), True, (-EINVAL, 0))


def test_foreign_domain_ids():
    """get_pg_owner: the caller's own numeric id or an unknown domain is -ESRCH."""
    def case(g):
        return g.mmu_update([], foreigndom=1), g.mmu_update([], foreigndom=77)
    assert run_case(case) == ((-ESRCH, 0), (-ESRCH, 0))


def test_bad_request_pointer_is_efault():
    def case(g):
        return g.mmu_update([(0, 0)], ptr=0x1000)
    assert run_case(case) == (-EFAULT, 0)


def test_request_list_in_xens_range_is_efault_before_anything_else():
    """guest_handle_okay is do_mmu_update's first check: a list in Xen's range
    (here the M2P, which the guest can read) is -EFAULT, pdone not written,
    whatever foreigndom names."""
    def case(g):
        pdone = g.scratch + 0x400
        g.cpu.write_u64(pdone, 0xD0)
        rcs = [g.cpu.hypercall(Hypercall.mmu_update, MACH2PHYS_VIRT_START, 1, pdone, fd)
               for fd in (DOMID_SELF, 77)]
        return rcs, g.cpu.read_u64(pdone)
    assert run_case(case) == ([-EFAULT, -EFAULT], 0xD0)


def test_preserve_ad_keeps_accessed_and_dirty():
    """MMU_PT_UPDATE_PRESERVE_AD ORs the entry's current A/D bits into the new value."""
    def case(g):
        pfn, mfn = g.alloc()
        ptr = g.l1e_maddr(g.va(pfn))
        rc = g.mmu_update([(ptr | MMU_PT_UPDATE_PRESERVE_AD, (mfn << 12) | 0x1 | 0x4)])
        return rc, g.read_entry(ptr >> 12, (ptr & 0xFFF) >> 3) & 0x60
    assert run_case(case) == ((0, 1), 0x60)
