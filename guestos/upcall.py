"""The event upcall and its way out (Linux's xen_hypervisor_callback and the
return path of kernel/entry/common.c): run the handlers of the pending
events, then go back to what the event interrupted, unless something else
wants this cpu: a kernel context of its own (stop_machine's stopper, the
xenwatch worker), or the scheduler (a user task whose time is up, or the
idle loop with a task now runnable)."""

from __future__ import annotations

from guestos import manage, stop_machine
from guestos.evtchn import irq_threads_pending, run_irq_threads, xen_evtchn_do_upcall
from guestos.frame import read_bounce, return_from_bounce
from guestos.idle import cpu_idle
from guestos.printk import printk
from guestos.task import (
    NO_TASK,
    RUNNABLE,
    cpu_rq,
    current,
    pick_next,
    preempt_current,
    save_user_context,
    schedule,
)
from guestos.time import now
from guestos.workqueue import cpu_work_pending, run_cpu_work
from hypervisor.public.native import NativeCpu, TailCall
from hypervisor.public.sched import SCHEDOP_yield
from hypervisor.public.xen import Hypercall


def hypervisor_callback(cpu: NativeCpu) -> TailCall:
    """The event upcall (a native entry; events are masked while it runs).
    A hard handler that woke its irq's thread leaves it for after a yield:
    other vcpus run meanwhile, as other CPUs do while a Linux irq thread
    waits to be scheduled. So does work this cpu queued on system_wq (its
    kworker; guestos/workqueue.py)."""
    xen_evtchn_do_upcall(cpu)
    if irq_threads_pending(cpu) or cpu_work_pending(cpu):
        # the yield's hypercall takes rax, rdi and rsi: keep the interrupted
        # context's below the bounce frame
        rsp = cpu.reg("rsp") - 8 * len(_YIELD_CLOBBERS)
        cpu.write(rsp, b"".join(cpu.reg(r).to_bytes(8, "little") for r in _YIELD_CLOBBERS))
        cpu.set_regs(rsp=rsp)
        return TailCall(Hypercall.sched_op, (SCHEDOP_yield, 0), irq_thread_resume)
    return irqentry_exit(cpu)


_YIELD_CLOBBERS = ("rax", "rdi", "rsi")


def irq_thread_resume(cpu: NativeCpu) -> TailCall:
    """The upcall's yield returned (a native entry): run this cpu's kworker,
    then the woken threads (work they queue waits for the next upcall), then
    leave the upcall as usual, the interrupted context's registers back."""
    run_cpu_work(cpu, now(cpu))
    run_irq_threads(cpu)
    rsp = cpu.reg("rsp")
    saved = cpu.read(rsp, 8 * len(_YIELD_CLOBBERS))
    cpu.set_regs(rsp=rsp + len(saved), **{r: int.from_bytes(saved[8 * i:8 * i + 8], "little")
                                           for i, r in enumerate(_YIELD_CLOBBERS)})
    return irqentry_exit(cpu)


def irqentry_exit(cpu: NativeCpu) -> TailCall:
    frame = read_bounce(cpu)
    rip, cs = frame[2], frame[3]
    user = cs & 3 == 3  # Xen clears the RPL of a kernel-mode frame
    idle = rip == cpu.native_addr(cpu_idle)
    stop = (user or idle) and stop_machine.wanted(cpu)
    if stop or ((user or idle) and manage.worker_wanted(cpu)):
        # a kernel context of its own takes this cpu: keep the task it interrupted
        t = current(cpu)
        if user and t is not None:
            save_user_context(cpu, t, frame)
            t.state = RUNNABLE
            cpu_rq(cpu).current = NO_TASK
        return stop_machine.enter(cpu) if stop else manage.xenwatch(cpu)
    if user:
        if cpu_rq(cpu).need_resched and current(cpu) is not None:
            return preempt_current(cpu, frame)
    elif idle and pick_next(cpu) is not None:
        return schedule(cpu)
    return return_from_bounce(cpu)


def failsafe_callback(cpu: NativeCpu) -> TailCall:
    printk(cpu, "failsafe callback: a bad segment on return to the guest")
    return return_from_bounce(cpu)
