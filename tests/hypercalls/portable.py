"""Hypercall cases written once and run from both paths: compiled to x86 (a
generated GNU assembler file, firmware/tests/cases.S, run as a plain PV test
guest) and interpreted by the Python kernel path. Both must give Xen's result,
listed beside each step.

A step is (kind, *args, expected): the kinds are listed, with their x86 and
Python forms side by side, in tests/hypercalls/kinds.py, which also describes
the arguments (numbers, or symbols the guest resolves at run time the same way
on both paths: ``free_pfn``, ``free_mfn``, ``free_va`` for the top page of the
guest's RAM, ``l4_mfn`` for the bootstrap L4, ``xen_frame``, ``mmio_frame``,
``("pte", sym, flags)``, ``("slot", sym, n)``, ``("buf", off)``, ``("out", off)``).
``expected`` is Xen's result, checked by the x86 guest itself, or ANY.

A case may start with ``("needs", what, n)`` (kinds.NEEDS, e.g. ``("needs",
"vcpus", 2)``): where the domain lacks it the case is skipped and the x86
guest's verdict is SKIP. All cases run in sequence in one guest, so a case
leaves the guest as it found it (close what it binds, unmap what it maps).
"""

from __future__ import annotations

from hypervisor.public.errno import (
    EACCES,
    EBUSY,
    EEXIST,
    EFAULT,
    EINVAL,
    ENOENT,
    ENOSYS,
    EOPNOTSUPP,
    EPERM,
    ESRCH,
)
from hypervisor.public.event_channel import (
    EVTCHNOP_bind_ipi,
    EVTCHNOP_bind_virq,
    EVTCHNOP_close,
    EVTCHNOP_unmask,
)
from hypervisor.public.memory import (
    MEMOP_EXTENT_SHIFT,
    XENMEM_current_reservation,
    XENMEM_decrease_reservation,
    XENMEM_increase_reservation,
    XENMEM_maximum_ram_page,
    XENMEM_maximum_reservation,
    XENMEM_populate_physmap,
)
from hypervisor.public.sched import SCHEDOP_shutdown
from hypervisor.public.vcpu import VCPUOP_is_up, VCPUOP_up
from hypervisor.public.xen import (
    DOMID_IO,
    DOMID_SELF,
    MMU_MACHPHYS_UPDATE,
    MMU_PT_UPDATE_PRESERVE_AD,
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
    MMUEXT_UNMARK_SUPER,
    MMUEXT_UNPIN_TABLE,
    UVMF_ALL,
    UVMF_INVLPG,
    UVMF_LOCAL,
    UVMF_TLB_FLUSH,
    VIRQ_DEBUGGER,
    VIRQ_TIMER,
    VIRQ_XENOPROF,
    VIRQ_XENPMU,
    CONSOLEIO_write,
    Hypercall,
    XENVER_pagesize,
    XENVER_version,
)
from tests.hypercalls.cases_boot import CASES as BOOT_CASES
from tests.hypercalls.cases_misc import CASES as MISC_CASES
from tests.hypercalls.cases_mm import CASES as MM_CASES
from tests.hypercalls.steps import ANY, OWN_DOMID, RO, RW

__all__ = ["ANY", "CASES", "OWN_DOMID", "RO", "RW"]

UNMAPPED = 0x1000  # an address the test guests never map: an unreadable argument
PSE = 0x80
XEN_VERSION = (4 << 16) | 19


def entry(op: int, *args: object) -> list[object]:
    """A multicall entry's words: op, result, six arguments."""
    return [op, 0, *args, *[0] * (6 - len(args))]


def reservation(extent: object, nr: int = 1, order: int = 0, domid: int = DOMID_SELF
                ) -> list[object]:
    """xen_memory_reservation's words, its extent list (one entry) at byte 64."""
    return [("buf", 64), nr, order, domid, 0, 0, 0, 0, extent]


def mem_op(op: int, words: list[object], want: object) -> tuple:
    return ("mem", Hypercall.memory_op, [op, ("buf", 0)], words, want)


def evtchn(op: int, words: list[object], want: object) -> tuple:
    return ("mem", Hypercall.event_channel_op, [op, ("buf", 0)], words, want)


def uvm(pte: object, want: object = 0, flags: int = UVMF_INVLPG) -> tuple:
    """Remap the top page (free_va) through update_va_mapping."""
    return ("uvm", "free_va", pte, flags, want)


