"""Hypercall cases written once and run from both paths: compiled to x86 (a
generated GNU assembler file, firmware/tests/cases.S, run as a plain PV test
guest) and interpreted by the Python kernel path. Both must give Xen's result,
listed beside each step.

A step is (kind, *args, expected). Arguments are numbers or symbols resolved
by the guest at run time, the same way on both paths:

* ``free_pfn``, ``free_mfn``, ``free_va``: the top page of the guest's RAM;
* ``l4_mfn``: the bootstrap L4 (start_info.pt_base through the p2m list);
* ``xen_frame``: a hypervisor frame (1); ``mmio_frame``: a frame beyond RAM;
* ``("pte", sym, flags)``: sym << 12 | flags; ``("slot", sym, n)``: the machine
  address of entry n of the table at mfn sym;
* ``scratch_list``, ``scratch_list2``: bytes 128 and 192 of the step's 256-byte
  scratch area (where a ``memop`` step's extent lists go).

``("memop", cmd, ((offset, value), ...), expected)`` zeroes the scratch area,
writes each value as a u64 at its offset and calls memory_op(cmd, scratch).
``("reseat_free", offset, expected)`` gives the free pfn the frame whose mfn a
memop wrote at scratch+offset (the guest's p2m) and maps it writable at
free_va again (update_va_mapping's result): a case that traded the free page's
frame away leaves the guest as it found it.
"""

from __future__ import annotations

from hypervisor.public.errno import (
    EACCES,
    EBUSY,
    EINVAL,
    ENOSYS,
    EOPNOTSUPP,
    EPERM,
    ESRCH,
)
from hypervisor.public.memory import XENMEM_current_reservation, XENMEM_maximum_ram_page
from hypervisor.public.xen import (
    MMUEXT_FLUSH_CACHE,
    MMUEXT_INVLPG_LOCAL,
    MMUEXT_MARK_SUPER,
    MMUEXT_PIN_L1_TABLE,
    MMUEXT_PIN_L4_TABLE,
    MMUEXT_TLB_FLUSH_LOCAL,
    MMUEXT_UNPIN_TABLE,
    UVMF_ALL,
    UVMF_INVLPG,
    Hypercall,
    XENVER_pagesize,
    XENVER_version,
)
from tests.hypercalls.cases_boot import CASES as BOOT_CASES
from tests.hypercalls.cases_misc import CASES as MISC_CASES
from tests.hypercalls.cases_mm import CASES as MM_CASES
from tests.hypercalls.steps import ANY, OWN_DOMID, RO, RW

__all__ = ["ANY", "CASES", "OWN_DOMID", "RO", "RW", "resolve"]

BASE_CASES: dict[str, list[tuple]] = {
    "unknown_hypercall": [("hypercall", 44, -ENOSYS), ("hypercall", 63, -ENOSYS)],
    "xen_version": [("hypercall", Hypercall.xen_version, XENVER_version, 0, (4 << 16) | 19),
                    ("hypercall", Hypercall.xen_version, XENVER_pagesize, 0, 4096)],
    "pin_not_owned": [("mmuext", MMUEXT_PIN_L1_TABLE, "xen_frame", 0, -EINVAL)],
    "unpin_not_pinned": [("mmuext", MMUEXT_UNPIN_TABLE, "free_mfn", 0, -EINVAL)],
    "pin_mapped_writable": [("mmuext", MMUEXT_PIN_L1_TABLE, "free_mfn", 0, -EINVAL)],
    "pin_bootstrap_l4_twice": [("mmuext", MMUEXT_PIN_L4_TABLE, "l4_mfn", 0, -EINVAL)],
    "mmuext_unknown": [("mmuext", 99, 0, 0, -ENOSYS)],
    "mark_super": [("mmuext", MMUEXT_MARK_SUPER, 0, 0, -EOPNOTSUPP)],
    "flush_cache": [("mmuext", MMUEXT_FLUSH_CACHE, 0, 0, -EACCES)],
    "foreign_self": [("mmuext_fd", MMUEXT_TLB_FLUSH_LOCAL, 0, 0, OWN_DOMID, -ESRCH)],
    "foreign_unknown": [("mmuext_fd", MMUEXT_TLB_FLUSH_LOCAL, 0, 0, 77, -ESRCH)],
    "l4_xen_slot": [("mmu_update", ("slot", "l4_mfn", 256), 0, -EINVAL)],
    "xsa182_linear_l4": [  # XTF tests/xsa-182: recursive L4 entry, RO allowed, RW refused
        ("mmu_update", ("slot", "l4_mfn", 300), ("pte", "l4_mfn", RO), 0),
        ("mmu_update", ("slot", "l4_mfn", 300), ("pte", "l4_mfn", RW), -EINVAL),
        ("mmu_update", ("slot", "l4_mfn", 300), 0, 0)],
    "map_l4_writable": [("uvm", "free_va", ("pte", "l4_mfn", RW), 0, -EBUSY),
                        ("uvm", "free_va", ("pte", "l4_mfn", RO), 0, 0),
                        ("uvm", "free_va", ("pte", "free_mfn", RW), 0, 0)],
    "xsa279_noncanonical": [  # XTF tests/xsa-279: flushing a non-canonical address
        ("uvm", 1 << 63, 0, UVMF_INVLPG | UVMF_ALL, -EINVAL),
        ("mmuext", MMUEXT_INVLPG_LOCAL, 1 << 63, 0, 0)],
    "map_hypervisor_frame": [("uvm", "free_va", ("pte", "xen_frame", RO), 0, -EBUSY)],
    "map_mmio": [("uvm", "free_va", ("pte", "mmio_frame", RO), 0, -EPERM)],
    "bad_l1_flags": [("uvm", "free_va", ("pte", "free_mfn", RW | 0x10), 0, -EINVAL)],
    "memory_queries": [("query", XENMEM_current_reservation, 4096),
                       ("query", XENMEM_maximum_ram_page, ANY)],
}

# One file of cases per area, so they can grow apart; a name may appear once.
CASES: dict[str, list[tuple]] = {}
for _part in (BASE_CASES, MM_CASES, MISC_CASES, BOOT_CASES):
    assert not CASES.keys() & _part.keys(), CASES.keys() & _part.keys()
    CASES.update(_part)


def resolve(sym: object, values: dict[str, int]) -> int:
    if isinstance(sym, int):
        return sym
    if isinstance(sym, str):
        return values[sym]
    kind, base, n = sym  # type: ignore[misc]
    if kind == "pte":
        return (resolve(base, values) << 12) | n
    return (resolve(base, values) << 12) + 8 * n
