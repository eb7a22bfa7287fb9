"""Portable hypercall cases for mmu_update, update_va_mapping, mmuext_op and memory_op.
The step format is described in tests/hypercalls/portable.py; the shared
constants are in tests/hypercalls/steps.py."""

from __future__ import annotations

from hypervisor.public.arch_x86 import HYPERVISOR_VIRT_START, ROOT_PAGETABLE_FIRST_XEN_SLOT
from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS, EPERM, ESRCH
from hypervisor.public.memory import (
    MEMOP_EXTENT_SHIFT,
    XENMEM_decrease_reservation,
    XENMEM_exchange,
    XENMEM_maximum_gpfn,
    XENMEM_populate_physmap,
    XENMEMF_address_bits,
    XENMEMF_exact_node,
    XENMEMF_populate_on_demand,
)
from hypervisor.public.xen import (
    DOMID_SELF,
    MMU_UPDATE_PREEMPTED,
    MMUEXT_PIN_L1_TABLE,
    MMUEXT_PIN_L2_TABLE,
    MMUEXT_PIN_L4_TABLE,
    MMUEXT_SET_LDT,
    MMUEXT_UNPIN_TABLE,
    UVMF_FLUSHTYPE_MASK,
    Hypercall,
)
from tests.hypercalls.steps import OWN_DOMID, RO, RW, memop

XEN_VA = HYPERVISOR_VIRT_START  # a guest pointer into Xen's own range
PDONE = ("buf", 32)  # where a case asks for the done count
SENTINEL = 0x5A5A5A5A  # a done count no call writes
NON_CANONICAL = 1 << 47
ALL_ONES_FRAME = (1 << 40) - 1  # PADDR_MASK >> PAGE_SHIFT: Xen's INVALID_MFN in a PTE


def _pin_self_mapped(cmd: int) -> list[tuple]:
    """The free page maps itself read-only in slot 300 and is pinned as a
    table: allowed, as get_l2/l4_linear_pagetable allow a table to map
    itself even while it is being validated. Then unpinned and cleared."""
    return [("mmu_update", ("slot", "free_mfn", 300), ("pte", "free_mfn", RO), 0),
            ("uvm", "free_va", ("pte", "free_mfn", RO), 0, 0),
            ("mmuext", cmd, "free_mfn", 0, 0),
            ("mmuext", MMUEXT_UNPIN_TABLE, "free_mfn", 0, 0),
            ("uvm", "free_va", ("pte", "free_mfn", RW), 0, 0),
            ("mmu_update", ("slot", "free_mfn", 300), 0, 0)]


def _pinned_free_page(cmd: int, steps: list[tuple]) -> list[tuple]:
    """``steps`` with the free page pinned by ``cmd`` (read-only in the
    guest's mapping meanwhile), then unpinned and mapped writable again."""
    return [("uvm", "free_va", ("pte", "free_mfn", RO), 0, 0),
            ("mmuext", cmd, "free_mfn", 0, 0), *steps,
            ("mmuext", MMUEXT_UNPIN_TABLE, "free_mfn", 0, 0),
            ("uvm", "free_va", ("pte", "free_mfn", RW), 0, 0)]


_CUR_300 = ("slot", "l4_mfn", 300)
_FREE_300 = ("slot", "free_mfn", 300)

# a pinned L4 keeps the slots Xen filled in (init_xen_l4_slots): clear them
_CLEAR_XEN_SLOTS = [("mmu_update", ("slot", "free_mfn", ROOT_PAGETABLE_FIRST_XEN_SLOT + n), 0, 0)
                    for n in range(16)]



def _reservation(at: int, lst: str, nr: int, order: int = 0, flags: int = 0) -> tuple:
    """A xen_memory_reservation at offset ``at`` of a memop step's scratch."""
    return ((at, lst), (at + 8, nr), (at + 16, order | flags << 32), (at + 24, DOMID_SELF))


def _populate(flags: int, expected: int = 0) -> tuple:
    return memop(XENMEM_populate_physmap,
            (*_reservation(0, ("buf", 128), 1, flags=flags), (128, "free_pfn")), expected)


def _exchange(in_order: int = 0, out_nr: int = 1, start: int = 0, expected: int = 0) -> tuple:
    """Exchange the free page's frame (still mapped by the guest: not stealable)
    for a new frame at its pfn."""
    return memop(XENMEM_exchange | start << MEMOP_EXTENT_SHIFT,
            (*_reservation(0, ("buf", 128), 1, in_order),
             *_reservation(32, ("buf", 192), out_nr), (128, "free_mfn"),
             (192, "free_pfn"), (200, "free_pfn")), expected)


