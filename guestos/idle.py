"""The idle loop (Linux's kernel/sched/idle.c): nothing to run, so block
until an event; the upcall's way out schedules a task that became runnable."""

from __future__ import annotations

from guestos.kdata import percpu
from hypervisor.public.native import NativeCpu, TailCall
from hypervisor.public.sched import SCHEDOP_block
from hypervisor.public.xen import Hypercall


def cpu_idle(cpu: NativeCpu) -> TailCall:
    """Block until an event, and come back here (a native entry)."""
    cpu.set_regs(rsp=percpu(cpu).stack_top)
    return TailCall(Hypercall.sched_op, (SCHEDOP_block, 0), cpu_idle)
