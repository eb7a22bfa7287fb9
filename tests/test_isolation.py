"""Isolation across domains: a domain cannot map, pin, type, free or account
another domain's frames, nor the hypervisor's, nor name another domain as the
owner of pages or pagetables (XSM's default policy refuses a domU: -EPERM)."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from hypervisor.public.errno import EBUSY, EINVAL, EPERM
from hypervisor.public.memory import XENMEM_current_reservation, XENMEM_decrease_reservation
from hypervisor.public.xen import (
    MMU_MACHPHYS_UPDATE,
    MMUEXT_PIN_L1_TABLE,
    MMUEXT_TLB_FLUSH_LOCAL,
    MMUEXT_UNPIN_TABLE,
    Hypercall,
)
from hypervisor.toolstack.builder import build_domain
from hypervisor.toolstack.context import audit
from tests.conftest import make_config
from tests.hypercalls.guest import RO, RW, Guest
from tests.kernels import probe


@pytest.fixture
def two_domains(booted):
    """two_domains(fn): domain 1 runs ``fn(guest, victim_mfns, victim_domid)``
    in a probe kernel; domain 2 is an ordinary guest whose frames are the
    targets. What ``fn`` returned."""
    def run(fn):
        hv = booted.bare(64, seed=3)
        result = {}
        a_cfg = replace(make_config(name="attacker"), kernel="tests.kernels.probe")
        attacker = build_domain(hv, a_cfg)
        victim = build_domain(hv, make_config("run=hello", name="victim"))
        owned = hv.machine.frames.owned_by(victim.domid).tolist()
        victim_frames = [m for m in owned if not hv.machine.frames.xenheap[m]][:4]

        def probe_fn(cpu):
            result["value"] = fn(Guest(cpu), victim_frames, victim.domid)

        probe.PROBE = probe_fn
        try:
            hv.run()
            assert attacker.shutdown_reason == 0, attacker.crash_report
            assert victim.shutdown_reason == 0, victim.crash_report
            assert b"hello from user space" in bytes(victim.console_out)
            assert audit(hv) == []
            return result["value"]
        finally:
            probe.PROBE = None
    return run


def test_cannot_map_another_domains_frame(two_domains):
    def case(g, frames, _domid):
        pfn, _ = g.alloc()
        return (g.update_va_mapping(g.va(pfn), (frames[0] << 12) | RO),
                g.update_va_mapping(g.va(pfn), (frames[0] << 12) | RW),
                g.mmu_update([(g.l1e_maddr(g.va(pfn)), (frames[1] << 12) | RO)]))
    assert two_domains(case) == (-EBUSY, -EBUSY, (-EBUSY, 0))


def test_cannot_pin_type_or_set_m2p_of_another_domains_frame(two_domains):
    def case(g, frames, _domid):
        return (g.mmuext1(MMUEXT_PIN_L1_TABLE, frames[0]),
                g.mmuext1(MMUEXT_UNPIN_TABLE, frames[0]),
                g.mmu_update([((frames[0] << 12) | MMU_MACHPHYS_UPDATE, 7)]),
                g.mmu_update([((frames[1] << 12), 0x1234)]))   # write into its page
    assert two_domains(case) == (-EINVAL, -EINVAL, (-EINVAL, 0), (-EINVAL, 0))


def test_cannot_free_another_domains_frame(two_domains):
    def case(g, frames, _domid):
        buf = g.scratch + 0x400
        g.cpu.write(buf + 64, struct.pack("<Q", frames[2]))
        g.cpu.write(buf, struct.pack("<QQIIH6x", buf + 64, 1, 0, 0, 0x7FF0))
        return g.cpu.hypercall(Hypercall.memory_op, XENMEM_decrease_reservation, buf)
    assert two_domains(case) == 0   # no extent done


def test_foreign_page_owner_is_refused(two_domains):
    """Naming another existing domain as page owner (or pagetable owner), in
    mmu_update, mmuext_op or update_va_mapping_otherdomain: XSM_TARGET refuses
    a domU."""
    def case(g, frames, domid):
        pfn, mfn = g.alloc()
        return (g.mmu_update([(g.l1e_maddr(g.va(pfn)), (mfn << 12) | RO)], foreigndom=domid),
                g.mmu_update([(g.l1e_maddr(g.va(pfn)), (mfn << 12) | RO)],
                             foreigndom=0x7FF0 | (domid + 1) << 16),
                g.mmuext1(MMUEXT_TLB_FLUSH_LOCAL, foreigndom=domid),
                g.cpu.hypercall(Hypercall.update_va_mapping_otherdomain, g.va(pfn),
                                (mfn << 12) | RO, 0, domid))
    assert two_domains(case) == ((-EPERM, 0), (-EPERM, 0), -EPERM, -EPERM)


def test_other_domains_reservation_is_refused(two_domains):
    def case(g, frames, domid):
        buf = g.scratch + 0x400
        g.cpu.write(buf, struct.pack("<H", domid))
        return g.cpu.hypercall(Hypercall.memory_op, XENMEM_current_reservation, buf)
    assert two_domains(case) == -EPERM


def test_cannot_map_hypervisor_frames_or_the_m2p_writable(two_domains):
    def case(g, _frames, _domid):
        pfn, _ = g.alloc()
        m2p_mfn = 1  # the M2P sits at the bottom of machine memory
        return (g.update_va_mapping(g.va(pfn), (m2p_mfn << 12) | RW),
                g.update_va_mapping(g.va(pfn), (m2p_mfn << 12) | RO),
                g.mmuext1(MMUEXT_PIN_L1_TABLE, m2p_mfn))
    assert two_domains(case) == (-EBUSY, -EBUSY, -EINVAL)
