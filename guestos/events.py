"""Event channels, the guest side: the upcall handler scans the 2-level
pending bitmaps in shared_info and runs the handler of each pending port on
this cpu; the timer ticks through VIRQ_TIMER."""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from guestos.frame import read_bounce, return_from_bounce
from guestos.hypercall import with_args
from guestos.kdata import NR_PORTS, kernel, percpu, port_cpu_va
from hypervisor.public.event_channel import (
    EVTCHNOP_bind_ipi,
    EVTCHNOP_bind_virq,
    EVTCHNOP_send,
    EVTCHNOP_unmask,
)
from hypervisor.public.native import TailCall
from hypervisor.public.xen import VIRQ_TIMER, Hypercall, shared_info, vcpu_info, vcpu_time_info

TICK_NS = 10_000_000  # 100 Hz
VCPU_INFO_SIZE = ctypes.sizeof(vcpu_info)
PENDING_OFF = shared_info.evtchn_pending.offset
MASK_OFF = shared_info.evtchn_mask.offset
UPCALL_PENDING_OFF = vcpu_info.evtchn_upcall_pending.offset
UPCALL_MASK_OFF = vcpu_info.evtchn_upcall_mask.offset
PENDING_SEL_OFF = vcpu_info.evtchn_pending_sel.offset
SYSTEM_TIME_OFF = vcpu_info.time.offset + vcpu_time_info.system_time.offset


def vcpu_info_va(cpu: Any, n: int | None = None) -> int:
    n = cpu.vcpu_id if n is None else n
    return kernel(cpu).shared_info + VCPU_INFO_SIZE * n


def now(cpu: Any) -> int:
    return cpu.read_u64(vcpu_info_va(cpu) + SYSTEM_TIME_OFF)


def upcall_masked(cpu: Any, n: int | None = None) -> bool:
    return bool(cpu.read(vcpu_info_va(cpu, n) + UPCALL_MASK_OFF, 1)[0])


def set_upcall_mask(cpu: Any, masked: int) -> None:
    cpu.write(vcpu_info_va(cpu) + UPCALL_MASK_OFF, bytes([masked]))


def notify_remote_via_evtchn(cpu: Any, port: int) -> None:
    cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_send,
                  with_args(cpu, struct.pack("<I", port)))


def take_port(cpu: Any, port: int, n: int) -> None:
    """Cpu n handles the port's events from now on; then unmask it."""
    cpu.write(port_cpu_va(cpu) + port, bytes([n + 1]))
    cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_unmask,
                  with_args(cpu, struct.pack("<I", port)))


def mask_port(cpu: Any, port: int) -> None:
    """Mask one port (Linux's mask_evtchn): a pending event stays pending."""
    addr = kernel(cpu).shared_info + MASK_OFF + 8 * (port // 64)
    cpu.write_u64(addr, cpu.read_u64(addr) | 1 << (port % 64))


def mask_all(cpu: Any) -> None:
    """Mask every port (Linux's xen_evtchn_mask_all): Xen leaves masks to the
    guest, and a port is unmasked only once its handler is in place."""
    cpu.write(kernel(cpu).shared_info + MASK_OFF, b"\xff" * 512)


def cpu_ports(cpu: Any, w: int) -> int:
    """The bits of pending word w that are this cpu's ports (Linux's
    cpu_evtchn_mask): the pending bitmap is shared by every vcpu, and a
    handler must not take another cpu's events."""
    owners = cpu.read(port_cpu_va(cpu) + 64 * w, 64)
    me = cpu.vcpu_id + 1
    return sum(1 << b for b, owner in enumerate(owners) if owner == me)


def _bind_cpu_ports(cpu: Any, n: int) -> None:
    """Bind cpu n's timer VIRQ and IPI ports (EVTCHNOP_bind_virq and _ipi take
    the vcpu: cpu0 can bind them for every cpu, as a restore does)."""
    arg = with_args(cpu, struct.pack("<III", VIRQ_TIMER, n, 0))
    if cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_bind_virq, arg) == 0:
        port = struct.unpack("<I", cpu.read(arg + 8, 4))[0]
        percpu(cpu, n).timer_port = port
        take_port(cpu, port, n)
    # the IPI port: other cpus kick this one through it (stop_machine)
    arg = with_args(cpu, struct.pack("<II", n, 0))
    if cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_bind_ipi, arg) == 0:
        port = struct.unpack("<I", cpu.read(arg + 4, 4))[0]
        percpu(cpu, n).ipi_port = port
        take_port(cpu, port, n)


def init_cpu(cpu: Any) -> None:
    _bind_cpu_ports(cpu, cpu.vcpu_id)
    cpu.hypercall(Hypercall.set_timer_op, now(cpu) + TICK_NS)


def xen_irq_resume(cpu: Any) -> None:
    """In a new domain (Linux's xen_irq_resume, on cpu0): every port is gone
    and every mask set (the restorer masked them all). Forget the old ports,
    bind each cpu's timer VIRQ and IPI anew, and take the store's new port
    (start_info has it; the console's is only sent on)."""
    cpu.write(port_cpu_va(cpu), bytes(NR_PORTS))
    mask_all(cpu)
    k = kernel(cpu)
    for n in range(k.cpus_up):
        _bind_cpu_ports(cpu, n)
    take_port(cpu, k.store_port, 0)


def resume_timer(cpu: Any) -> None:
    """A new domain has no timers: each cpu sets its own again (Linux's
    clockevents resume)."""
    cpu.hypercall(Hypercall.set_timer_op, now(cpu) + TICK_NS)


def timer_tick(cpu: Any) -> None:
    from guestos.task import scheduler_tick
    pc = percpu(cpu)
    pc.ticks = pc.ticks + 1
    cpu.hypercall(Hypercall.set_timer_op, now(cpu) + TICK_NS)
    scheduler_tick(cpu)
    if cpu.vcpu_id != 0:
        return
    from guestos.freezer import run_workqueue
    t_now = now(cpu)
    run_workqueue(cpu, t_now)
    k = kernel(cpu)
    if k.stop_test_ms and t_now >= k.stop_test_ms * 1_000_000:
        from guestos.printk import printk
        from guestos.stop_machine import FN_CHECK, THEN_RESCHEDULE, stop_machine
        k.stop_test_ms = 0
        printk(cpu, "stop_machine: starting (option stopmachine=)")
        stop_machine(cpu, FN_CHECK, 0, THEN_RESCHEDULE)


def hypervisor_callback(cpu: Any) -> TailCall:
    """The event upcall (events are masked while it runs)."""
    sh = kernel(cpu).shared_info
    vi = vcpu_info_va(cpu)
    while cpu.read(vi + UPCALL_PENDING_OFF, 1)[0]:
        cpu.write(vi + UPCALL_PENDING_OFF, b"\0")
        sel = cpu.read_u64(vi + PENDING_SEL_OFF)
        cpu.write_u64(vi + PENDING_SEL_OFF, 0)
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
    stop = (user or idle) and stop_machine.wanted(cpu)
    if stop or ((user or idle) and manage.worker_wanted(cpu)):
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
    elif port == percpu(cpu).ipi_port:
        from guestos.task import wake_due
        wake_due(cpu)
    elif port == kernel(cpu).store_port:
        from guestos.xenbus import process_events
        process_events(cpu)
    elif kernel(cpu).vballoon:
        from guestos.drivers.virtio_balloon import balloon_interrupt
        balloon_interrupt(cpu, port)


def failsafe_callback(cpu: Any) -> TailCall:
    from guestos.printk import printk
    printk(cpu, "failsafe callback: a bad segment on return to the guest")
    return return_from_bounce(cpu)
