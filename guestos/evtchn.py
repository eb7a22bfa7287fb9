"""Event channels, the guest side (Linux's drivers/xen/events/events_base.c
and events_2l.c): the 2-level pending and mask bitmaps in shared_info, and
the irqs that event channels are bound to.

A driver binds a port to its handler with ``bind_evtchn_to_irqhandler`` (a
VIRQ with ``bind_virq_to_irqhandler``, an IPI with ``bind_ipi_to_irqhandler``)
and gets an irq. The irq table lives in kernel data: for each irq its kind,
its port, the cpu that handles it, the VIRQ it is, the handler (a symbol
number, guestos/symbols.py) and the handler's dev_id; a byte per port maps
the port to its irq (evtchn_to_irq). The upcall runs the handler of each
pending port that belongs to this cpu, whatever driver bound it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from guestos.hypercall import with_args
from guestos.kdata import AREAS, NR_PORTS, kernel
from guestos.layout import Layout, Ref
from guestos.symbols import NO_SYMBOL, symbol, symbol_number
from hypervisor.public.event_channel import (
    EVTCHNOP_bind_ipi,
    EVTCHNOP_bind_vcpu,
    EVTCHNOP_bind_virq,
    EVTCHNOP_send,
    EVTCHNOP_unmask,
    evtchn_bind_ipi,
    evtchn_bind_vcpu,
    evtchn_bind_virq,
    evtchn_send,
    evtchn_unmask,
)
from hypervisor.public.native import NativeCpu
from hypervisor.public.xen import Hypercall, shared_info, vcpu_info

VCPU_INFO_SIZE = ctypes.sizeof(vcpu_info)
PENDING_OFF = shared_info.evtchn_pending.offset
MASK_OFF = shared_info.evtchn_mask.offset
UPCALL_PENDING_OFF = vcpu_info.evtchn_upcall_pending.offset
UPCALL_MASK_OFF = vcpu_info.evtchn_upcall_mask.offset
PENDING_SEL_OFF = vcpu_info.evtchn_pending_sel.offset

# irq kinds (Linux's enum xen_irq_type); a free irq is IRQT_UNBOUND
IRQT_UNBOUND, IRQT_EVTCHN, IRQT_VIRQ, IRQT_IPI = range(4)
NR_IRQS = 32
NO_IRQ = 0xFF            # evtchn_to_irq of a port bound to no irq
NO_PORT = 0xFFFFFFFF     # the port of an irq not bound (yet) in this domain

IRQ_INFO = Layout("irq_info", [
    ("type", "u32"),      # IRQT_*
    ("evtchn", "u32"),    # its port, or NO_PORT
    ("cpu", "u32"),       # the cpu whose upcall runs the handler
    ("virq", "u32"),      # which VIRQ (IRQT_VIRQ)
    ("handler", "u32"),   # symbol number of handler(cpu, irq, dev_id)
    ("dev_id", "u64"),
    ("thread", "u32"),    # symbol number of the threaded half (NO_SYMBOL: none)
    ("thread_pending", "u32"),  # the hard half woke it; it has not run yet
])
assert NR_PORTS + NR_IRQS * IRQ_INFO.size <= AREAS["evtchn"].size

IrqHandler = Callable[[NativeCpu, int, int], object]  # True: wake the irq's thread


def _evtchn_to_irq_va(cpu: NativeCpu) -> int:
    return AREAS["evtchn"].va(cpu)


def irq_info(cpu: NativeCpu, irq: int) -> Ref:
    return IRQ_INFO.at(cpu, AREAS["evtchn"].va(cpu) + NR_PORTS + irq * IRQ_INFO.size)


def evtchn_to_irq(cpu: NativeCpu, port: int) -> int:
    return cpu.read(_evtchn_to_irq_va(cpu) + port, 1)[0]


def _set_evtchn_to_irq(cpu: NativeCpu, port: int, irq: int) -> None:
    cpu.write(_evtchn_to_irq_va(cpu) + port, bytes([irq]))


# --- vcpu_info and the bitmaps ----------------------------------------------------------

def vcpu_info_va(cpu: NativeCpu, n: int | None = None) -> int:
    n = cpu.vcpu_id if n is None else n
    return kernel(cpu).shared_info + VCPU_INFO_SIZE * n


def upcall_masked(cpu: NativeCpu, n: int | None = None) -> bool:
    return bool(cpu.read(vcpu_info_va(cpu, n) + UPCALL_MASK_OFF, 1)[0])


def set_upcall_mask(cpu: NativeCpu, masked: int) -> None:
    cpu.write(vcpu_info_va(cpu) + UPCALL_MASK_OFF, bytes([masked]))


def notify_remote_via_evtchn(cpu: NativeCpu, port: int) -> None:
    cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_send,
                  with_args(cpu, bytes(evtchn_send(port=port))))


def mask_evtchn(cpu: NativeCpu, port: int) -> None:
    """Mask one port: a pending event stays pending."""
    addr = kernel(cpu).shared_info + MASK_OFF + 8 * (port // 64)
    cpu.write_u64(addr, cpu.read_u64(addr) | 1 << (port % 64))


def unmask_evtchn(cpu: NativeCpu, port: int) -> None:
    """Through Xen, which raises the upcall if an event waited under the mask."""
    cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_unmask,
                  with_args(cpu, bytes(evtchn_unmask(port=port))))


def mask_all(cpu: NativeCpu) -> None:
    """Mask every port (Linux's xen_evtchn_mask_all): Xen leaves masks to the
    guest, and a port is unmasked only once its handler is in place."""
    cpu.write(kernel(cpu).shared_info + MASK_OFF, b"\xff" * 512)


# --- binding ------------------------------------------------------------------------------

def _alloc_irq(cpu: NativeCpu, kind: int, handler: IrqHandler, dev_id: int, n: int,
               thread: IrqHandler | None = None) -> int:
    for irq in range(NR_IRQS):
        info = irq_info(cpu, irq)
        if info.type == IRQT_UNBOUND:
            info.type, info.evtchn, info.cpu, info.virq = kind, NO_PORT, n, 0
            info.handler, info.dev_id = symbol_number(handler), dev_id
            info.thread = NO_SYMBOL if thread is None else symbol_number(thread)
            info.thread_pending = 0
            return irq
    raise RuntimeError("no free irq")


def rebind_evtchn_irq(cpu: NativeCpu, port: int, irq: int) -> None:
    """Give ``irq`` the port ``port`` (at binding, and in a new domain) and
    unmask the port: its handler is in place."""
    info = irq_info(cpu, irq)
    info.evtchn = port
    _set_evtchn_to_irq(cpu, port, irq)
    if info.type == IRQT_EVTCHN and info.cpu != 0:
        # Linux's xen_rebind_evtchn_to_cpu: Xen delivers a port to vcpu0 until told
        cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_bind_vcpu,
                      with_args(cpu, bytes(evtchn_bind_vcpu(port=port, vcpu=info.cpu))))
    unmask_evtchn(cpu, port)


def bind_evtchn_to_irqhandler(cpu: NativeCpu, port: int, handler: IrqHandler,
                              dev_id: int = 0, on_cpu: int = 0,
                              thread: IrqHandler | None = None) -> int:
    """Events on ``port`` run ``handler(cpu, irq, dev_id)`` on cpu ``on_cpu``;
    ``handler`` must be exported. With ``thread`` (Linux's
    request_threaded_irq), a hard handler that returns True wakes it: the
    cpu yields once on its way out of the upcall, so that other vcpus run
    while the irq is half handled, and then runs ``thread(cpu, irq, dev_id)``.
    Returns the irq."""
    irq = _alloc_irq(cpu, IRQT_EVTCHN, handler, dev_id, on_cpu, thread)
    rebind_evtchn_irq(cpu, port, irq)
    return irq


def _bind_virq(cpu: NativeCpu, virq: int, n: int) -> int:
    arg = with_args(cpu, bytes(evtchn_bind_virq(virq=virq, vcpu=n)))
    if cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_bind_virq, arg):
        return NO_PORT
    return evtchn_bind_virq.from_buffer_copy(cpu.read(arg, ctypes.sizeof(evtchn_bind_virq))).port


def _bind_ipi(cpu: NativeCpu, n: int) -> int:
    arg = with_args(cpu, bytes(evtchn_bind_ipi(vcpu=n)))
    if cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_bind_ipi, arg):
        return NO_PORT
    return evtchn_bind_ipi.from_buffer_copy(cpu.read(arg, ctypes.sizeof(evtchn_bind_ipi))).port


def bind_virq_to_irqhandler(cpu: NativeCpu, virq: int, n: int, handler: IrqHandler,
                            dev_id: int = 0) -> int:
    """VIRQ ``virq`` of cpu n (EVTCHNOP_bind_virq takes the vcpu: any cpu can
    bind it for cpu n, as a restore does on cpu0)."""
    irq = _alloc_irq(cpu, IRQT_VIRQ, handler, dev_id, n)
    irq_info(cpu, irq).virq = virq
    port = _bind_virq(cpu, virq, n)
    if port != NO_PORT:
        rebind_evtchn_irq(cpu, port, irq)
    return irq


def bind_ipi_to_irqhandler(cpu: NativeCpu, n: int, handler: IrqHandler) -> int:
    """Cpu n's IPI port: other cpus kick cpu n through it."""
    irq = _alloc_irq(cpu, IRQT_IPI, handler, 0, n)
    port = _bind_ipi(cpu, n)
    if port != NO_PORT:
        rebind_evtchn_irq(cpu, port, irq)
    return irq


def ipi_evtchn(cpu: NativeCpu, n: int) -> int:
    """The port of cpu n's IPI, or NO_PORT."""
    for irq in range(NR_IRQS):
        info = irq_info(cpu, irq)
        if info.type == IRQT_IPI and info.cpu == n:
            return info.evtchn
    return NO_PORT


def xen_irq_resume(cpu: NativeCpu) -> None:
    """In a new domain (Linux's xen_irq_resume, on cpu0): every port is gone
    and every mask set (the restorer masked them all). Forget the old ports,
    bind every VIRQ and IPI anew for its cpu; the drivers of the other irqs
    rebind theirs with rebind_evtchn_irq when they resume."""
    cpu.write(_evtchn_to_irq_va(cpu), bytes([NO_IRQ]) * NR_PORTS)
    mask_all(cpu)
    for irq in range(NR_IRQS):
        info = irq_info(cpu, irq)
        if info.type == IRQT_UNBOUND:
            continue
        info.evtchn = NO_PORT
        if info.type == IRQT_VIRQ:
            port = _bind_virq(cpu, info.virq, info.cpu)
        elif info.type == IRQT_IPI:
            port = _bind_ipi(cpu, info.cpu)
        else:
            continue
        if port != NO_PORT:
            rebind_evtchn_irq(cpu, port, irq)


def xen_init_IRQ(cpu: NativeCpu) -> None:
    """At boot, before any binding: no port has an irq, every port is masked."""
    cpu.write(_evtchn_to_irq_va(cpu), bytes([NO_IRQ]) * NR_PORTS)
    mask_all(cpu)


# --- the upcall ---------------------------------------------------------------------------

def _handle_irq(cpu: NativeCpu, irq: int) -> None:
    info = irq_info(cpu, irq)
    if info.handler != NO_SYMBOL:
        handler: IrqHandler = symbol(info.handler)  # type: ignore[assignment]
        if handler(cpu, irq, info.dev_id) is True and info.thread != NO_SYMBOL:
            info.thread_pending = 1


# --- threaded halves (Linux's kernel/irq/manage.c irq_thread) ----------------------------

def irq_threads_pending(cpu: NativeCpu) -> bool:
    """Whether a hard handler on this cpu woke its thread (the table read
    at once: every upcall asks)."""
    table = cpu.read(AREAS["evtchn"].va(cpu) + NR_PORTS, NR_IRQS * IRQ_INFO.size)
    cpu_off, cpu_s = IRQ_INFO.fields["cpu"]
    pend_off, pend_s = IRQ_INFO.fields["thread_pending"]
    return any(pend_s.unpack_from(table, base + pend_off)[0]
               and cpu_s.unpack_from(table, base + cpu_off)[0] == cpu.vcpu_id
               for base in range(0, len(table), IRQ_INFO.size))


def run_irq_thread(cpu: NativeCpu, irq: int) -> bool:
    """Run ``irq``'s thread now if it was woken (on whatever cpu calls this:
    synchronize_irq's flush); whether it ran."""
    info = irq_info(cpu, irq)
    if not info.thread_pending:
        return False
    info.thread_pending = 0
    thread: IrqHandler = symbol(info.thread)  # type: ignore[assignment]
    thread(cpu, irq, info.dev_id)
    return True


def run_irq_threads(cpu: NativeCpu) -> None:
    """The woken threads of this cpu's irqs, after the upcall's yield."""
    for irq in range(NR_IRQS):
        if irq_info(cpu, irq).cpu == cpu.vcpu_id:
            run_irq_thread(cpu, irq)


def _my_irqs(cpu: NativeCpu, w: int, bits: int) -> dict[int, int]:
    """Of the ports in ``bits`` of word w, those bound to an irq of this cpu
    (Linux's cpu_evtchn_mask): bit -> irq. The pending bitmap is shared by
    every vcpu, and a handler must not take another cpu's events."""
    irqs = cpu.read(_evtchn_to_irq_va(cpu) + 64 * w, 64)
    mine = {}
    while bits:
        b = (bits & -bits).bit_length() - 1
        bits &= bits - 1
        irq = irqs[b]
        if irq != NO_IRQ and irq_info(cpu, irq).cpu == cpu.vcpu_id:
            mine[b] = irq
    return mine


def xen_evtchn_do_upcall(cpu: NativeCpu) -> None:
    """Scan the pending words this vcpu was told of and run each of its
    pending, unmasked ports' handlers (events are masked while it runs)."""
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
            mine = _my_irqs(cpu, w, pending & ~mask)
            bits = sum(1 << b for b in mine)
            cpu.write_u64(sh + PENDING_OFF + 8 * w, pending & ~bits)
            for irq in mine.values():
                _handle_irq(cpu, irq)
