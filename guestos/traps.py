"""Exceptions from user programs: the task is killed with a message and the
kernel goes on; a fault in the kernel itself is a panic."""

from __future__ import annotations

from guestos.evtchn import vcpu_info_va
from guestos.frame import read_bounce
from guestos.mm import KernelPanic
from guestos.printk import printk
from guestos.task import current, exit_current
from hypervisor.public.arch_x86 import trap_info
from hypervisor.public.native import NativeCpu, TailCall
from hypervisor.public.xen import arch_vcpu_info, vcpu_info

CR2_OFF = vcpu_info.arch.offset + arch_vcpu_info.cr2.offset

# trap_info flags: DPL 0 for faults, bit 2 masks events on entry
TI_MASK_EVENTS = 4


def page_fault(cpu: NativeCpu) -> TailCall:
    cr2 = cpu.read_u64(vcpu_info_va(cpu) + CR2_OFF)
    return _kill(cpu, f"page fault at {cr2:#x}", error_code=True)


def general_protection(cpu: NativeCpu) -> TailCall:
    return _kill(cpu, "general protection fault", error_code=True)


def invalid_op(cpu: NativeCpu) -> TailCall:
    return _kill(cpu, "invalid opcode", error_code=False)


def breakpoint(cpu: NativeCpu) -> TailCall:
    return _kill(cpu, "breakpoint", error_code=False)


def divide_error(cpu: NativeCpu) -> TailCall:
    return _kill(cpu, "divide error", error_code=False)


def _kill(cpu: NativeCpu, what: str, error_code: bool) -> TailCall:
    rip = read_bounce(cpu, error_code)[2]
    t = current(cpu)
    if t is None:
        raise KernelPanic(f"{what} in the kernel at rip {rip:#x}")
    printk(cpu, f"killed task {t.pid}: {what} at rip {rip:#x}")
    return exit_current(cpu, 139)


HANDLERS = ((0, divide_error), (3, breakpoint), (6, invalid_op), (13, general_protection),
            (14, page_fault))


def trap_table(cpu: NativeCpu) -> bytes:
    """The set_trap_table argument: trap_info entries ended by a zero address."""
    out = b"".join(bytes(trap_info(vector=vec, flags=3 if vec == 3 else TI_MASK_EVENTS,
                                   address=cpu.native_addr(fn))) for vec, fn in HANDLERS)
    return out + bytes(trap_info())
