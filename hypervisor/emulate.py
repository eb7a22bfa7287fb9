"""What Xen emulates for a 64-bit PV guest instead of passing a fault on
(xen/arch/x86/pv/emul-priv-op.c, pv/emul-inv-op.c, traps.c).

All guest code runs at CPL3, so a guest kernel's ``mov %cr3, %rax`` or
``rdmsr`` raises #GP(0). Xen decodes the instruction and, in guest kernel mode,
performs the few it allows (pv_emulate_privileged_op): reads of CR0, CR2, CR3,
CR4, and rdmsr/wrmsr of the segment bases and a handful of MSRs. Anything else
is passed on to the guest as the #GP it was. In user mode nothing privileged is
emulated (x86_emulate's mode_ring0 check).

A #UD at ``ud2; .ascii "xen"; cpuid`` is Xen's forced-emulation prefix
(emulate_forced_invalid_op): the CPUID after it runs with Xen's view, in either
mode. Xen's view of CPUID adds the hypervisor leaves at 0x40000000
(cpuid_hypervisor_leaves); the other leaves are the CPU's own here. Xen uses
CPUID faulting where the hardware has it (the default), so a plain CPUID sees
the same leaves, and so it does here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn.x86_const import (
    UC_X86_REG_CR4,
    UC_X86_REG_FS_BASE,
    UC_X86_REG_GS_BASE,
    UC_X86_REG_MSR,
)

from hypervisor.hypercalls.version import XEN_MAJOR, XEN_MINOR
from hypervisor.mm.walker import is_canonical_address
from hypervisor.public.arch_x86 import MSR_FS_BASE, MSR_GS_BASE, MSR_SHADOW_GS_BASE

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

RAX, RCX, RDX, RBX = 0, 1, 2, 3  # x86 register numbers, the VCPU's GPR order
_U32 = 0xFFFFFFFF

# CR0 as Xen runs with it (boot/trampoline.S: PE MP ET NE WP AM PG); the
# guest adds only its own TS (fpu_taskswitch), which pvlab's guests never set
XEN_CR0 = 0x80050033
X86_CR4_PAE, X86_CR4_MCE, X86_CR4_OSFXSR, X86_CR4_OSXMMEXCPT = 1 << 5, 1 << 6, 1 << 9, 1 << 10
# pv/domain.h: the CR4 bits a PV guest sees of the CPU's own settings
PV_CR4_GUEST_VISIBLE_MASK = X86_CR4_PAE | X86_CR4_MCE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT

MSR_APIC_BASE = 0x1B
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
APIC_BASE_BSP, APIC_BASE_ENABLE, APIC_DEFAULT_PHYS_BASE = 1 << 8, 1 << 11, 0xFEE00000
XEN_MSR_PAT = 0x050100070406  # the PAT Xen runs with (asm/processor.h)
_BASE_REGS = {MSR_FS_BASE: UC_X86_REG_FS_BASE, MSR_GS_BASE: UC_X86_REG_GS_BASE}

# public/arch-x86/cpuid.h
XEN_CPUID_FIRST_LEAF = 0x40000000
XEN_CPUID_MAX_NUM_LEAVES = 5
XEN_CPUID_SIGNATURE = (0x566E6558, 0x65584D4D, 0x4D4D566E)  # "XenVMMXenVMM"
XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD = 1 << 0

FEP_SIGNATURE = b"\x0f\x0bxen"  # ud2; .ascii "xen"
OPC_CPUID = b"\x0f\xa2"
_OPC_MOV_FROM_CR, _OPC_WRMSR, _OPC_RDMSR = 0x20, 0x30, 0x32


def read_cr(vcpu: Vcpu, reg: int) -> int | None:
    """emul-priv-op.c read_cr: the value, or None where Xen cannot."""
    if reg == 0:
        return XEN_CR0
    if reg == 2:
        return vcpu.ctrlreg2
    if reg == 3:
        # xen_pfn_to_cr3(mfn_to_gfn(guest_table)): a machine frame for PV
        return vcpu.guest_table << 12
    if reg == 4:
        return vcpu.uc.reg_read(UC_X86_REG_CR4) & PV_CR4_GUEST_VISIBLE_MASK
    return None


def guest_efer(vcpu: Vcpu) -> int:
    return vcpu.uc.reg_read(UC_X86_REG_MSR, MSR_EFER)


def read_msr(vcpu: Vcpu, msr: int) -> int | None:
    """emul-priv-op.c read_msr: the value, or None for a #GP."""
    if msr in _BASE_REGS:
        return vcpu.uc.reg_read(_BASE_REGS[msr])
    if msr == MSR_SHADOW_GS_BASE:
        return vcpu.uc.reg_read(UC_X86_REG_MSR, MSR_SHADOW_GS_BASE)  # gs_base_user
    if msr == MSR_EFER:
        return guest_efer(vcpu)
    if msr == MSR_APIC_BASE:
        bsp = APIC_BASE_BSP if vcpu.vcpu_id == 0 else 0
        return APIC_BASE_ENABLE | APIC_DEFAULT_PHYS_BASE | bsp
    if msr == MSR_IA32_CR_PAT:
        return XEN_MSR_PAT
    return None


