"""Faults in guest code reach the kernel's trap table with Xen's bounce frame
(RCX, R11, [error code,] RIP, CS, RFLAGS, RSP, SS); with no handler the domain
crashes with a report naming the fault (xen/arch/x86/pv/traps.c). In guest
kernel mode Xen emulates some privileged instructions
(xen/arch/x86/pv/emul-priv-op.c) and the forced-emulation prefix
(pv/emul-inv-op.c); an ``int N`` is checked against the guest's gate
(permit_softint, xen/arch/x86/traps.c do_general_protection).

These run the instruction from the Python test kernel (tests/kernels/faults.py);
firmware/tests/traps.S checks the same rules from an x86 guest."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.session import run_domain
from tests.conftest import FIRMWARE, make_config
from tests.kernels import faults

# mov (%rax), %rax with rax = 0xdead000 (unmapped): a read of a not-present page
PF_READ = b"\x48\xc7\xc0\x00\xd0\xea\x0d" + b"\x48\x8b\x00"
# invlpg (%rax): privileged, and not one Xen emulates for a PV guest
GP_INVLPG = b"\x0f\x01\x38"
MOV_CR3_RAX = b"\x0f\x20\xd8"
MOV_CR0_RAX = b"\x0f\x20\xc0"
MOV_CR4_RAX = b"\x0f\x20\xe0"
MOV_CR2_RAX = b"\x0f\x20\xd0"
UD2 = b"\x0f\x0b"
INT3 = b"\xcc"
SOFT_VECTOR = 0x9D  # a vector no exception uses (XTF's X86_VEC_AVAIL)
INT_SOFT = bytes([0xCD, SOFT_VECTOR])
# ud2; .ascii "xen"; cpuid: Xen's forced-emulation prefix
FEP_CPUID = b"\x0f\x0bxen\x0f\xa2"
MSR_GS_BASE = 0xC0000101


def mov_imm(reg: int, value: int) -> bytes:
    """movabs $value, %reg (reg: 0 rax, 1 rcx, 2 rdx)."""
    return bytes([0x48, 0xB8 + reg]) + value.to_bytes(8, "little")


@pytest.fixture
def run_fault(booted):
    """run_fault(code, register=True, gates={}): the faults test kernel runs
    ``code`` at CPL3 in guest kernel mode; the run, what its trap handler saw,
    and vcpu0's cr2."""
    def run(code: bytes, register: bool = True, gates: dict[int, int] | None = None):
        faults.CODE, faults.REGISTER, faults.GATES = code, register, gates or {}
        try:
            hv, dom = booted(replace(make_config(), kernel="tests.kernels.faults"))
            r = run_domain(hv, dom)
            return r, dict(faults.SEEN), dom.shared_info.vcpu_info[0].arch.cr2
        finally:
            faults.CODE, faults.REGISTER, faults.GATES = UD2, True, {}
    return run


def test_page_fault_has_cr2_and_error_code(run_fault):
    """The error code's user bit is the guest's mode, not the CPU's: a fault in
    guest kernel mode has it clear although all guest code runs at CPL3
    (pv/traps.c pv_inject_event: "Re-set error_code.user flag")."""
    r, seen, cr2 = run_fault(PF_READ)
    assert r.reason == "poweroff"
    assert seen["vector"] == 14
    assert cr2 == 0xDEAD000
    assert seen["error_code"] & 0x7 == 0x0  # not present, read, guest kernel mode
    assert seen["rip"] == seen["code"] + 7  # the faulting mov, not past it


def test_privileged_instruction_is_a_general_protection_fault(run_fault):
    """An instruction Xen does not emulate (emul-priv-op.c validate) is passed
    on as #GP(0) at the instruction (traps.c do_general_protection)."""
    r, seen, _ = run_fault(GP_INVLPG)
    assert r.reason == "poweroff"
    assert (seen["vector"], seen["error_code"], seen["rip"]) == (13, 0, seen["code"])