CASES: dict[str, list[tuple]] = {
    # do_mmu_update: the command is ptr & (sizeof(l1_pgentry_t) - 1); 4..7 are unknown
    "mmu_update_cmd_is_ptr_and_7": [
        ("mmu_update", ("pte", "free_mfn", 4), 0, -ENOSYS),
        ("mmu_update", ("pte", "free_mfn", 5), "free_pfn", -ENOSYS)],
    # get_page_from_l1e: a frame field of all ones is INVALID_MFN, not I/O space
    "l1e_frame_all_ones": [("uvm", "free_va", ("pte", ALL_ONES_FRAME, RO), 0, -EINVAL)],
    # get_page_and_type_from_mfn: above L1 a frame that is not RAM is no table
    "l2e_not_ram": _pinned_free_page(MMUEXT_PIN_L2_TABLE, [
        ("mmu_update", ("slot", "free_mfn", 1), ("pte", "mmio_frame", RO), -EINVAL)]),
    "l4e_not_ram": [("mmu_update", ("slot", "l4_mfn", 300), ("pte", "mmio_frame", RO), -EINVAL)],
    # do_mmu_update / do_mmuext_op: guest_handle_okay before anything else
    "request_list_in_xen_range": [
        ("hypercall", Hypercall.mmu_update, XEN_VA, 1, 0, DOMID_SELF, -EFAULT),
        ("hypercall", Hypercall.mmu_update, XEN_VA, 1, 0, 77, -EFAULT),
        ("hypercall", Hypercall.mmuext_op, XEN_VA, 1, 0, DOMID_SELF, -EFAULT),
        ("hypercall", Hypercall.mmuext_op, XEN_VA, 1, 0, 77, -EFAULT)],
    # the list is refused before anything is done: pdone is never written
    "request_list_in_xen_range_leaves_pdone": [
        step
        for nr in (Hypercall.mmu_update, Hypercall.mmuext_op)
        for step in (("poke", PDONE, SENTINEL, 0),
                     ("hypercall", nr, XEN_VA, 1, PDONE, DOMID_SELF, -EFAULT),
                     ("peek", PDONE, SENTINEL))],
    # the continuation that carries a final result in foreigndom
    "preempted_with_null_list": [
        ("hypercall", Hypercall.mmu_update, 0, MMU_UPDATE_PREEMPTED, 0, DOMID_SELF, DOMID_SELF),
        ("hypercall", Hypercall.mmuext_op, 0, MMU_UPDATE_PREEMPTED, 0, DOMID_SELF, DOMID_SELF)],
    # __do_update_va_mapping: flush type 3 matches no case; the bitmap is never read
    "uvm_flush_type_3": [
        ("uvm", "free_va", ("pte", "free_mfn", RW), UVMF_FLUSHTYPE_MASK | NON_CANONICAL, 0)],
    "uvm_otherdomain": [
        ("hypercall", Hypercall.update_va_mapping_otherdomain, "free_va",
         ("pte", "free_mfn", RW), 0, DOMID_SELF, 0),
        ("hypercall", Hypercall.update_va_mapping_otherdomain, "free_va",
         ("pte", "free_mfn", RW), 0, OWN_DOMID, -ESRCH),
        ("hypercall", Hypercall.update_va_mapping_otherdomain, "free_va",
         ("pte", "free_mfn", RW), 0, 77, -ESRCH)],
    # do_mmuext_op SET_LDT: the base must pass __addr_ok
    "set_ldt_in_xen_range": [("mmuext", MMUEXT_SET_LDT, XEN_VA, 1, -EINVAL),
                             ("mmuext", MMUEXT_SET_LDT, 0, 0, 0)],
    "pin_l2_mapping_itself": _pin_self_mapped(MMUEXT_PIN_L2_TABLE),
    "pin_l4_mapping_itself": _pin_self_mapped(MMUEXT_PIN_L4_TABLE) + _CLEAR_XEN_SLOTS,
    # get_l4_linear_pagetable: a table used linearly may not hold linear
    # entries (inc_linear_entries), one holding them may not be used so
    "linear_chain": _pinned_free_page(MMUEXT_PIN_L4_TABLE, [
        ("mmu_update", _CUR_300, ("pte", "free_mfn", RO), 0),
        ("mmu_update", _FREE_300, ("pte", "l4_mfn", RO), -EINVAL),
        ("mmu_update", _CUR_300, 0, 0),
        ("mmu_update", _FREE_300, ("pte", "l4_mfn", RO), 0),
        ("mmu_update", _CUR_300, ("pte", "free_mfn", RO), -EINVAL),
        ("mmu_update", _FREE_300, 0, 0)]) + _CLEAR_XEN_SLOTS,
    # domain_get_maximum_gpfn: shared_info's arch.max_pfn (the guest's) less one, or 0
    "maximum_gpfn": [("query", XENMEM_maximum_gpfn, 0)],
    # construct_memop_from_reservation, propagate_node, populate_physmap: 0 extents
    "populate_physmap_mem_flags": [_populate(XENMEMF_address_bits(12)),
                                   _populate(XENMEMF_exact_node(0)),
                                   _populate(XENMEMF_populate_on_demand)],
    # memory_exchange's early checks, do_memory_op's start extent, steal_page
    "exchange_refused": [_exchange(in_order=10, expected=-EPERM),
                         _exchange(out_nr=2, expected=-EINVAL),
                         _exchange(start=1, expected=-EINVAL),
                         _exchange(expected=-EINVAL)],
    # guest_remove_page no longer unpins (XSA-252 fix): the guest's UNPIN
    # succeeds and frees the frame; then the pfn is populated again
    "decrease_keeps_the_pin": [
        ("uvm", "free_va", ("pte", "free_mfn", RO), 0, 0),
        ("mmuext", MMUEXT_PIN_L1_TABLE, "free_mfn", 0, 0),
        ("uvm", "free_va", 0, 0, 0),
        memop(XENMEM_decrease_reservation,
         (*_reservation(0, ("buf", 128), 1), (128, "free_mfn")), 1),
        ("mmuext", MMUEXT_UNPIN_TABLE, "free_mfn", 0, 0),
        _populate(0, expected=1),
        ("reseat_free", 128, 0)],
    # memory_exchange of the (unmapped) free page's frame for a new one
    "exchange_one_frame": [("uvm", "free_va", 0, 0, 0),
                           _exchange(expected=0),
                           ("reseat_free", 192, 0)],
}
