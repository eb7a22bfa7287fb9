"""The freezer (Linux's kernel/freezer.c and power/process.c, reduced): while
``freezing`` is set the scheduler picks no user task, so each one stops at
its next safe point (a preemption, a syscall's return, a sleep) and stays
stopped; the cpus running one are kicked with an IPI to get there soon.
Freezable kernel workers (here the one periodic work item, option worker=MS)
stop running while ``wq_frozen`` is set."""

from __future__ import annotations

from typing import Any

from guestos.kdata import kernel, percpu
from guestos.printk import printk

FREEZE_TIMEOUT_NS = 20_000_000_000  # Linux gives up freezing after 20 s


def freeze_processes_start(cpu: Any) -> None:
    from guestos.stop_machine import send_ipi
    k = kernel(cpu)
    k.freezing = 1
    for n in range(k.cpus_up):
        if n != cpu.vcpu_id and percpu(cpu, n).current:
            percpu(cpu, n).need_resched = 1
            send_ipi(cpu, n)


def running_elsewhere(cpu: Any) -> list[int]:
    """The pids still running on other cpus (not yet at a safe point)."""
    from guestos.task import task
    k = kernel(cpu)
    return [task(cpu, percpu(cpu, n).current - 1).pid for n in range(k.cpus_up)
            if n != cpu.vcpu_id and percpu(cpu, n).current]


def nr_tasks(cpu: Any) -> int:
    from guestos.kdata import MAX_TASKS
    from guestos.task import FREE, task
    return sum(1 for s in range(MAX_TASKS) if task(cpu, s).state != FREE)


def freeze_kernel_threads(cpu: Any) -> None:
    k = kernel(cpu)
    k.wq_frozen = 1
    printk(cpu, f"freezer: freezable workers frozen ({k.wq_runs} runs so far)")


def thaw_processes(cpu: Any) -> None:
    from guestos.stop_machine import send_ipi
    k = kernel(cpu)
    k.wq_frozen = 0
    k.freezing = 0
    printk(cpu, f"freezer: thaw_processes: {nr_tasks(cpu)} tasks thawed "
           f"(workers: {k.wq_runs} runs)")
    from guestos.task import wake_due
    wake_due(cpu)
    if k.vballoon:  # work queued while the workers were frozen runs now
        from guestos.drivers.virtio_balloon import run_work
        run_work(cpu)
    for n in range(k.cpus_up):
        if n != cpu.vcpu_id:
            send_ipi(cpu, n)  # each cpu wakes what came due, and looks for its tasks


def run_workqueue(cpu: Any, t_now: int) -> None:
    """From cpu0's timer tick: the freezable work items, when due (the
    balloon's, and the periodic one of option worker=MS)."""
    k = kernel(cpu)
    if k.wq_frozen:
        return
    if k.vballoon:
        from guestos.drivers.virtio_balloon import run_work
        run_work(cpu)
    if not k.wq_period_ms or t_now < k.wq_next:
        return
    k.wq_runs = k.wq_runs + 1
    k.wq_next = t_now + k.wq_period_ms * 1_000_000

