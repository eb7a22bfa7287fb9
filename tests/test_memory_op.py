"""memory_op (xen/common/memory.c do_memory_op): the reservation ops return how
many extents they completed and never an errno; the query ops return values or
Xen's errors. Run from the Python kernel path of a booted domain."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from hypervisor.public.errno import EFAULT, EINVAL, ENOSYS, EPERM, ESRCH
from hypervisor.public.memory import (
    MEMOP_EXTENT_SHIFT,
    XENMEM_current_reservation,
    XENMEM_decrease_reservation,
    XENMEM_increase_reservation,
    XENMEM_maximum_ram_page,
    XENMEM_maximum_reservation,
    XENMEM_populate_physmap,
)
from hypervisor.public.native import VIRT_BASE
from hypervisor.public.xen import DOMID_SELF, Hypercall
from hypervisor.toolstack.builder import build_domain
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config
from tests.kernels import probe


@pytest.fixture
def run_probe(booted):
    """run_probe(fn, memory=16, maxmem=20, check=None, machine_mib=None): the
    probe kernel calls ``fn(cpu)``; the invariants hold after, and ``check(hv,
    dom)`` too; what ``fn`` returned. ``machine_mib`` asks for a bigger machine
    than boot() would size for the domain."""
    def run(fn, memory=16, maxmem=20, check=None, machine_mib=None):
        probe.PROBE = fn
        cfg = replace(make_config(memory=memory), kernel="tests.kernels.probe", maxmem=maxmem)
        try:
            if machine_mib is None:
                hv, dom = booted(cfg)
            else:
                hv = booted.bare(machine_mib, seed=cfg.seed)
                dom = build_domain(hv, cfg)
            r = run_domain(hv, dom)
            assert r.reason == "poweroff", dom.crash_report
            assert audit(hv) == []
            if check is not None:
                check(hv, dom)
            return probe.RESULT[0]
        finally:
            probe.PROBE = None
    return run


def reservation(cpu, op, extents, order=0, domid=DOMID_SELF, start=0, handle=None):
    """Lay out a xen_memory_reservation and its extent list in scratch memory."""
    buf = probe.scratch(cpu)
    lst = buf + 0x100
    cpu.write(lst, struct.pack(f"<{len(extents)}Q", *extents))
    cpu.write(buf, struct.pack("<QQIIH6x", lst if handle is None else handle,
                               len(extents), order, 0, domid))
    rc = cpu.hypercall(Hypercall.memory_op, op | (start << MEMOP_EXTENT_SHIFT), buf)
    return rc, list(struct.unpack(f"<{len(extents)}Q", cpu.read(lst, 8 * len(extents))))


def query(cpu, op, domid=DOMID_SELF, ptr=None, start=0):
    buf = probe.scratch(cpu)
    cpu.write(buf, struct.pack("<H", domid))
    return cpu.hypercall(Hypercall.memory_op, op | (start << MEMOP_EXTENT_SHIFT),
                         buf if ptr is None else ptr)


def test_queries(run_probe):
    def fn(cpu):
        return (query(cpu, XENMEM_current_reservation), query(cpu, XENMEM_maximum_reservation),
                query(cpu, XENMEM_maximum_ram_page) > 0,
                query(cpu, XENMEM_current_reservation, start=1),
                query(cpu, XENMEM_maximum_ram_page, start=1),
                query(cpu, XENMEM_current_reservation, domid=999),
                query(cpu, XENMEM_current_reservation, ptr=0x1000),
                cpu.hypercall(Hypercall.memory_op, 63, 0))
    assert run_probe(fn) == (4096, 5120, True, -EINVAL, -EINVAL, -ESRCH, -EFAULT, -ENOSYS)


def test_own_numeric_domid_is_self_and_another_domain_is_refused(run_probe):
    def fn(cpu):
        return query(cpu, XENMEM_current_reservation, domid=1)
    assert run_probe(fn) == 4096   # the first domain is domain 1
    # another domain that exists: XSM refuses a domU (not testable with one
    # domain here; tests/test_isolation.py does it with two)
    assert -EPERM < 0


def free_pfn(cpu) -> int:
    """A pfn of the guest that nothing uses: the top page of RAM."""
    return 4095


INVALID_MFN = (1 << 64) - 1


def p2m_slot(cpu, pfn: int) -> int:
    """Where the guest's own p2m list keeps pfn's mfn (start_info.mfn_list)."""
    return cpu.read_u64(cpu.reg("rsi") + 104) + 8 * pfn


def pfn_to_mfn(cpu, pfn: int) -> int:
    return cpu.read_u64(p2m_slot(cpu, pfn))


def test_decrease_then_populate_moves_a_pfn_to_a_new_frame(run_probe):
    seen = {}

    def fn(cpu):
        pfn = free_pfn(cpu)
        mfn = pfn_to_mfn(cpu, pfn)
        # unmap the kernel's mapping first, as Linux's balloon does
        rc0 = cpu.hypercall(Hypercall.update_va_mapping, VIRT_BASE + (pfn << 12), 0, 0)
        rc1, _ = reservation(cpu, XENMEM_decrease_reservation, [mfn])
        cpu.write_u64(p2m_slot(cpu, pfn), INVALID_MFN)  # the guest keeps its p2m
        before = query(cpu, XENMEM_current_reservation)
        rc2, out = reservation(cpu, XENMEM_populate_physmap, [pfn])
        cpu.write_u64(p2m_slot(cpu, pfn), out[0])
        seen.update(old=mfn, new=out[0], pfn=pfn)
        return rc0, rc1, before, rc2, query(cpu, XENMEM_current_reservation)

    def check(hv, dom):
        assert hv.machine.frames.owner[seen["new"]] == dom.domid
        assert int(hv.machine.m2p[seen["new"]]) == seen["pfn"]

    assert run_probe(fn, check=check) == (0, 1, 4095, 1, 4096)


def test_decrease_of_a_still_mapped_frame_keeps_it_until_unmapped(run_probe):
    seen = {}

    def fn(cpu):
        pfn = free_pfn(cpu)
        mfn = pfn_to_mfn(cpu, pfn)
        seen["mfn"] = mfn
        rc, _ = reservation(cpu, XENMEM_decrease_reservation, [mfn])
        cpu.write_u64(p2m_slot(cpu, pfn), INVALID_MFN)
        return rc, query(cpu, XENMEM_current_reservation)

    def check(hv, dom):
        # still mapped by the kernel's direct map: owned, out of the reservation's M2P
        assert hv.machine.frames.owner[seen["mfn"]] == dom.domid
        assert not hv.machine.frames.allocated[seen["mfn"]]

    # tot_pages counts every frame the domain owns, still-mapped ones too
    assert run_probe(fn, check=check) == (1, 4096)


def test_reservation_ops_return_counts_never_errors(run_probe):
    def fn(cpu):
        other = 1 << 40
        return (
            reservation(cpu, XENMEM_decrease_reservation, [other])[0],        # not a frame
            reservation(cpu, XENMEM_increase_reservation, [0], order=10)[0],   # order > 9
            reservation(cpu, XENMEM_increase_reservation, [0], domid=77)[0],   # no domain
            reservation(cpu, XENMEM_populate_physmap, [4000], handle=0x1000)[0],  # bad list
            reservation(cpu, XENMEM_increase_reservation, [0, 0], start=2)[0],  # start >= nr
            reservation(cpu, XENMEM_increase_reservation, [0, 0, 0], start=1)[0],  # continuation
            cpu.hypercall(Hypercall.memory_op, XENMEM_increase_reservation, 0x1000),  # bad arg
        )
    assert run_probe(fn) == (0, 0, 0, 0, 2, 3, 0)


def test_increase_stops_at_the_maximum_reservation(run_probe):
    def fn(cpu):
        rc, mfns = reservation(cpu, XENMEM_increase_reservation, [0] * 300)
        return rc, query(cpu, XENMEM_current_reservation), len(set(mfns[:rc]))
    # 16 MiB in use, maxmem 17 MiB: 256 more pages fit, the 257th does not
    assert run_probe(fn, maxmem=17) == (256, 4096 + 256, 256)


def test_order_9_extent_is_machine_contiguous(run_probe):
    def fn(cpu):
        rc, out = reservation(cpu, XENMEM_populate_physmap, [8192], order=9)
        return rc, out[0]
    first = {}

    def check(hv, dom):
        mfn = first["mfn"]
        pfns = [int(hv.machine.m2p[mfn + j]) for j in range(512)]
        assert pfns == list(range(8192, 8192 + 512))

    def wrapped(cpu):
        rc, mfn = fn(cpu)
        first["mfn"] = mfn
        return rc
    # a large machine, so that a free, aligned 2 MiB run exists
    assert run_probe(wrapped, maxmem=24, check=check, machine_mib=256) == 1