def test_invalid_opcode(run_fault):
    r, seen, _ = run_fault(UD2)
    assert (seen["vector"], seen["rip"]) == (6, seen["code"])


def test_mov_from_cr3_reads_the_kernel_l4_in_kernel_mode(run_fault):
    """emul-priv-op.c read_cr: CR3 is xen_pfn_to_cr3 of the kernel L4's frame
    (a machine frame for a PV guest); execution goes on after the mov."""
    r, seen, _ = run_fault(MOV_CR3_RAX + UD2)
    assert (seen["vector"], seen["rip"]) == (6, seen["code"] + 3)
    assert seen["rax"] == r.domain.vcpus[0].guest_table << 12


def test_mov_from_cr0_cr2_cr4(run_fault):
    """read_cr: CR0 is Xen's own (PE MP ET NE WP AM PG) with the guest's TS;
    CR2 the last page-fault address Xen delivered; CR4 the visible bits
    (PV_CR4_GUEST_VISIBLE_MASK) of the CPU's own."""
    code = MOV_CR0_RAX + b"\x48\x89\xc3" + MOV_CR4_RAX + b"\x48\x89\xc2" + MOV_CR2_RAX + UD2
    r, seen, _ = run_fault(code)
    assert (seen["vector"], seen["rip"]) == (6, seen["code"] + len(code) - 2)
    assert seen["rbx"] == 0x80050033
    assert seen["rdx"] == 0x220  # PAE | OSFXSR
    assert seen["rax"] == 0


def test_forced_emulation_prefix_runs_cpuid_with_xens_leaves(run_fault):
    """pv/emul-inv-op.c: ud2; "xen"; cpuid is CPUID emulated with Xen's view
    (traps.c cpuid_hypervisor_leaves: "XenVMMXenVMM", 5 more leaves)."""
    code = mov_imm(0, 0x40000000) + FEP_CPUID + UD2
    r, seen, _ = run_fault(code)
    assert (seen["vector"], seen["rip"]) == (6, seen["code"] + len(code) - 2)
    assert seen["rax"] == 0x40000005
    assert (seen["rbx"], seen["rdx"]) == (0x566E6558, 0x4D4D566E)  # "XenV", "nVMM"


def test_ud2_not_followed_by_the_signature_is_an_invalid_opcode(run_fault):
    r, seen, _ = run_fault(b"\x0f\x0bxyz\x0f\xa2")
    assert (seen["vector"], seen["rip"]) == (6, seen["code"])


def test_wrmsr_and_rdmsr_of_gs_base_are_emulated(run_fault):
    """emul-priv-op.c write_msr/read_msr: FS_BASE, GS_BASE and SHADOW_GS_BASE
    are the guest's own to set and read in kernel mode."""
    value = 0x12345678000
    wrmsr = mov_imm(1, MSR_GS_BASE) + mov_imm(0, value & 0xFFFFFFFF) + mov_imm(2, value >> 32)
    code = wrmsr + b"\x0f\x30" + mov_imm(0, 0) + mov_imm(2, 0) + b"\x0f\x32" + UD2
    r, seen, _ = run_fault(code)
    assert (seen["vector"], seen["rip"]) == (6, seen["code"] + len(code) - 2)
    assert (seen["rdx"] << 32) | seen["rax"] == value


def test_wrmsr_of_a_non_canonical_gs_base_is_a_gp_at_the_wrmsr(run_fault):
    """write_msr refuses a non-canonical base: #GP(0) at the wrmsr (Unicorn
    reports it as a double fault; the guest sees the #GP)."""
    code = mov_imm(1, MSR_GS_BASE) + mov_imm(0, 0) + mov_imm(2, 0x8000)
    r, seen, _ = run_fault(code + b"\x0f\x30" + UD2)
    assert r.reason == "poweroff"
    assert (seen["vector"], seen["error_code"], seen["rip"]) == (13, 0, seen["code"] + 30)


