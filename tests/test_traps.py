"""Faults in guest code reach the kernel's trap table with Xen's bounce frame
(RCX, R11, [error code,] RIP, CS, RFLAGS, RSP, SS); with no handler the domain
crashes with a report naming the fault (xen/arch/x86/pv/traps.c)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config
from tests.kernels import faults

# mov (%rax), %rax with rax = 0xdead000 (unmapped): a read of a not-present page
PF_READ = b"\x48\xc7\xc0\x00\xd0\xea\x0d" + b"\x48\x8b\x00"
# mov %cr3, %rax: privileged at CPL3
GP_CR3 = b"\x0f\x20\xd8"
UD2 = b"\x0f\x0b"
INT3 = b"\xcc"


@pytest.fixture
def run_fault(booted):
    """run_fault(code, register=True): the faults test kernel runs ``code`` at
    CPL3; the run, what its trap handler saw, and vcpu0's cr2."""
    def run(code: bytes, register: bool = True):
        faults.CODE, faults.REGISTER = code, register
        try:
            hv, dom = booted(replace(make_config(), kernel="tests.kernels.faults"))
            r = run_domain(hv, dom)
            return r, dict(faults.SEEN), dom.shared_info.vcpu_info[0].arch.cr2
        finally:
            faults.CODE, faults.REGISTER = UD2, True
    return run


def test_page_fault_has_cr2_and_error_code(run_fault):
    r, seen, cr2 = run_fault(PF_READ)
    assert r.reason == "poweroff"
    assert seen["vector"] == 14
    assert cr2 == 0xDEAD000
    assert seen["error_code"] & 0x7 == 0x4  # not present, read, from CPL3
    assert seen["rip"] == seen["code"] + 7  # the faulting mov, not past it


def test_privileged_instruction_is_a_general_protection_fault(run_fault):
    r, seen, _ = run_fault(GP_CR3)
    assert r.reason == "poweroff"
    assert (seen["vector"], seen["error_code"], seen["rip"]) == (13, 0, seen["code"])


def test_invalid_opcode(run_fault):
    r, seen, _ = run_fault(UD2)
    assert (seen["vector"], seen["rip"]) == (6, seen["code"])


def test_int3_needs_a_dpl3_gate(run_fault):
    """int3 is a software interrupt: through a DPL-0 gate it is a #GP whose
    error code names the gate (vector << 3 | 2), as on hardware and in Xen."""
    r, seen, _ = run_fault(INT3)
    assert (seen["vector"], seen["error_code"]) == (13, (3 << 3) | 2)


def test_faults_in_a_row_are_not_a_double_fault(run_fault):
    """Unicorn promotes the second handled fault to #DF, and the third stops the
    CPU, unless old_exception is reset (unicorn issue #1883); the VCPU resets it
    after every fault. Three #GPs stepped over, then a #UD."""
    faults.SKIP_GP = 3
    try:
        r, seen, _ = run_fault(GP_CR3 * 3 + UD2)
    finally:
        faults.SKIP_GP = 0
    assert r.reason == "poweroff"
    assert seen["gp"] == 3 and seen["vector"] == 6
    assert seen["rip"] == seen["code"] + 9


@pytest.mark.parametrize("code, what", [(PF_READ, "page fault at 0xdead000"),
                                        (GP_CR3, "general protection fault"),
                                        (UD2, "invalid opcode")])
def test_no_handler_crashes_the_domain_with_a_report(run_fault, code, what):
    r, _, _ = run_fault(code, register=False)
    assert r.reason == "crash"
    assert what in r.domain.crash_report
    assert "no trap handler is registered" in r.domain.crash_report
