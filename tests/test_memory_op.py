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
    XENMEM_exchange,
    XENMEM_increase_reservation,
    XENMEM_maximum_ram_page,
    XENMEM_maximum_reservation,
    XENMEM_populate_physmap,
    XENMEMF_address_bits,
    XENMEMF_exact_node,
    XENMEMF_populate_on_demand,
)
from hypervisor.public.native import VIRT_BASE
from hypervisor.public.xen import (
    DOMID_SELF,
    MMUEXT_PIN_L1_TABLE,
    MMUEXT_UNPIN_TABLE,
    Hypercall,
)
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


def reservation(cpu, op, extents, order=0, domid=DOMID_SELF, start=0, handle=None, flags=0):
    """Lay out a xen_memory_reservation and its extent list in scratch memory."""
    buf = probe.scratch(cpu)
    lst = buf + 0x100
    cpu.write(lst, struct.pack(f"<{len(extents)}Q", *extents))
    cpu.write(buf, struct.pack("<QQIIH6x", lst if handle is None else handle,
                               len(extents), order, flags, domid))
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


def test_populate_physmap_refuses_what_xen_refuses_in_mem_flags(run_probe):
    """address_bits <= PAGE_SHIFT (construct_memop_from_reservation), an exact
    node request from a domU (propagate_node), populate-on-demand on oneself
    (populate_physmap): no extent done."""
    def fn(cpu):
        return tuple(reservation(cpu, XENMEM_populate_physmap, [4000], flags=f)[0]
                     for f in (XENMEMF_address_bits(12), XENMEMF_exact_node(0),
                               XENMEMF_populate_on_demand, 0))
    assert run_probe(fn) == (0, 0, 0, 1)


def mmuext1(cpu, cmd, mfn):
    buf = probe.scratch(cpu) + 0x800
    cpu.write(buf, struct.pack("<IIQQ", cmd, 0, mfn, 0))
    return cpu.hypercall(Hypercall.mmuext_op, buf, 1, 0, DOMID_SELF)


def test_decrease_reservation_leaves_a_pin_for_the_guest_to_drop(run_probe):
    """Since the XSA-252 fix guest_remove_page no longer unpins: a pinned table
    given back stays pinned (and owned) until the guest unpins it, which then
    succeeds and frees the frame."""
    seen = {}

    def fn(cpu):
        pfn = free_pfn(cpu)
        mfn = seen["mfn"] = pfn_to_mfn(cpu, pfn)
        va = VIRT_BASE + (pfn << 12)
        cpu.write(va, bytes(4096))
        rcs = [cpu.hypercall(Hypercall.update_va_mapping, va, (mfn << 12) | 0x25, 0),
               mmuext1(cpu, MMUEXT_PIN_L1_TABLE, mfn),
               cpu.hypercall(Hypercall.update_va_mapping, va, 0, 0),
               reservation(cpu, XENMEM_decrease_reservation, [mfn])[0]]
        cpu.write_u64(p2m_slot(cpu, pfn), INVALID_MFN)
        return (*rcs, mmuext1(cpu, MMUEXT_UNPIN_TABLE, mfn))

    def check(hv, dom):
        assert hv.machine.frames.owner[seen["mfn"]] != dom.domid  # freed by the unpin

    assert run_probe(fn, check=check) == (0, 0, 0, 1, 0)


def exchange(cpu, in_extents, out_extents, in_order=0, out_order=0, start=0, done=0):
    """XENMEM_exchange of ``in_extents`` (gmfns) for new frames at the gpfns
    ``out_extents``; (rc, nr_exchanged, the out list as written back)."""
    buf = probe.scratch(cpu)
    in_list, out_list = buf + 0x100, buf + 0x200
    cpu.write(in_list, struct.pack(f"<{len(in_extents)}Q", *in_extents))
    cpu.write(out_list, struct.pack(f"<{len(out_extents)}Q", *out_extents))
    cpu.write(buf, struct.pack("<QQIIH6x", in_list, len(in_extents), in_order, 0, DOMID_SELF)
              + struct.pack("<QQIIH6x", out_list, len(out_extents), out_order, 0, DOMID_SELF)
              + struct.pack("<Q", done))
    rc = cpu.hypercall(Hypercall.memory_op, XENMEM_exchange | (start << MEMOP_EXTENT_SHIFT), buf)
    return (rc, cpu.read_u64(buf + 64),
            list(struct.unpack(f"<{len(out_extents)}Q", cpu.read(out_list, 8 * len(out_extents)))))


def test_exchange_gives_a_new_frame_for_an_unmapped_one(run_probe):
    """memory_exchange: the input frame (unmapped first, as Linux does) goes,
    a new frame takes its pfn, its mfn is written back, the reservation is
    unchanged."""
    seen = {}

    def fn(cpu):
        pfn = free_pfn(cpu)
        mfn = pfn_to_mfn(cpu, pfn)
        before = query(cpu, XENMEM_current_reservation)
        rc0 = cpu.hypercall(Hypercall.update_va_mapping, VIRT_BASE + (pfn << 12), 0, 0)
        rc, done, out = exchange(cpu, [mfn], [pfn])
        cpu.write_u64(p2m_slot(cpu, pfn), out[0])
        seen.update(old=mfn, new=out[0], pfn=pfn)
        return rc0, rc, done, out[0] != mfn, query(cpu, XENMEM_current_reservation) - before

    def check(hv, dom):
        ft = hv.machine.frames
        assert ft.owner[seen["new"]] == dom.domid and ft.owner[seen["old"]] != dom.domid
        assert int(hv.machine.m2p[seen["new"]]) == seen["pfn"]

    assert run_probe(fn, check=check) == (0, 0, 1, True, 0)


def test_exchange_refuses_bad_requests(run_probe):
    """memory_exchange's early checks: an order above the domain's maximum is
    -EPERM; lists of different sizes -EINVAL; and do_memory_op refuses a
    start extent (-EINVAL). A frame still mapped cannot be stolen (-EINVAL)."""
    def fn(cpu):
        mfn = pfn_to_mfn(cpu, free_pfn(cpu))
        return (exchange(cpu, [mfn], [4095], in_order=10)[:2],
                exchange(cpu, [mfn], [4095, 4094])[:2],
                exchange(cpu, [mfn], [4095], start=1)[:2],
                exchange(cpu, [mfn], [4095])[:2])
    assert run_probe(fn) == ((-EPERM, 0), (-EINVAL, 0), (-EINVAL, 0), (-EINVAL, 0))