def test_rdmsr_of_an_msr_xen_does_not_emulate_is_a_gp(run_fault):
    code = mov_imm(1, 0x1234) + b"\x0f\x32" + UD2
    r, seen, _ = run_fault(code)
    assert (seen["vector"], seen["error_code"], seen["rip"]) == (13, 0, seen["code"] + 10)


def test_int3_is_injected_whatever_the_gates_dpl(run_fault):
    """int3 reaches the #BP handler through a DPL-0 gate: Xen's own gate for
    vector 3 has DPL 3 and do_int3 injects without looking at the guest's
    (traps.c do_general_protection: "The DPL ... is NOT CHECKED")."""
    r, seen, _ = run_fault(INT3)
    assert (seen["vector"], seen["rip"]) == (3, seen["code"] + 1)


def test_int_n_through_a_dpl1_gate_is_permitted_in_kernel_mode(run_fault):
    """permit_softint: from guest kernel mode a gate of DPL >= 1 will do; the
    handler returns after the int (pv_inject_sw_interrupt)."""
    r, seen, _ = run_fault(INT_SOFT + UD2, gates={SOFT_VECTOR: 1})
    assert (seen["vector"], seen["rip"]) == (-1, seen["code"] + 2)


def test_int_n_through_a_dpl0_gate_is_a_gp_at_the_int(run_fault):
    """A refused int N is #GP(vector << 3 | 2) at the int itself, as the
    hardware reports it (traps.c do_general_protection)."""
    r, seen, _ = run_fault(INT_SOFT + UD2, gates={SOFT_VECTOR: 0})
    assert (seen["vector"], seen["error_code"]) == (13, (SOFT_VECTOR << 3) | 2)
    assert seen["rip"] == seen["code"]


def test_faults_in_a_row_are_not_a_double_fault(run_fault):
    """Unicorn promotes the second handled fault to #DF, and the third stops the
    CPU, unless old_exception is reset (unicorn issue #1883); the VCPU resets it
    after every fault. Three #GPs stepped over, then a #UD."""
    faults.SKIP_GP = 3
    try:
        r, seen, _ = run_fault(GP_INVLPG * 3 + UD2)
    finally:
        faults.SKIP_GP = 0
    assert r.reason == "poweroff"
    assert seen["gp"] == 3 and seen["vector"] == 6
    assert seen["rip"] == seen["code"] + 9


@pytest.mark.parametrize("code, what", [(PF_READ, "page fault at 0xdead000"),
                                        (GP_INVLPG, "general protection fault"),
                                        (UD2, "invalid opcode")])
def test_no_handler_crashes_the_domain_with_a_report(run_fault, code, what):
    r, _, _ = run_fault(code, register=False)
    assert r.reason == "crash"
    assert what in r.domain.crash_report
    assert "no trap handler is registered" in r.domain.crash_report


def test_x86_guest_sees_xens_traps(booted):
    """firmware/tests/traps.S checks every rule above from x86 code, and that
    a page mapped without _PAGE_USER still works (pv/mm.h adjust_guest_l1e);
    then, from guest user mode, that an int N needs a DPL-3 gate, a #PF has
    the user bit, nothing privileged is emulated, and the forced-emulation
    prefix still works. Its first exception is the #GP of a wrmsr, which
    Unicorn must not turn into a double fault. Each failing check prints a
    FAILURE line."""
    hv, dom = booted(DomainConfig("traps", 16, 1, FIRMWARE / "tests/traps.elf"))
    r = run_domain(hv, dom)
    out = r.console.decode()
    assert r.reason == "poweroff", dom.crash_report
    assert "FAILURE" not in out, out
    assert out.rstrip().endswith("Test result: SUCCESS"), out


def test_int_0x80_with_a_handler_is_delivered_whatever_its_dpl(run_fault):
    """Xen's gate for 0x80 has DPL 3 and its fast path delivers to a
    registered handler without looking at the guest's DPL (x86_64/entry.S
    entry_int80)."""
    r, seen, _ = run_fault(b"\xcd\x80" + UD2, gates={0x80: 0})
    assert (seen["vector"], seen["rip"]) == (-1, seen["code"] + 2)
