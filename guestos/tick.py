"""The timer tick (Linux's xen_timer_interrupt and tick_handle_periodic):
VIRQ_TIMER of each cpu, 100 times a second, sets the next one and drives the
scheduler; on cpu0 it also runs the freezable workqueue."""

from __future__ import annotations

from guestos.evtchn import bind_virq_to_irqhandler
from guestos.printk import printk
from guestos.stop_machine import check_the_others_spin, reschedule, stop_machine, stopper
from guestos.symbols import export
from guestos.task import scheduler_tick
from guestos.time import NSEC_PER_MSEC, now, set_next_tick, stop_periodic_timer, tick_cpu
from guestos.workqueue import run_workqueue
from hypervisor.public.native import NativeCpu
from hypervisor.public.xen import VIRQ_TIMER


@export
def xen_timer_interrupt(cpu: NativeCpu, irq: int, dev_id: int) -> None:
    tc = tick_cpu(cpu)
    tc.ticks = tc.ticks + 1
    set_next_tick(cpu)
    scheduler_tick(cpu)
    if cpu.vcpu_id != 0:
        return
    t_now = now(cpu)
    run_workqueue(cpu, t_now)
    sm = stopper(cpu)
    if sm.test_at_ms and t_now >= sm.test_at_ms * NSEC_PER_MSEC:
        sm.test_at_ms = 0
        printk(cpu, "stop_machine: starting (option stopmachine=)")
        stop_machine(cpu, check_the_others_spin, reschedule)


def xen_setup_timer(cpu: NativeCpu, n: int) -> None:
    """Cpu n's VIRQ_TIMER (any cpu may bind it for cpu n). The tick is the
    one-shot timer alone: the periodic one Xen starts each vcpu with is
    stopped first (Linux's xen_vcpuop_set_oneshot)."""
    stop_periodic_timer(cpu, n)
    bind_virq_to_irqhandler(cpu, VIRQ_TIMER, n, xen_timer_interrupt)
