"""Inter-processor interrupts (Linux's arch/x86/xen/smp.c): each cpu has an
IPI port; a kick wakes what came due on that cpu, and on its way out of the
upcall the cpu looks for whatever else wants it (stop_machine, its tasks)."""

from __future__ import annotations

from guestos.evtchn import NO_PORT, bind_ipi_to_irqhandler, ipi_evtchn, notify_remote_via_evtchn
from guestos.symbols import export
from guestos.task import wake_due
from hypervisor.public.native import NativeCpu


@export
def xen_ipi_interrupt(cpu: NativeCpu, irq: int, dev_id: int) -> None:
    wake_due(cpu)


def xen_smp_intr_init(cpu: NativeCpu, n: int) -> None:
    bind_ipi_to_irqhandler(cpu, n, xen_ipi_interrupt)


def xen_send_IPI_one(cpu: NativeCpu, n: int) -> None:
    port = ipi_evtchn(cpu, n)
    if port != NO_PORT:
        notify_remote_via_evtchn(cpu, port)