def remap(va: str, mfn: str, flags: int) -> tuple:
    return ("uvm", va, ("pte", mfn, flags), UVMF_INVLPG, 0)


BASE_CASES: dict[str, list[tuple]] = {
    "unknown_hypercall": [("hypercall", 44, -ENOSYS), ("hypercall", 63, -ENOSYS)],
    "xen_version": [("hypercall", Hypercall.xen_version, XENVER_version, 0, XEN_VERSION),
                    ("hypercall", Hypercall.xen_version, XENVER_pagesize, 0, 4096),
                    ("hypercall", Hypercall.xen_version, 99, 0, -ENOSYS)],
    "console_io": [("mem", Hypercall.console_io, [CONSOLEIO_write, 11, ("buf", 0)],
                    [b"console_io\n"], 0),
                   ("hypercall", Hypercall.console_io, CONSOLEIO_write, 5, UNMAPPED, -EFAULT)],
    # --- mmu_update ---
    "mmu_update_l1": [  # the bootstrap L1 entry of the top page, rewritten
        ("mmu_update", "free_l1e", ("pte", "free_mfn", RW), 0),
        ("mmu_update", "free_l1e", ("pte", "l4_mfn", RW), -EBUSY),
        ("mmu_update", "free_l1e", ("pte", "xen_frame", RO), -EBUSY),
        ("mmu_update", "free_l1e", ("pte", "mmio_frame", RO), -EPERM),
        ("mmu_update", "free_l1e", ("pte", "free_mfn", RW | 0x10), -EINVAL),
        ("mmu_update", ("or", "free_l1e", MMU_PT_UPDATE_PRESERVE_AD),
         ("pte", "free_mfn", RW), 0)],
    "mmu_update_not_owned": [("mmu_update", ("slot", "xen_frame", 0), 0, -EINVAL)],
    "l4_xen_slot": [("mmu_update", ("slot", "l4_mfn", 256), 0, -EINVAL)],
    "l2_superpage": [("mmu_update", ("slot", "l2_mfn", 500), ("pte", "free_mfn", RW | PSE),
                      -EINVAL)],
    "mmu_update_plain_page": [("mmu_update", ("slot", "free_mfn", 3), 0x1234000, 0),
                              ("peek", ("or", "free_va", 24), 0x1234000),
                              ("mmu_update", ("slot", "free_mfn", 3), 0, 0)],
    "xsa182_linear_l4": [  # XTF tests/xsa-182: recursive L4 entry, RO allowed, RW refused
        ("mmu_update", ("slot", "l4_mfn", 300), ("pte", "l4_mfn", RO), 0),
        ("mmu_update", ("slot", "l4_mfn", 300), ("pte", "l4_mfn", RW), -EINVAL),
        ("mmu_update", ("slot", "l4_mfn", 300), 0, 0)],
    "mmu_update_batch": [  # the second request fails: done counts the first
        ("mem", Hypercall.mmu_update, [("buf", 0), 2, ("buf", 32), DOMID_SELF],
         [("slot", "free_mfn", 0), 5, ("slot", "l4_mfn", 256), 0, 0], -EINVAL),
        ("last", 32, 1),
        ("mmu_update", ("slot", "free_mfn", 0), 0, 0)],
    "machphys_update": [
        ("mmu_update", ("or", ("slot", "free_mfn", 0), MMU_MACHPHYS_UPDATE), "free_pfn", 0),
        ("mmu_update", ("or", ("slot", "xen_frame", 0), MMU_MACHPHYS_UPDATE), 0, -EINVAL)],
    "mmu_update_foreign": [
        ("mem", Hypercall.mmu_update, [("buf", 0), 1, 0, fd], [("slot", "free_mfn", 0), 0],
         -ESRCH) for fd in (OWN_DOMID, 77)],
    "mmu_update_bad_list": [("hypercall", Hypercall.mmu_update, UNMAPPED, 1, 0, DOMID_SELF,
                             -EFAULT)],
    # --- update_va_mapping ---
    "uvm_flush_types": [uvm(("pte", "free_mfn", RW), 0, f)
                        for f in (0, UVMF_INVLPG | UVMF_LOCAL, UVMF_TLB_FLUSH | UVMF_ALL,
                                  UVMF_INVLPG | UVMF_ALL)],
    "uvm_no_l1": [("uvm", UNMAPPED, ("pte", "free_mfn", RO), 0, -EINVAL)],
    "uvm_bad_vcpu_bitmap": [uvm(("pte", "free_mfn", RW), -EFAULT, UNMAPPED | UVMF_TLB_FLUSH)],
    "map_l4_writable": [("uvm", "free_va", ("pte", "l4_mfn", RW), 0, -EBUSY),
                        ("uvm", "free_va", ("pte", "l4_mfn", RO), 0, 0),
                        ("uvm", "free_va", ("pte", "free_mfn", RW), 0, 0)],
    "xsa279_noncanonical": [  # XTF tests/xsa-279: flushing a non-canonical address
        ("uvm", 1 << 63, 0, UVMF_INVLPG | UVMF_ALL, -EINVAL),
        ("mmuext", MMUEXT_INVLPG_LOCAL, 1 << 63, 0, 0)],
    "map_hypervisor_frame": [("uvm", "free_va", ("pte", "xen_frame", RO), 0, -EBUSY)],
    "map_mmio": [("uvm", "free_va", ("pte", "mmio_frame", RO), 0, -EPERM)],
    "bad_l1_flags": [("uvm", "free_va", ("pte", "free_mfn", RW | 0x10), 0, -EINVAL),
                     ("uvm", "free_va", ("pte", "free_mfn", RW | 1 << 62), 0, -EINVAL)],
    # --- mmuext_op: pins (the top page as a table, the next one down as its parent) ---
    "pin_not_owned": [("mmuext", MMUEXT_PIN_L1_TABLE, "xen_frame", 0, -EINVAL)],
    "unpin_not_pinned": [("mmuext", MMUEXT_UNPIN_TABLE, "free_mfn", 0, -EINVAL)],
    "pin_mapped_writable": [("mmuext", MMUEXT_PIN_L1_TABLE, "free_mfn", 0, -EINVAL)],
    "pin_bootstrap_l4_twice": [("mmuext", MMUEXT_PIN_L4_TABLE, "l4_mfn", 0, -EINVAL)],
    "pin_l1": [remap("free_va", "free_mfn", RO),
               ("mmuext", MMUEXT_PIN_L1_TABLE, "free_mfn", 0, 0),
               ("mmuext", MMUEXT_PIN_L1_TABLE, "free_mfn", 0, -EINVAL),
               uvm(("pte", "free_mfn", RW), -EBUSY),
               ("mmuext", MMUEXT_UNPIN_TABLE, "free_mfn", 0, 0),
               remap("free_va", "free_mfn", RW)],
    "pin_l1_maps_a_table_writable": [("poke", "free_va", ("pte", "l4_mfn", RW), 0),
                                     remap("free_va", "free_mfn", RO),
                                     ("mmuext", MMUEXT_PIN_L1_TABLE, "free_mfn", 0, -EBUSY),
                                     remap("free_va", "free_mfn", RW),
                                     ("poke", "free_va", 0, 0)],
    "pin_l2_tree": [("poke", "spare_va", ("pte", "free_mfn", RW), 0),
                    remap("free_va", "free_mfn", RO), remap("spare_va", "spare_mfn", RO),
                    ("mmuext", MMUEXT_PIN_L2_TABLE, "spare_mfn", 0, 0),
                    ("mmuext", MMUEXT_UNPIN_TABLE, "spare_mfn", 0, 0),
                    remap("spare_va", "spare_mfn", RW), remap("free_va", "free_mfn", RW),
                    ("poke", "spare_va", 0, 0)],
    "pin_l2_entry_not_an_l1": [("poke", "spare_va", ("pte", "free_mfn", RW), 0),
                               remap("spare_va", "spare_mfn", RO),
                               ("mmuext", MMUEXT_PIN_L2_TABLE, "spare_mfn", 0, -EINVAL),
                               remap("spare_va", "spare_mfn", RW),
                               ("poke", "spare_va", 0, 0)],
    "pin_l4_xen_slots": [  # slots 256-271 are not validated; Xen fills them
        ("poke", ("or", "free_va", 8 * 256), 0xDEAD000 | RW, 0),
        remap("free_va", "free_mfn", RO),
        ("mmuext", MMUEXT_PIN_L4_TABLE, "free_mfn", 0, 0),
        ("mmuext", MMUEXT_UNPIN_TABLE, "free_mfn", 0, 0),
        remap("free_va", "free_mfn", RW),
        ("mmuext", MMUEXT_CLEAR_PAGE, "free_mfn", 0, 0)],
    "new_baseptr": [("mmuext", MMUEXT_NEW_BASEPTR, "free_mfn", 0, -EINVAL),
                    ("mmuext", MMUEXT_NEW_BASEPTR, "l4_mfn", 0, 0)],
    "tlb_flushes": [("mmuext", MMUEXT_TLB_FLUSH_LOCAL, 0, 0, 0),
                    ("mmuext", MMUEXT_TLB_FLUSH_ALL, 0, 0, 0),
                    ("mmuext", MMUEXT_INVLPG_LOCAL, "free_va", 0, 0),
                    ("mmuext", MMUEXT_TLB_FLUSH_MULTI, 0, UNMAPPED, -EINVAL)],
    "mmuext_unknown": [("mmuext", 99, 0, 0, -ENOSYS)],
    "mark_super": [("mmuext", MMUEXT_MARK_SUPER, 0, 0, -EOPNOTSUPP),
                   ("mmuext", MMUEXT_UNMARK_SUPER, 0, 0, -EOPNOTSUPP)],
    "flush_cache": [("mmuext", MMUEXT_FLUSH_CACHE, 0, 0, -EACCES),
                    ("mmuext", MMUEXT_FLUSH_CACHE_GLOBAL, 0, 0, -EINVAL)],
    "set_ldt_arguments": [("mmuext", MMUEXT_SET_LDT, 0xFFFFFFFF80001001, 16, -EINVAL),
                          ("mmuext", MMUEXT_SET_LDT, 0xFFFFFFFF80001000, 8193, -EINVAL)],
    "clear_and_copy_page": [("mmuext", MMUEXT_CLEAR_PAGE, "l4_mfn", 0, -EINVAL),
                            ("mmuext", MMUEXT_COPY_PAGE, "free_mfn", "xen_frame", -EINVAL),
                            ("mmuext", MMUEXT_COPY_PAGE, "free_mfn", "spare_mfn", 0),
                            ("mmuext", MMUEXT_CLEAR_PAGE, "free_mfn", 0, 0)],
    "foreign_self": [("mmuext_fd", MMUEXT_TLB_FLUSH_LOCAL, 0, 0, OWN_DOMID, -ESRCH)],
    "foreign_unknown": [("mmuext_fd", MMUEXT_TLB_FLUSH_LOCAL, 0, 0, 77, -ESRCH)],
    "foreign_domid_io": [("mmuext_fd", MMUEXT_TLB_FLUSH_LOCAL, 0, 0, DOMID_IO, -EINVAL)],
    "mmuext_batch": [  # the second op is unknown: done counts the first
        ("mem", Hypercall.mmuext_op, [("buf", 0), 2, ("buf", 48), DOMID_SELF],
         [MMUEXT_TLB_FLUSH_LOCAL, 0, 0, 99, 0, 0, 0], -ENOSYS),
        ("last", 48, 1)],
    # --- memory_op ---
    "memory_queries": [("query", XENMEM_current_reservation, 4096),
                       ("query", XENMEM_maximum_reservation, 4096),
                       ("query", XENMEM_maximum_ram_page, ANY)],
    "memory_op_errors": [
        ("query", XENMEM_current_reservation | (1 << MEMOP_EXTENT_SHIFT), -EINVAL),
        mem_op(XENMEM_current_reservation, [77], -ESRCH),
        ("hypercall", Hypercall.memory_op, XENMEM_current_reservation, UNMAPPED, -EFAULT),
        ("hypercall", Hypercall.memory_op, 99, 0, -ENOSYS)],
    "reservation_counts": [  # extents done, never an errno
        mem_op(XENMEM_decrease_reservation, reservation("xen_frame"), 0),
        mem_op(XENMEM_decrease_reservation, reservation("free_mfn", order=10), 0),
        mem_op(XENMEM_decrease_reservation, reservation("free_mfn", domid=77), 0),
        mem_op(XENMEM_decrease_reservation, [UNMAPPED, 1, 0, DOMID_SELF], 0),
        mem_op(XENMEM_decrease_reservation | (2 << MEMOP_EXTENT_SHIFT),
               reservation("free_mfn"), 2),
        mem_op(XENMEM_increase_reservation, reservation(0), 0)],  # at max_pages
    "decrease_unmapped_first": [  # the top page given back, and a new frame for it
        uvm(0),
        mem_op(XENMEM_decrease_reservation, reservation("free_mfn"), 1),
        mem_op(XENMEM_populate_physmap, reservation("free_pfn"), 1),
        ("poke", "p2m_free", ("out", 64), 0),
        uvm(("pte", "free_mfn", RW)),
        ("mmuext", MMUEXT_CLEAR_PAGE, "free_mfn", 0, 0)],
    "decrease_still_mapped": [  # the frame is freed when the mapping goes
        mem_op(XENMEM_decrease_reservation, reservation("free_mfn"), 1),
        uvm(0),
        mem_op(XENMEM_populate_physmap, reservation("free_pfn"), 1),
        ("poke", "p2m_free", ("out", 64), 0),
        uvm(("pte", "free_mfn", RW)),
        ("mmuext", MMUEXT_CLEAR_PAGE, "free_mfn", 0, 0)],
    # --- multicall: an entry's result is at byte 8 of it, the second's at 72 ---
    "multicall": [
        ("mem_result", Hypercall.multicall, [("buf", 0), 1],
         entry(Hypercall.xen_version, XENVER_version, 0), 8, XEN_VERSION),
        ("mem_result", Hypercall.multicall, [("buf", 0), 2],
         entry(44) + entry(Hypercall.xen_version, XENVER_pagesize, 0), 8, -ENOSYS),
        ("last", 72, 4096),
        ("mem_result", Hypercall.multicall, [("buf", 0), 2],
         entry(Hypercall.update_va_mapping, UNMAPPED, 0, 0)
         + entry(Hypercall.xen_version, XENVER_pagesize, 0), 8, -EINVAL),
        ("last", 72, 4096),
        ("mem_result", Hypercall.multicall, [("buf", 0), 1],
         entry(Hypercall.multicall, ("buf", 64), 0), 8, -EINVAL),
        ("hypercall", Hypercall.multicall, UNMAPPED, 1, -EFAULT),
        ("hypercall", Hypercall.multicall, 0, 0, 0)],
    # --- vcpu_op, event channels, sched_op ---
    "vcpu_op": [("hypercall", Hypercall.vcpu_op, VCPUOP_is_up, 0, 0, 1),
                ("hypercall", Hypercall.vcpu_op, VCPUOP_is_up, 99, 0, -ENOENT),
                ("hypercall", Hypercall.vcpu_op, 99, 0, 0, -ENOSYS)],
    "vcpu_op_second_vcpu": [("needs", "vcpus", 2),
                            ("hypercall", Hypercall.vcpu_op, VCPUOP_is_up, 1, 0, 0),
                            ("hypercall", Hypercall.vcpu_op, VCPUOP_up, 1, 0, -EINVAL)],
    "evtchn_virq": [  # the port bound comes back at byte 8 and is carried along
        evtchn(EVTCHNOP_bind_virq, [VIRQ_TIMER], 0),
        evtchn(EVTCHNOP_bind_virq, [VIRQ_TIMER, ("out", 8)], -EEXIST),
        evtchn(EVTCHNOP_unmask, [("out", 8)], 0),
        evtchn(EVTCHNOP_close, [("out", 0)], 0),
        evtchn(EVTCHNOP_close, [("out", 0)], -EINVAL)],
    "evtchn_ipi": [evtchn(EVTCHNOP_bind_ipi, [0], 0),
                   evtchn(EVTCHNOP_close, [("out", 4)], 0)],
    "evtchn_virq_second_vcpu": [  # per-vcpu VIRQs bind on vcpu 1, a global one does not
        ("needs", "vcpus", 2),
        *[step for virq in (VIRQ_TIMER, VIRQ_XENOPROF, VIRQ_XENPMU)
          for step in (evtchn(EVTCHNOP_bind_virq, [virq | 1 << 32], 0),
                       evtchn(EVTCHNOP_close, [("out", 8)], 0))],
        evtchn(EVTCHNOP_bind_virq, [VIRQ_DEBUGGER | 1 << 32], -EINVAL)],
    "sched_op": [("hypercall", Hypercall.sched_op, SCHEDOP_shutdown, UNMAPPED, -EFAULT),
                 ("hypercall", Hypercall.sched_op, 99, 0, -ENOSYS)],
}

# One file of cases per area, so they can grow apart; a name may appear once.
CASES: dict[str, list[tuple]] = {}
for _part in (BASE_CASES, MM_CASES, MISC_CASES, BOOT_CASES):
    assert not CASES.keys() & _part.keys(), CASES.keys() & _part.keys()
    CASES.update(_part)

