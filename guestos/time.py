"""Time (Linux's arch/x86/xen/time.c): the clock is vcpu_info's system time,
which Xen keeps; each cpu has a one-shot timer (set_timer_op) that the tick
sets again every time it fires.

A new domain has no one-shot timers, and a periodic one on each vcpu that
the kernel stops. The restore marks every cpu's tick lost
(``xen_timer_resume``, on cpu0), and each cpu sets its own timer again
before it next picks a task (``tick_resume_local``): set_timer_op acts on
the calling vcpu only."""

from __future__ import annotations

from guestos.evtchn import vcpu_info_va
from guestos.kdata import AREAS, MAX_CPUS, kernel, per_cpu
from guestos.layout import Layout, Ref
from hypervisor.public.native import NativeCpu
from hypervisor.public.vcpu import VCPUOP_stop_periodic_timer
from hypervisor.public.xen import Hypercall, vcpu_info, vcpu_time_info

TICK_NS = 10_000_000  # 100 Hz
NSEC_PER_MSEC = 1_000_000
SYSTEM_TIME_OFF = vcpu_info.time.offset + vcpu_time_info.system_time.offset

# each cpu's tick
TICK = Layout("tick", [
    ("ticks", "u64"),
    ("tick_lost", "u64"),      # a new domain has no timer: set it again
])
assert TICK.size <= AREAS["tick_percpu"].size // MAX_CPUS


def tick_cpu(cpu: NativeCpu, n: int | None = None) -> Ref:
    return per_cpu(cpu, "tick_percpu", TICK, n)


def now(cpu: NativeCpu) -> int:
    """Virtual ns since the domain started (xen_clocksource_read)."""
    return cpu.read_u64(vcpu_info_va(cpu) + SYSTEM_TIME_OFF)


def set_next_tick(cpu: NativeCpu) -> None:
    """This cpu's timer fires one tick from now."""
    cpu.hypercall(Hypercall.set_timer_op, now(cpu) + TICK_NS)


def stop_periodic_timer(cpu: NativeCpu, n: int) -> None:
    """Xen gives every vcpu a 10 ms periodic timer; this kernel ticks with
    the one-shot timer alone (VCPUOP_stop_periodic_timer, as Linux)."""
    cpu.hypercall(Hypercall.vcpu_op, VCPUOP_stop_periodic_timer, n, 0)


def xen_timer_resume(cpu: NativeCpu) -> None:
    """The new domain's vcpus start with Xen's periodic timer again: stop it
    (Linux's xen_timer_resume); each cpu's one-shot tick is lost."""
    for n in range(kernel(cpu).cpus_up):
        stop_periodic_timer(cpu, n)
        tick_cpu(cpu, n).tick_lost = 1


def tick_resume_local(cpu: NativeCpu) -> None:
    tc = tick_cpu(cpu)
    if tc.tick_lost:
        tc.tick_lost = 0
        set_next_tick(cpu)