def write_msr(vcpu: Vcpu, msr: int, value: int) -> bool:
    """emul-priv-op.c write_msr: done, or False for a #GP."""
    if msr in (*_BASE_REGS, MSR_SHADOW_GS_BASE):
        if not is_canonical_address(value):
            return False
        if msr in _BASE_REGS:
            vcpu.uc.reg_write(_BASE_REGS[msr], value)
        else:
            vcpu.uc.reg_write(UC_X86_REG_MSR, (MSR_SHADOW_GS_BASE, value))
        if msr != MSR_FS_BASE:
            vcpu.gs_bases_in_use = True  # kernel mode: GS is the kernel's, the shadow the user's
        return True
    # EFER: "Linux depends on being able to write back the current value"
    return msr == MSR_EFER and value == guest_efer(vcpu)


def emulate_privileged_op(vcpu: Vcpu) -> bool:
    """pv_emulate_privileged_op for a #GP(0) at the guest's RIP: True if the
    instruction was carried out (RIP past it), False to pass the #GP on."""
    if not vcpu.in_kernel:
        return False  # x86_emulate: mode_ring0() fails in guest user mode
    rip = vcpu.get_rip()
    insn = vcpu.fetch_insn(rip)
    if not insn:
        return False
    rex = insn[0] if 0x40 <= insn[0] <= 0x4F else 0
    body = insn[1:] if rex else insn
    if len(body) < 2 or body[0] != 0x0F:
        return False
    g = vcpu.gpr
    if body[1] == _OPC_MOV_FROM_CR and len(body) >= 3:
        modrm = body[2]
        value = read_cr(vcpu, ((rex & 4) << 1) | ((modrm >> 3) & 7))
        if value is None:
            return False
        g[((rex & 1) << 3) | (modrm & 7)] = value
        length = 3
    elif body[1] == _OPC_RDMSR:
        value = read_msr(vcpu, g[RCX] & _U32)
        if value is None:
            return False
        g[RAX], g[RDX] = value & _U32, value >> 32
        length = 2
    elif body[1] == _OPC_WRMSR:
        value = ((g[RDX] & _U32) << 32) | (g[RAX] & _U32)
        if not write_msr(vcpu, g[RCX] & _U32, value):
            return False
        length = 2
    else:
        return False
    vcpu.set_rip(rip + length + (1 if rex else 0))
    return True


def emulate_forced_invalid_op(vcpu: Vcpu) -> bool:
    """emulate_forced_invalid_op for a #UD: at ``ud2; "xen"; cpuid`` carry on
    at the CPUID, which runs with Xen's view (the CPUID hook); False if the
    bytes are not the signature (the #UD stands)."""
    rip = vcpu.get_rip()
    insn = vcpu.fetch_insn(rip) or b""
    if not insn.startswith(FEP_SIGNATURE + OPC_CPUID):
        return False
    vcpu.set_rip(rip + len(FEP_SIGNATURE))
    return True


def hypervisor_leaf(vcpu: Vcpu, idx: int, subleaf: int) -> tuple[int, int, int, int]:
    """traps.c cpuid_hypervisor_leaves for a PV domain (base 0x40000000).
    Leaf 3 (time) is zeros: pvlab's TSC is not one Xen would describe."""
    if idx == 0:
        return (XEN_CPUID_FIRST_LEAF + XEN_CPUID_MAX_NUM_LEAVES, *XEN_CPUID_SIGNATURE)
    if idx == 1:
        return ((XEN_MAJOR << 16) | XEN_MINOR, 0, 0, 0)
    if idx == 2:
        # hypercall pages, MSR base, features
        return (1, XEN_CPUID_FIRST_LEAF, XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD, 0)
    if idx == 5 and subleaf == 0:
        # PV parameters: the machine address width, from the highest frame
        top = vcpu.machine.memory.nr_frames - 1
        return (0, top.bit_length() + 12, 0, 0)
    return (0, 0, 0, 0)


def cpuid(vcpu: Vcpu) -> bool:
    """The CPUID hook: Xen's hypervisor leaves (True: the instruction is done);
    other leaves run on the CPU (False)."""
    g = vcpu.gpr
    leaf = g[RAX] & _U32
    if leaf >> 8 != XEN_CPUID_FIRST_LEAF >> 8:
        return False
    idx = leaf - XEN_CPUID_FIRST_LEAF
    res = hypervisor_leaf(vcpu, idx, g[RCX] & _U32) if idx <= XEN_CPUID_MAX_NUM_LEAVES \
        else (0, 0, 0, 0)
    g[RAX], g[RBX], g[RCX], g[RDX] = res
    return True
