"""The guest side of the hypercall cases: what a small PV kernel does to set up
a case (find free frames, build a table, make it read-only in its own mapping)
and to make MMU hypercalls, written against the public ABI only.

It runs inside the probe test kernel (tests/kernels/probe.py): ``run_case(fn)``
boots a domain, calls ``fn(Guest(cpu))`` from the Python kernel path, checks the
frame-accounting invariants afterwards, and returns what ``fn`` returned.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import replace
from typing import Any

from hypervisor.public.arch_x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    MACH2PHYS_VIRT_START,
    PTE_FRAME_MASK,
)
from hypervisor.public.native import VIRT_BASE
from hypervisor.public.xen import DOMID_SELF, Hypercall, start_info

RW = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
RO = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
TABLE = RW


class Guest:
    """A probe kernel's view of its own memory, through its own mappings."""

    def __init__(self, cpu: Any) -> None:
        self.cpu = cpu
        si_va = cpu.reg("rsi")
        self.si = start_info.from_buffer_copy(cpu.read(si_va, ctypes.sizeof(start_info)))
        self.nr_pages = self.si.nr_pages
        self.next_free = self.nr_pages  # allocate downward from the top of RAM
        from tests.kernels import probe
        self.scratch = probe.scratch(cpu) + 0x800

    # --- memory --------------------------------------------------------------------

    def va(self, pfn: int) -> int:
        return VIRT_BASE + (pfn << 12)

    def mfn(self, pfn: int) -> int:
        return self.cpu.read_u64(self.si.mfn_list + 8 * pfn)

    def m2p(self, mfn: int) -> int:
        return self.cpu.read_u64(MACH2PHYS_VIRT_START + 8 * mfn)

    def alloc(self) -> tuple[int, int]:
        """A free page (pfn, mfn), zeroed, still mapped writable by the kernel."""
        self.next_free -= 1
        pfn = self.next_free
        self.cpu.write(self.va(pfn), bytes(4096))
        return pfn, self.mfn(pfn)

    def set_ro(self, pfn: int, ro: bool = True) -> int:
        """Change the kernel's own mapping of a page (a table must be RO)."""
        return self.update_va_mapping(self.va(pfn), (self.mfn(pfn) << 12) | (RO if ro else RW))

    def write_entry(self, pfn: int, slot: int, value: int) -> None:
        """Write an entry of a page that is not (yet) a pagetable, directly."""
        self.cpu.write_u64(self.va(pfn) + 8 * slot, value)

    def read_entry(self, mfn: int, slot: int) -> int:
        return self.cpu.read_u64(self.va(self.m2p(mfn)) + 8 * slot)

    def l1e_maddr(self, va: int) -> int:
        """Machine address of the bootstrap L1 entry mapping ``va``."""
        mfn = self.mfn((self.si.pt_base - VIRT_BASE) >> 12)
        for shift in (39, 30, 21):
            e = self.read_entry(mfn, (va >> shift) & 511)
            mfn = (e & PTE_FRAME_MASK) >> 12
        return (mfn << 12) | (((va >> 12) & 511) << 3)

    def table_mfn(self, va: int, level: int) -> int:
        """The bootstrap table of ``level`` (4: the L4 ... 1: an L1) on va's path."""
        mfn = self.l4_mfn
        for lvl in range(4, level, -1):
            mfn = (self.read_entry(mfn, (va >> (12 + 9 * (lvl - 1))) & 511) & PTE_FRAME_MASK) >> 12
        return mfn

    @property
    def l4_mfn(self) -> int:
        return self.mfn((self.si.pt_base - VIRT_BASE) >> 12)

    # --- hypercalls ----------------------------------------------------------------

    def _args(self, data: bytes) -> int:
        self.cpu.write(self.scratch, data)
        return self.scratch

    def mmu_update(self, reqs: list[tuple[int, int]], foreigndom: int = DOMID_SELF,
                   ptr: int | None = None) -> tuple[int, int]:
        buf = self._args(b"".join(struct.pack("<QQ", p, v) for p, v in reqs) + bytes(8))
        pdone = buf + 16 * len(reqs)
        rc = self.cpu.hypercall(Hypercall.mmu_update, buf if ptr is None else ptr, len(reqs),
                                pdone, foreigndom)
        return rc, struct.unpack("<I", self.cpu.read(pdone, 4))[0]

    def mmuext(self, ops: list[tuple[int, int, int]], foreigndom: int = DOMID_SELF
               ) -> tuple[int, int]:
        buf = self._args(b"".join(struct.pack("<IIQQ", c, 0, a1, a2) for c, a1, a2 in ops)
                         + bytes(8))
        pdone = buf + 24 * len(ops)
        rc = self.cpu.hypercall(Hypercall.mmuext_op, buf, len(ops), pdone, foreigndom)
        return rc, struct.unpack("<I", self.cpu.read(pdone, 4))[0]

    def mmuext1(self, cmd: int, arg1: int = 0, arg2: int = 0, foreigndom: int = DOMID_SELF
                ) -> int:
        return self.mmuext([(cmd, arg1, arg2)], foreigndom)[0]

    def update_va_mapping(self, va: int, val: int, flags: int = 0) -> int:
        return self.cpu.hypercall(Hypercall.update_va_mapping, va, val, flags)

    def table(self, entries: dict[int, int] | None = None) -> tuple[int, int]:
        """A page holding ``entries``, made read-only in the kernel's mapping so
        that it can become a pagetable; returns (pfn, mfn)."""
        pfn, mfn = self.alloc()
        for slot, value in (entries or {}).items():
            self.write_entry(pfn, slot, value)
        assert self.set_ro(pfn) == 0
        return pfn, mfn


def run_case(fn: Any, vcpus: int = 1, memory: int = 16, maxmem: int = 0) -> Any:
    """Boot a probe domain, run ``fn(Guest)`` in its kernel, check invariants;
    the machine is closed before it returns."""
    from hypervisor.toolstack.context import audit
    from hypervisor.toolstack.session import run_domain
    from tests.conftest import booting, make_config
    from tests.kernels import probe

    result: dict[str, Any] = {}

    def probe_fn(cpu: Any) -> None:
        result["value"] = fn(Guest(cpu))

    probe.PROBE = probe_fn
    cfg = replace(make_config(vcpus=vcpus, memory=memory), kernel="tests.kernels.probe",
                  maxmem=maxmem or memory)
    try:
        with booting() as boot:
            hv, dom = boot(cfg)
            r = run_domain(hv, dom)
            assert r.reason == "poweroff", dom.crash_report
            problems = audit(hv)
            assert problems == [], problems
            return result.get("value")
    finally:
        probe.PROBE = None
