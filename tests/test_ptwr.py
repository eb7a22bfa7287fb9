"""Writable pagetables: a PV guest kernel's write to one of its own L1
pagetables through a read-only mapping, emulated as Xen does
(xen/arch/x86/pv/ro-page-fault.c, entered from fixup_page_fault in
xen/arch/x86/traps.c when the guest enabled VMASST_TYPE_writable_pagetables).

From x86: the test guest firmware/tests/ptwr.S writes the bootstrap L1 entry
that maps one of its pages with the instruction forms Linux uses. From the
Python kernel: its stores go through the same emulation."""

from __future__ import annotations

import pytest

from hypervisor import domctl
from hypervisor.mm.walker import GuestFault
from hypervisor.public.arch_x86 import _PAGE_GLOBAL
from hypervisor.public.errno import EINVAL, ENOSYS
from hypervisor.public.xen import (
    Hypercall,
    VMASST_CMD_disable,
    VMASST_CMD_enable,
    VMASST_TYPE_m2p_strict,
    VMASST_TYPE_writable_pagetables,
)
from hypervisor.toolstack.config import load_config
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT, booting
from tests.hypercalls.guest import RW, Guest, run_case

# a user page's entry as Xen keeps it (adjust_guest_l1e adds _PAGE_GLOBAL), so
# that it reads back as written
USER_PTE = RW | _PAGE_GLOBAL

CHECKS = (
    "without the vm_assist, a write to an L1 faults",
    "mov to an L1 entry maps the new page",
    "lock cmpxchg that matches writes",
    "lock cmpxchg that misses leaves the entry",
    "an entry mapping a pagetable writable is refused with #PF",
    "a 4-byte write is widened",
    "xchg swaps the entry",
    "mov imm32 clears and restores the entry",
    "lock and / or of a byte of the entry",
    "lock btr / bts give the old bit in CF",
    "1- and 2-byte writes are widened",
    "a read-modify-write to a refused entry faults",
    "a write to a read-only page that is no pagetable faults",
)


@pytest.fixture(scope="module")
def ptwr_console() -> str:
    """The console of examples/ptwr.toml's run (the x86 test guest)."""
    with booting() as boot:
        hv, dom = boot(load_config(ROOT / "examples" / "ptwr.toml"))
        r = run_domain(hv, dom)
        assert r.reason == "poweroff", dom.crash_report
        assert audit(hv) == []
        return r.console.decode()


@pytest.mark.parametrize("check", CHECKS)
def test_x86_guest_writes_its_l1_through_a_read_only_mapping(ptwr_console, check):
    assert f"ptwr: {check}: ok" in ptwr_console, ptwr_console


def test_x86_ptwr_guest_reports_success(ptwr_console):
    assert ptwr_console.rstrip().endswith("Test result: SUCCESS"), ptwr_console


def _l1e_va(g: Guest, va: int) -> int:
    """The kernel's (read-only) address of the bootstrap L1 entry mapping va."""
    maddr = g.l1e_maddr(va)
    return g.va(g.m2p(maddr >> 12)) + (maddr & 0xFFF)


def _store(g: Guest, va: int, value: int) -> str:
    try:
        g.cpu.write_u64(va, value)
    except GuestFault:
        return "fault"
    return "done"


def test_python_kernel_store_to_its_l1_is_emulated():
    """The Python kernel's store to an L1 entry through its read-only mapping
    is a write #PF Xen fixes up like an x86 one: the entry is validated and
    written; a refused one is the kernel's fault; without the assist, no
    emulation at all."""
    def case(g: Guest) -> tuple:
        x, _ = g.alloc()
        y, y_mfn = g.alloc()
        g.cpu.write_u64(g.va(y), 0x5959)
        entry = _l1e_va(g, g.va(x))
        orig = g.cpu.read_u64(entry)
        before = _store(g, entry, (y_mfn << 12) | USER_PTE)
        rc = g.cpu.hypercall(Hypercall.vm_assist, VMASST_CMD_enable,
                             VMASST_TYPE_writable_pagetables)
        mapped = _store(g, entry, (y_mfn << 12) | USER_PTE)
        seen = g.cpu.read_u64(g.va(x))
        table = g.m2p(g.l1e_maddr(g.va(x)) >> 12)
        refused = _store(g, entry, (g.mfn(table) << 12) | RW)
        after_refusal = g.cpu.read_u64(entry)
        restored = _store(g, entry, orig)
        return (before, rc, mapped, hex(seen), refused, after_refusal == (y_mfn << 12) | USER_PTE,
                restored, g.cpu.read_u64(entry) == orig)

    assert run_case(case) == ("fault", 0, "done", "0x5959", "fault", True, "done", True)


def test_vm_assist_enables_and_disables_known_types(booted):
    """do_vm_assist (common/domain.c): a type outside PV64_VM_ASSIST_MASK is
    -EINVAL before the command is looked at; an unknown command -ENOSYS."""
    hv, dom = booted()
    v = dom.vcpus[0]

    def vm_assist(cmd: int, vmtype: int) -> int:
        return hv.hypercall(v, Hypercall.vm_assist, (cmd, vmtype))

    assert vm_assist(VMASST_CMD_enable, VMASST_TYPE_writable_pagetables) == 0
    assert vm_assist(VMASST_CMD_enable, VMASST_TYPE_m2p_strict) == 0
    assert dom.vm_assist == 1 << 2 | 1 << 32
    assert vm_assist(VMASST_CMD_disable, VMASST_TYPE_m2p_strict) == 0
    assert dom.vm_assist == 1 << 2
    assert vm_assist(VMASST_CMD_enable, 6) == -EINVAL
    assert vm_assist(VMASST_CMD_enable, 64) == -EINVAL
    assert vm_assist(2, 6) == -EINVAL
    assert vm_assist(2, VMASST_TYPE_writable_pagetables) == -ENOSYS
    assert dom.vm_assist == 1 << 2


def test_vm_assist_rides_in_vcpu0s_context(booted):
    """Every vcpu's context carries the domain's vm_assist word, and vcpu 0's
    sets it (arch_get_info_guest / arch_set_info_guest), so a restored guest
    keeps its writable pagetables; unknown bits are -EINVAL."""
    hv, dom = booted()
    assert hv.hypercall(dom.vcpus[0], Hypercall.vm_assist,
                        (VMASST_CMD_enable, VMASST_TYPE_writable_pagetables)) == 0
    ctx = domctl.getvcpucontext(dom, 0)
    assert ctx.vm_assist == 1 << VMASST_TYPE_writable_pagetables
    ctx.vm_assist = 0
    assert domctl.setvcpucontext(dom, 0, ctx) == 0
    assert dom.vm_assist == 0
    ctx.vm_assist = 1 << VMASST_TYPE_writable_pagetables
    assert domctl.setvcpucontext(dom, 0, ctx) == 0
    assert dom.vm_assist == 1 << VMASST_TYPE_writable_pagetables
    ctx.vm_assist = 1 << 6
    assert domctl.setvcpucontext(dom, 0, ctx) == -EINVAL
    assert dom.vm_assist == 1 << VMASST_TYPE_writable_pagetables
