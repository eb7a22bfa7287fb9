"""Proofs of concept of Xen's pagetable advisories, ported from the Xen Test
Framework as an x86 PV test guest (firmware/tests/xsa.S). XSA-182 and XSA-279
are portable cases (tests/hypercalls/portable.py); XSA-185 is for 32-bit PAE
guests, which pvlab does not run."""

from __future__ import annotations

import pytest

from hypervisor.mm.audit import audit
from hypervisor.mm.walker import Walker
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.session import boot, run_domain
from tests.conftest import FIRMWARE


def run_xsa_guest(vcpus: int = 2) -> str:
    hv, dom = boot(DomainConfig("xsa", 16, vcpus, FIRMWARE / "tests/xsa.elf"))
    try:
        r = run_domain(hv, dom)
        assert r.reason == "poweroff", dom.crash_report
        assert audit(hv) == []
        return r.console.decode()
    finally:
        hv.close()


def test_xsa286_and_xsa296_pocs_find_pvlab_not_vulnerable():
    out = run_xsa_guest()
    assert "XSA-286: not vulnerable" in out
    assert "XSA-296: not vulnerable" in out
    assert out.rstrip().endswith("Test result: SUCCESS"), out


def test_xsa296_is_skipped_with_one_vcpu():
    out = run_xsa_guest(vcpus=1)
    assert "XSA-296: SKIP" in out and "Test result: SUCCESS" in out


def test_xsa286_poc_catches_a_stale_linear_mapping(monkeypatch: pytest.MonkeyPatch):
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
