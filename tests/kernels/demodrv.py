"""The guest kernel with one more driver, written as any new driver is: in
a file of its own that registers its irq handler, its PM callbacks and a
xenbus watch through the kernel's registration calls, and edits no file of
the kernel (events, PM, freezer, suspend, stop_machine).

The driver allocates an event channel for dom0 to signal (the test raises
it from the host), watches ``demo/knock`` in the domain's xenstore home, and
logs each event, watch and PM callback it gets."""

from __future__ import annotations

import struct

from guestos import native_entries, oops
from guestos.evtchn import bind_evtchn_to_irqhandler
from guestos.hypercall import with_args
from guestos.init import device_initcall
from guestos.pm import dev_pm_ops, device_register
from guestos.printk import printk
from guestos.symbols import export
from guestos.xenbus import register_xenbus_watch
from hypervisor.public.event_channel import EVTCHNOP_alloc_unbound
from hypervisor.public.native import NativeCpu
from hypervisor.public.xen import DOMID_SELF, Hypercall

__all__ = ["native_entries", "oops"]

KNOCK = "demo/knock"


@export
def demo_interrupt(cpu: NativeCpu, irq: int, dev_id: int) -> None:
    printk(cpu, f"demodrv: interrupt on irq {irq}, dev_id {dev_id:#x}")


@export
def demo_knocked(cpu: NativeCpu, path: str) -> None:
    printk(cpu, f"demodrv: watch fired on {path}")


def _log(what: str):
    def callback(cpu: NativeCpu, instance: int) -> int:
        printk(cpu, f"demodrv{instance}: {what}")
        return 0
    return callback


demo_pm_ops = export(dev_pm_ops("demodrv", freeze=_log("freeze"),
                                freeze_noirq=_log("freeze_noirq"),
                                thaw_noirq=_log("thaw_noirq"), thaw=_log("thaw"),
                                restore=_log("restore")),
                     "tests.kernels.demodrv.demo_pm_ops")


@device_initcall
def demo_init(cpu: NativeCpu, cmdline: str) -> None:
    arg = with_args(cpu, struct.pack("<HHI", DOMID_SELF, 0, 0))
    if cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_alloc_unbound, arg):
        printk(cpu, "demodrv: no event channel")
        return
    port = struct.unpack("<I", cpu.read(arg + 4, 4))[0]
    irq = bind_evtchn_to_irqhandler(cpu, port, demo_interrupt, dev_id=0xD0)
    device_register(cpu, demo_pm_ops)
    register_xenbus_watch(cpu, KNOCK, demo_knocked)
    printk(cpu, f"demodrv: port {port}, irq {irq}")
