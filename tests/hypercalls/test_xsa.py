"""Proofs of concept of Xen's pagetable advisories, ported from the Xen Test
Framework as an x86 PV test guest (firmware/tests/xsa.S). XSA-182 and XSA-279
are portable cases (tests/hypercalls/portable.py); XSA-185 is for 32-bit PAE
guests, which pvlab does not run."""

from __future__ import annotations

import struct

import pytest

from hypervisor.mm.walker import Walker
from hypervisor.public.xen import (
    DOMID_SELF,
    MMUEXT_PIN_L2_TABLE,
    MMUEXT_UNPIN_TABLE,
    UVMF_INVLPG,
    Hypercall,
)
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.session import run_domain
from tests.conftest import FIRMWARE
from tests.hypercalls.guest import RW, TABLE, Guest, run_case
from tests.hypercalls.test_multicall import multicall


@pytest.fixture
def run_xsa_guest(booted):
    """run_xsa_guest(vcpus=2): the x86 XSA guest's run, which must power off
    with the invariants holding; its console."""
    def run(vcpus: int = 2) -> str:
        hv, dom = booted(DomainConfig("xsa", 16, vcpus, FIRMWARE / "tests/xsa.elf"))
        r = run_domain(hv, dom)
        assert r.reason == "poweroff", dom.crash_report
        assert audit(hv) == []
        return r.console.decode()
    return run


def test_xsa286_and_xsa296_pocs_find_pvlab_not_vulnerable(run_xsa_guest):
    out = run_xsa_guest()
    assert "XSA-286: not vulnerable" in out
    assert "XSA-296: not vulnerable" in out
    assert out.rstrip().endswith("Test result: SUCCESS"), out


def test_xsa296_is_skipped_with_one_vcpu(run_xsa_guest):
    """A skip is never reported as a success: XTF keeps the worst status
    (common/report.c set_status), and SKIP is worse than SUCCESS."""
    out = run_xsa_guest(vcpus=1)
    assert "XSA-296: SKIP" in out
    assert out.rstrip().endswith("Test result: SKIP"), out


def test_xsa286_poc_catches_a_stale_linear_mapping(monkeypatch: pytest.MonkeyPatch,
                                                   run_xsa_guest):
    """The PoC is not vacuous: a hypervisor that caches where an address's L1
    entry lives across an mmu_update (XSA-286's bug) fails it."""
    real = Walker.l1e_maddr
    cache: dict[tuple[int, int], int | None] = {}

    def stale(self: Walker, cr3_mfn: int, va: int) -> int | None:
        key = (cr3_mfn, va)
        if cache.get(key) is None:
            cache[key] = real(self, cr3_mfn, va)
        return cache[key]

    monkeypatch.setattr(Walker, "l1e_maddr", stale)
    out = run_xsa_guest()
    assert "XSA-286: FAILURE: a stale linear mapping edited the first L1" in out
    assert "Test result: FAILURE" in out



def test_xsa286_from_the_python_kernel_path():
    """The same PoC from the Python kernel: same steps, same outcome."""
    def case(g: Guest) -> tuple[list[tuple[int, int]], int]:
        _, l1t1 = g.table()
        _, l1t2 = g.table()
        _, l2t1 = g.table({0: (l1t1 << 12) | TABLE})
        _, l2t2 = g.table({0: (l1t2 << 12) | TABLE})
        _, l3 = g.table()
        assert g.mmu_update([(g.l4_mfn << 12, (l3 << 12) | TABLE)]) == (0, 1)
        assert g.mmuext([(MMUEXT_PIN_L2_TABLE, l2t1, 0), (MMUEXT_PIN_L2_TABLE, l2t2, 0)]) \
            == (0, 2)
        addr, new = 1 << 30, (g.mfn(0) << 12) | RW
        switch = g.scratch + 0x100  # one mmu_update request: l3[1] -> l2t2
        seen = []
        for _ in range(15):
            assert g.mmu_update([((l3 << 12) + 8, (l2t1 << 12) | TABLE), (l1t1 << 12, 0),
                                 (l1t2 << 12, 0)])[0] == 0
            g.cpu.write(switch, struct.pack("<QQ", (l3 << 12) + 8, (l2t2 << 12) | TABLE))
            rc, results = multicall(g, [
                (Hypercall.update_va_mapping, addr, 0, UVMF_INVLPG),
                (Hypercall.mmu_update, switch, 1, 0, DOMID_SELF),
                (Hypercall.update_va_mapping, addr, new, UVMF_INVLPG)])
            assert (rc, results) == (0, [0, 0, 0])
            seen.append((g.read_entry(l1t1, 0), g.read_entry(l1t2, 0)))
        g.mmu_update([((l3 << 12) + 8, 0), (l1t2 << 12, 0), (g.l4_mfn << 12, 0)])
        assert g.mmuext([(MMUEXT_UNPIN_TABLE, l2t1, 0), (MMUEXT_UNPIN_TABLE, l2t2, 0)]) \
            == (0, 2)
        return seen, new

    seen, new = run_case(case)
    assert seen == [(0, new)] * 15  # the first L1 untouched, the second edited
