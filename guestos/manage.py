"""Shutdown requests from the toolstack and the suspend path (Linux's
drivers/xen/manage.c).

The kernel watches ``control/shutdown`` in its xenstore home. The watch
handler reads the value in a transaction and, for a command it can carry out
(poweroff, halt, reboot, and suspend if save/restore is built in), writes ""
back as its acknowledgement; anything else is ignored with a log line. The
request is then carried out by the xenwatch worker on cpu0, a kernel context
of its own that can wait (every wait in the kernel is a yield with a
continuation, so a waiting cpu can be saved like any other):

    do_suspend: freeze_processes, freezable workers, dpm_suspend_start(FREEZE),
        xs_suspend, dpm_suspend_noirq(FREEZE), stop_machine(xen_suspend, cpu0),
        dpm_resume_noirq(THAW or RESTORE), xs_suspend_cancel or xs_resume,
        dpm_resume_end(THAW or RESTORE), thaw_processes

Every step is logged with the cpu it ran on.
"""

from __future__ import annotations

from guestos import freezer, pm, xenbus
from guestos.hypercall import shutdown_args
from guestos.idle import cpu_idle
from guestos.kdata import AREAS, percpu
from guestos.layout import Layout, Ref
from guestos.printk import printk
from guestos.stop_machine import cpu_stopper, enter, stop_machine
from guestos.suspend import suspend_state, xen_suspend
from guestos.symbols import export
from guestos.task import schedule
from guestos.time import now
from hypervisor.public.native import NativeCpu, TailCall
from hypervisor.public.sched import (
    SCHEDOP_yield,
    SHUTDOWN_poweroff,
    SHUTDOWN_reboot,
    SHUTDOWN_suspend,
)
from hypervisor.public.xen import Hypercall

NO_SHUTDOWN = 0xFFFFFFFFFFFFFFFF  # no request in shutting_down / shutdown_request

MANAGE = Layout("manage", [
    ("save_restore", "u64"),     # CONFIG_XEN_SAVE_RESTORE: 1 unless option nosaverestore
    ("shutting_down", "u64"),    # SHUTDOWN_* while a request is handled
    ("shutdown_request", "u64"), # SHUTDOWN_* for the xenwatch worker
    ("suspend_deadline", "u64"), # freezing gives up after this (virtual ns)
    ("in_worker", "u64"),        # 1 while cpu0 runs the xenwatch worker
])
assert MANAGE.size <= AREAS["manage"].size


def xen_manage(cpu: NativeCpu) -> Ref:
    return MANAGE.at(cpu, AREAS["manage"].va(cpu))
COMMANDS = {"poweroff": SHUTDOWN_poweroff, "halt": SHUTDOWN_poweroff,
            "reboot": SHUTDOWN_reboot, "suspend": SHUTDOWN_suspend}


def xenbus_init(cpu: NativeCpu) -> None:
    """At boot on cpu0: the store's port is cpu0's; watch control/shutdown and
    say which commands this kernel carries out."""
    k = xen_manage(cpu)
    k.shutting_down = k.shutdown_request = NO_SHUTDOWN
    xenbus.xs_init(cpu)
    for feature in ("poweroff", "reboot") + (("suspend",) if k.save_restore else ()):
        xenbus.write(cpu, f"control/feature-{feature}", "1")
    xenbus.register_xenbus_watch(cpu, "control/shutdown", shutdown_handler)
    printk(cpu, "xenbus: connected; watching control/shutdown"
           + ("" if k.save_restore else " (built without save/restore support)"))


@export
def shutdown_handler(cpu: NativeCpu, path: str) -> None:
    """The watch on control/shutdown (runs on cpu0, events masked)."""
    k = xen_manage(cpu)
    if k.shutting_down != NO_SHUTDOWN:
        return  # one request at a time
    known = dict(COMMANDS)
    if not k.save_restore:
        del known["suspend"]  # CONFIG_XEN_SAVE_RESTORE=n: no handler for it
    for _ in range(16):
        tx = xenbus.transaction_start(cpu)
        try:
            value = xenbus.read(cpu, "control/shutdown", tx)
        except xenbus.XenbusError:
            xenbus.transaction_end(cpu, tx, abort=True)
            return
        if value in known:
            xenbus.write(cpu, "control/shutdown", "", tx)  # the acknowledgement
        try:
            xenbus.transaction_end(cpu, tx)
        except xenbus.XenbusError as e:
            if e.errno == "EAGAIN":
                continue
            raise
        break
    else:
        printk(cpu, "shutdown request: the store keeps failing the transaction")
        return
    if value in known:
        printk(cpu, f"shutdown request: {value}")
        k.shutting_down = k.shutdown_request = known[value]
    elif value == "suspend":
        printk(cpu, "Ignoring shutdown request: suspend: this kernel is built without "
               "save/restore support (option nosaverestore: CONFIG_XEN_SAVE_RESTORE=n)")
    elif value:
        printk(cpu, f"Ignoring shutdown request: {value}")


# --- the xenwatch worker on cpu0 ----------------------------------------------------

def worker_wanted(cpu: NativeCpu) -> bool:
    return cpu.vcpu_id == 0 and xen_manage(cpu).shutdown_request != NO_SHUTDOWN \
        and not xen_manage(cpu).in_worker and not cpu_stopper(cpu).in_stopper


