"""The freezer (Linux's kernel/freezer.c and power/process.c, reduced): while
``freezing`` is set the scheduler picks no user task, so each one stops at
its next safe point (a preemption, a syscall's return, a sleep) and stays
stopped; the cpus running one are kicked with an IPI to get there soon.
Freezable workers (guestos/workqueue.py) stop running while the workqueue
is frozen; the thaw runs the work queued meanwhile.

Option worker=MS adds a periodic freezable work item that only counts its
runs: a test sees whether frozen workers stay put."""

from __future__ import annotations

from guestos.kdata import AREAS, MAX_TASKS, kernel
from guestos.layout import Layout, Ref
from guestos.printk import printk
from guestos.smp import xen_send_IPI_one
from guestos.symbols import export
from guestos.task import FREE, NO_TASK, ZOMBIE, cpu_rq, sched, task, wake_due
from guestos.time import NSEC_PER_MSEC, now
from guestos.workqueue import freeze_workqueues, queue_work, run_workqueue, thaw_workqueues
from hypervisor.public.native import NativeCpu

FREEZE_TIMEOUT_NS = 20_000_000_000  # Linux gives up freezing after 20 s


def freeze_processes_start(cpu: NativeCpu) -> None:
    k = kernel(cpu)
    sched(cpu).freezing = 1
    for n in range(k.cpus_up):
        if n != cpu.vcpu_id and cpu_rq(cpu, n).current != NO_TASK:
            cpu_rq(cpu, n).need_resched = 1
            xen_send_IPI_one(cpu, n)


def running_elsewhere(cpu: NativeCpu) -> list[int]:
    """The pids still running on other cpus (not yet at a safe point)."""
    k = kernel(cpu)
    return [task(cpu, cpu_rq(cpu, n).current).pid for n in range(k.cpus_up)
            if n != cpu.vcpu_id and cpu_rq(cpu, n).current != NO_TASK]


def nr_tasks(cpu: NativeCpu) -> int:
    return sum(1 for s in range(MAX_TASKS) if task(cpu, s).state not in (FREE, ZOMBIE))


def freeze_kernel_threads(cpu: NativeCpu) -> None:
    freeze_workqueues(cpu)
    printk(cpu, f"freezer: freezable workers frozen ({periodic(cpu).runs} runs so far)")


def thaw_processes(cpu: NativeCpu) -> None:
    k = kernel(cpu)
    thaw_workqueues(cpu)
    sched(cpu).freezing = 0
    printk(cpu, f"freezer: thaw_processes: {nr_tasks(cpu)} tasks thawed "
           f"(workers: {periodic(cpu).runs} runs)")
    wake_due(cpu)
    run_workqueue(cpu, now(cpu))  # work queued while the workers were frozen
    for n in range(k.cpus_up):
        if n != cpu.vcpu_id:
            xen_send_IPI_one(cpu, n)  # each cpu wakes what came due, and looks for its tasks


# the periodic work item of option worker=MS
PERIODIC = Layout("periodic_work", [
    ("runs", "u64"),
    ("period_ms", "u64"),
    ("next", "u64"),           # when it runs next (virtual ns)
])
assert PERIODIC.size <= AREAS["freezer"].size


def periodic(cpu: NativeCpu) -> Ref:
    return PERIODIC.at(cpu, AREAS["freezer"].va(cpu))


def start_periodic_work(cpu: NativeCpu, period_ms: int) -> None:
    """Option worker=MS, at boot."""
    p = periodic(cpu)
    p.period_ms = period_ms
    p.next = period_ms * NSEC_PER_MSEC
    if period_ms:
        queue_work(cpu, periodic_work)


@export
def periodic_work(cpu: NativeCpu, t_now: int) -> None:
    p = periodic(cpu)
    queue_work(cpu, periodic_work)  # it runs on every tick, counting when due
    if t_now < p.next:
        return
    p.runs = p.runs + 1
    p.next = t_now + p.period_ms * NSEC_PER_MSEC
