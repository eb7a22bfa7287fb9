"""Event channels, the guest side: the upcall handler scans the 2-level
pending bitmaps in shared_info and runs the handler of each pending port on
this cpu; the timer ticks through VIRQ_TIMER."""

from __future__ import annotations

import struct
from typing import Any

from guestos.frame import read_bounce, return_from_bounce
from guestos.hypercall import with_args
from guestos.kdata import kernel, percpu, port_cpu_va
from hypervisor.public.event_channel import EVTCHNOP_bind_ipi, EVTCHNOP_bind_virq, EVTCHNOP_unmask
from hypervisor.public.native import TailCall
from hypervisor.public.xen import VIRQ_TIMER, Hypercall

TICK_NS = 10_000_000  # 100 Hz
VCPU_INFO_SIZE = 64
PENDING_OFF, MASK_OFF = 2048, 2560


def now(cpu: Any) -> int:
    vi = kernel(cpu).shared_info + VCPU_INFO_SIZE * cpu.vcpu_id
    return cpu.read_u64(vi + 48)  # vcpu_time_info.system_time


def mask_all(cpu: Any) -> None:
    """Mask every port (Linux's xen_evtchn_mask_all): Xen leaves masks to the
    guest, and a port is unmasked only once its handler is in place."""
    cpu.write(kernel(cpu).shared_info + MASK_OFF, b"\xff" * 512)


def bind_port_to_cpu(cpu: Any, port: int, n: int) -> None:
    cpu.write(port_cpu_va(cpu) + port, bytes([n + 1]))


def cpu_ports(cpu: Any, w: int) -> int:
    """The bits of pending word w that are this cpu's ports (Linux's
    cpu_evtchn_mask): the pending bitmap is shared by every vcpu, and a
    handler must not take another cpu's events."""
    owners = cpu.read(port_cpu_va(cpu) + 64 * w, 64)
    me = cpu.vcpu_id + 1
    return sum(1 << b for b, owner in enumerate(owners) if owner == me)


def init_cpu(cpu: Any) -> None:
    arg = with_args(cpu, struct.pack("<III", VIRQ_TIMER, cpu.vcpu_id, 0))
    if cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_bind_virq, arg) == 0:
        port = struct.unpack("<I", cpu.read(arg + 8, 4))[0]
        percpu(cpu).timer_port = port
        bind_port_to_cpu(cpu, port, cpu.vcpu_id)
        cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_unmask,
                      with_args(cpu, struct.pack("<I", port)))
    # the IPI port: other cpus kick this one through it (stop_machine)
    arg = with_args(cpu, struct.pack("<II", cpu.vcpu_id, 0))
    if cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_bind_ipi, arg) == 0:
        port = struct.unpack("<I", cpu.read(arg + 4, 4))[0]
        percpu(cpu).ipi_port = port
        bind_port_to_cpu(cpu, port, cpu.vcpu_id)
        cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_unmask,
                      with_args(cpu, struct.pack("<I", port)))
    cpu.hypercall(Hypercall.set_timer_op, now(cpu) + TICK_NS)


def timer_tick(cpu: Any) -> None:
    from guestos.task import scheduler_tick
    pc = percpu(cpu)
    pc.ticks = pc.ticks + 1
    cpu.hypercall(Hypercall.set_timer_op, now(cpu) + TICK_NS)
    scheduler_tick(cpu)
    k = kernel(cpu)
    if cpu.vcpu_id == 0:
        from guestos.freezer import run_workqueue
        run_workqueue(cpu, now(cpu))
    if cpu.vcpu_id == 0 and k.stop_test_ms and now(cpu) >= k.stop_test_ms * 1_000_000:
        from guestos.printk import printk
        from guestos.stop_machine import FN_CHECK, THEN_RESCHEDULE, stop_machine
        k.stop_test_ms = 0
        printk(cpu, "stop_machine: starting (option stopmachine=)")
        stop_machine(cpu, FN_CHECK, 0, THEN_RESCHEDULE)


def hypervisor_callback(cpu: Any) -> TailCall:
    """The event upcall (events are masked while it runs)."""
    sh = kernel(cpu).shared_info
    vi = sh + VCPU_INFO_SIZE * cpu.vcpu_id
    while cpu.read(vi, 1)[0]:
        cpu.write(vi, b"\0")  # evtchn_upcall_pending = 0
        sel = cpu.read_u64(vi + 8)
        cpu.write_u64(vi + 8, 0)
        while sel:
            w = (sel & -sel).bit_length() - 1
            sel &= sel - 1
            pending = cpu.read_u64(sh + PENDING_OFF + 8 * w)
            mask = cpu.read_u64(sh + MASK_OFF + 8 * w)
            bits = pending & ~mask & cpu_ports(cpu, w)
            cpu.write_u64(sh + PENDING_OFF + 8 * w, pending & ~bits)
            while bits:
                b = (bits & -bits).bit_length() - 1
                bits &= bits - 1
                handle_port(cpu, 64 * w + b)
    return _return_or_switch(cpu)


def _return_or_switch(cpu: Any) -> TailCall:
    """Back to what the event interrupted, unless the scheduler wants this cpu:
    a user task whose time is up, or the idle loop with a task now runnable."""
    from guestos import manage, stop_machine
    from guestos.boot import cpu_idle
    from guestos.task import (
        RUNNABLE,
        current,
        pick_next,
        preempt_current,
        save_user_context,
        schedule,
    )
    frame = read_bounce(cpu)
    rip, cs = frame[2], frame[3]
    user = cs & 3 == 3  # Xen clears the RPL of a kernel-mode frame
    idle = rip == cpu.native_addr(cpu_idle)
    stop, work = stop_machine.wanted(cpu), manage.worker_wanted(cpu)
    if (stop or work) and (user or idle):
        # a kernel context of its own takes this cpu: keep the task it interrupted
        t = current(cpu)
        if user and t is not None:
            save_user_context(cpu, t, frame)
            t.state = RUNNABLE
            percpu(cpu).current = 0
        return stop_machine.enter(cpu) if stop else manage.xenwatch(cpu)
    if user:
        if percpu(cpu).need_resched and current(cpu) is not None:
            return preempt_current(cpu, frame)
    elif idle and pick_next(cpu) is not None:
        return schedule(cpu)
    return return_from_bounce(cpu)


def handle_port(cpu: Any, port: int) -> None:
    if port == percpu(cpu).timer_port:
        timer_tick(cpu)
    elif port == kernel(cpu).store_port and not kernel(cpu).xs_suspended:
        from guestos.xenbus import process_events
        process_events(cpu)


def failsafe_callback(cpu: Any) -> TailCall:
    from guestos.printk import printk
    printk(cpu, "failsafe callback: a bad segment on return to the guest")
    return return_from_bounce(cpu)
