"""The PM core, reduced to what a save, checkpoint or restore needs (Linux's
drivers/base/power/main.c, and include/linux/pm.h on how Xen uses it):

    dpm_suspend_start(PMSG_FREEZE)     each device's freeze
    dpm_suspend_noirq(PMSG_FREEZE)     each device's freeze_noirq
    sysdev_suspend(PMSG_FREEZE)        system devices, on cpu0 in stop_machine
    cancelled = the suspend hypercall
    sysdev_resume()
    dpm_resume_noirq(cancelled ? PMSG_THAW : PMSG_RESTORE)
    dpm_resume_end(cancelled ? PMSG_THAW : PMSG_RESTORE)

Devices are suspended last-registered first and resumed in registration
order. A driver may fail a freeze: the devices already frozen are thawed (in
reverse, as they were frozen) and the caller aborts the suspend.

The device list lives in kernel data: a driver number and an instance each.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guestos.kdata import DEVICE_SIZE, DEVICES_OFFSET, MAX_DEVICES, kdata_va, kernel
from guestos.layout import Layout, Ref
from guestos.mm import mfn_to_pfn
from guestos.printk import printk
from hypervisor.public.errno import EBUSY
from hypervisor.public.xen import start_info

PMSG_FREEZE, PMSG_THAW, PMSG_RESTORE = 1, 2, 3
PMSG_NAMES = {PMSG_FREEZE: "FREEZE", PMSG_THAW: "THAW", PMSG_RESTORE: "RESTORE"}

# the callbacks of struct dev_pm_ops that these messages run
FREEZE, FREEZE_NOIRQ, THAW_NOIRQ, THAW, RESTORE_NOIRQ, RESTORE = range(6)
PHASES = ("freeze", "freeze_noirq", "thaw_noirq", "thaw", "restore_noirq", "restore")

DEVICE = Layout("device", [("driver", "u64"), ("instance", "u64")])
assert DEVICE.size <= DEVICE_SIZE

Callback = Callable[[Any, int], int]


@dataclass(frozen=True)
class Driver:
    name: str
    ops: dict[int, Callback]  # phase -> callback(cpu, instance) -> 0 or -errno


def device(cpu: Any, i: int) -> Ref:
    return DEVICE.at(cpu, kdata_va(cpu, DEVICES_OFFSET) + i * DEVICE_SIZE)


def device_register(cpu: Any, driver: int, instance: int = 0) -> int:
    k = kernel(cpu)
    n = k.nr_devices
    if n >= MAX_DEVICES:
        return -EBUSY
    d = device(cpu, n)
    d.driver, d.instance = driver, instance
    k.nr_devices = n + 1
    return n


def dev_name(cpu: Any, i: int) -> str:
    d = device(cpu, i)
    return f"{DRIVERS[d.driver].name}{d.instance}"


def _call(cpu: Any, i: int, phase: int) -> int:
    d = device(cpu, i)
    cb = DRIVERS[d.driver].ops.get(phase)
    rc = cb(cpu, d.instance) if cb is not None else 0
    k = kernel(cpu)
    if rc == 0 and k.pm_fail == ((i + 1) << 8 | (phase + 1)):
        rc = -EBUSY  # option pmfail=DEV:PHASE, for the tests of the rollback
    return rc


def _suspend(cpu: Any, phase: int, undo: int, what: str) -> int:
    n = kernel(cpu).nr_devices
    printk(cpu, f"PM: {what}(FREEZE)")
    for i in reversed(range(n)):
        rc = _call(cpu, i, phase)
        if rc:
            printk(cpu, f"PM: device {dev_name(cpu, i)} failed to {PHASES[phase]}: error {rc}")
            for j in range(i + 1, n):  # the ones already frozen, in reverse
                _call(cpu, j, undo)
            return rc
    return 0


def dpm_suspend_start(cpu: Any) -> int:
    return _suspend(cpu, FREEZE, THAW, "dpm_suspend_start")


def dpm_suspend_noirq(cpu: Any) -> int:
    return _suspend(cpu, FREEZE_NOIRQ, THAW_NOIRQ, "dpm_suspend_noirq")


def _resume(cpu: Any, msg: int, phase: int, what: str) -> None:
    printk(cpu, f"PM: {what}({PMSG_NAMES[msg]})")
    for i in range(kernel(cpu).nr_devices):
        rc = _call(cpu, i, phase)
        if rc:
            printk(cpu, f"PM: device {dev_name(cpu, i)} failed to {PHASES[phase]}: error {rc}")


def dpm_resume_noirq(cpu: Any, msg: int) -> None:
    _resume(cpu, msg, THAW_NOIRQ if msg == PMSG_THAW else RESTORE_NOIRQ, "dpm_resume_noirq")


def dpm_resume_end(cpu: Any, msg: int) -> None:
    _resume(cpu, msg, THAW if msg == PMSG_THAW else RESTORE, "dpm_resume_end")


# --- system devices (syscore), run on cpu0 with the others stopped ------------------

def sysdev_suspend(cpu: Any) -> None:
    printk(cpu, "PM: sysdev_suspend(FREEZE)")


def sysdev_resume(cpu: Any, cancelled: int) -> None:
    """The timer goes on where it was after a checkpoint; in a new domain it
    has to be set again (xen_timer_resume)."""
    if not cancelled:
        from guestos.events import TICK_NS, now
        from hypervisor.public.xen import Hypercall
        cpu.hypercall(Hypercall.set_timer_op, now(cpu) + TICK_NS)
    printk(cpu, "PM: sysdev_resume")


# --- drivers ------------------------------------------------------------------------

def _console_restore(cpu: Any, instance: int) -> int:
    """hvc_xen: in a new domain the console's port comes from start_info again."""
    k = kernel(cpu)
    si = start_info.from_buffer_copy(cpu.read(k.start_info, ctypes.sizeof(start_info)))
    k.console_pfn = mfn_to_pfn(cpu, si.console.domU.mfn)
    k.console_port = si.console.domU.evtchn
    return 0


def _testdev(phase: int) -> Callback:
    def cb(cpu: Any, instance: int) -> int:
        printk(cpu, f"testdev{instance}: {PHASES[phase]}")
        return 0
    return cb


def _balloon(phase: int) -> Callback:
    def cb(cpu: Any, instance: int) -> int:
        from guestos.drivers import virtio_balloon
        return getattr(virtio_balloon, PHASES[phase])(cpu, instance)
    return cb


# the order is an ABI with saved images: only ever append
DRIVERS: tuple[Driver, ...] = (
    Driver("xencons", {RESTORE: _console_restore}),
    Driver("testdev", {p: _testdev(p) for p in range(len(PHASES))}),
    Driver("virtio_balloon", {p: _balloon(p) for p in (FREEZE, THAW, RESTORE)}),
)
DRV_XENCONS, DRV_TESTDEV, DRV_VIRTIO_BALLOON = 0, 1, 2
