"""Thin hypercall wrappers, named as in Linux's asm/xen/hypercall.h."""

from __future__ import annotations

from guestos.kdata import AREAS, MAX_CPUS
from hypervisor.public.native import NativeCpu
from hypervisor.public.sched import SCHEDOP_shutdown, sched_shutdown
from hypervisor.public.xen import DOMID_SELF, CONSOLEIO_write, Hypercall, mmuext_op

SCRATCH_SIZE = AREAS["scratch"].size // MAX_CPUS


def scratch_va(cpu: NativeCpu) -> int:
    """This cpu's buffer for hypercall arguments, in kernel data."""
    return AREAS["scratch"].va(cpu) + cpu.vcpu_id * SCRATCH_SIZE


def console_write(cpu: NativeCpu, buf_va: int, size: int) -> int:
    return cpu.hypercall(Hypercall.console_io, CONSOLEIO_write, size, buf_va)


def with_args(cpu: NativeCpu, data: bytes) -> int:
    """Put an argument struct where the hypervisor can read it: this cpu's
    scratch buffer."""
    va = scratch_va(cpu)
    cpu.write(va, data)
    return va


def shutdown_args(cpu: NativeCpu, reason: int) -> tuple[int, int]:
    return SCHEDOP_shutdown, with_args(cpu, bytes(sched_shutdown(reason=reason)))


def mmuext(cpu: NativeCpu, cmd: int, mfn: int) -> int:
    """One mmuext_op on a frame (pin, unpin, new user baseptr)."""
    op = mmuext_op(cmd=cmd)
    op.arg1.mfn = mfn
    return cpu.hypercall(Hypercall.mmuext_op, with_args(cpu, bytes(op)), 1, 0, DOMID_SELF)