def xenwatch(cpu: NativeCpu) -> TailCall:
    """Carry out the request (this cpu's task, if any, has been saved)."""
    k = xen_manage(cpu)
    k.in_worker = 1
    cpu.set_regs(rsp=percpu(cpu).stack_top)
    req = k.shutdown_request
    k.shutdown_request = NO_SHUTDOWN
    if req == SHUTDOWN_suspend:
        return do_suspend(cpu)
    printk(cpu, f"shutting down: {'reboot' if req == SHUTDOWN_reboot else 'poweroff'}")
    return TailCall(Hypercall.sched_op, shutdown_args(cpu, req), cpu_idle)


def _worker_done(cpu: NativeCpu) -> TailCall:
    k = xen_manage(cpu)
    k.shutting_down = NO_SHUTDOWN
    k.in_worker = 0
    if k.shutdown_request == NO_SHUTDOWN:
        xenbus.process_events(cpu)  # what came in while the store was suspended
    return schedule(cpu)


def do_suspend(cpu: NativeCpu) -> TailCall:
    k = xen_manage(cpu)
    printk(cpu, "suspend: freeze_processes")
    freezer.freeze_processes_start(cpu)
    k.suspend_deadline = now(cpu) + freezer.FREEZE_TIMEOUT_NS
    return suspend_freeze_wait(cpu)


def suspend_freeze_wait(cpu: NativeCpu) -> TailCall:
    """Wait for the tasks on the other cpus to reach a safe point (a native
    entry: the continuation of the yield)."""
    k = xen_manage(cpu)
    busy = freezer.running_elsewhere(cpu)
    if busy:
        if now(cpu) < k.suspend_deadline:
            return TailCall(Hypercall.sched_op, (SCHEDOP_yield, 0), suspend_freeze_wait)
        printk(cpu, f"suspend: freezing of tasks failed: {busy} refuse to freeze; aborted")
        freezer.thaw_processes(cpu)
        return _worker_done(cpu)
    printk(cpu, f"freezer: {freezer.nr_tasks(cpu)} tasks frozen")
    freezer.freeze_kernel_threads(cpu)
    return suspend_devices(cpu)


def suspend_devices(cpu: NativeCpu) -> TailCall:
    """do_suspend once the tasks and freezable workers are frozen: the
    devices' FREEZE phases and the store's suspend, then xen_suspend on cpu0
    under stop_machine, suspend_resume after it. A step that fails undoes the
    steps before it, latest first, thaws the tasks and ends the request: the
    suspend is aborted and the guest goes on."""
    if pm.dpm_suspend_start(cpu):
        printk(cpu, "suspend: dpm_suspend_start failed; aborted")
        freezer.thaw_processes(cpu)
        return _worker_done(cpu)
    _xs_suspend(cpu)
    if pm.dpm_suspend_noirq(cpu):
        # Linux goes the RESTORE way here (si.cancelled = 0, then xs_resume):
        # the domain never left, so pvlab THAWs, which is what happened
        printk(cpu, "suspend: dpm_suspend_noirq failed; aborted")
        _xs_suspend_cancel(cpu)
        pm.dpm_resume_end(cpu, pm.PMSG_THAW)
        freezer.thaw_processes(cpu)
        return _worker_done(cpu)
    printk(cpu, "suspend: stop_machine(xen_suspend) on cpu0")
    if stop_machine(cpu, xen_suspend, suspend_resume):
        printk(cpu, "suspend: stop_machine is busy; aborted")
        _xs_suspend_cancel(cpu)
        pm.dpm_resume_end(cpu, pm.PMSG_THAW)
        freezer.thaw_processes(cpu)
        return _worker_done(cpu)
    return enter(cpu)


def _xs_suspend(cpu: NativeCpu) -> None:
    """Linux's xs_suspend: watch events wait in the ring until the resume."""
    xenbus.xs(cpu).suspended = 1
    printk(cpu, "xenbus: xs_suspend")


def _xs_suspend_cancel(cpu: NativeCpu) -> None:
    xenbus.xs(cpu).suspended = 0
    printk(cpu, "xenbus: xs_suspend_cancel")


def _xs_resume(cpu: NativeCpu) -> None:
    """In a new domain: a fresh ring, and the store knows none of our watches."""
    xenbus.xb_init_comms(cpu)
    xenbus.xs(cpu).suspended = 0
    n = xenbus.reregister_watches(cpu)
    printk(cpu, f"xenbus: xs_resume: ring reconnected, {n} watches registered again")


@export
def suspend_resume(cpu: NativeCpu) -> TailCall:
    """After stop_machine, on cpu0: the way back, THAW or RESTORE."""
    cancelled = suspend_state(cpu).cancelled
    msg = pm.PMSG_THAW if cancelled else pm.PMSG_RESTORE
    pm.dpm_resume_noirq(cpu, msg)
    if cancelled:
        _xs_suspend_cancel(cpu)
    else:
        _xs_resume(cpu)
    pm.dpm_resume_end(cpu, msg)
    freezer.thaw_processes(cpu)
    printk(cpu, "suspend: done")
    return _worker_done(cpu)
