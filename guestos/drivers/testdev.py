"""Test devices (option testdevs=N): N devices that log each PM callback
they get, so a test sees the order in which the PM core calls them. They
register testdev0 first, or testdev(N-1) first with option
testdev.order=reverse: the PM core's order is the registration order,
whatever the devices are called."""

from __future__ import annotations

from guestos.cmdline import parse_int, parse_word
from guestos.init import device_initcall
from guestos.pm import dev_pm_ops, device_register
from guestos.printk import printk
from guestos.symbols import export
from hypervisor.public.native import NativeCpu

ORDERS = ("forward", "reverse")  # option testdev.order=: testdev0 registered first, or last


def _log(cpu: NativeCpu, instance: int, what: str) -> int:
    printk(cpu, f"testdev{instance}: {what}")
    return 0


def testdev_freeze(cpu: NativeCpu, instance: int) -> int:
    return _log(cpu, instance, "freeze")


def testdev_freeze_noirq(cpu: NativeCpu, instance: int) -> int:
    return _log(cpu, instance, "freeze_noirq")


def testdev_thaw_noirq(cpu: NativeCpu, instance: int) -> int:
    return _log(cpu, instance, "thaw_noirq")


def testdev_thaw(cpu: NativeCpu, instance: int) -> int:
    return _log(cpu, instance, "thaw")


def testdev_restore_noirq(cpu: NativeCpu, instance: int) -> int:
    return _log(cpu, instance, "restore_noirq")


def testdev_restore(cpu: NativeCpu, instance: int) -> int:
    return _log(cpu, instance, "restore")


testdev_pm_ops = export(dev_pm_ops(
    "testdev", freeze=testdev_freeze, freeze_noirq=testdev_freeze_noirq,
    thaw_noirq=testdev_thaw_noirq, thaw=testdev_thaw, restore_noirq=testdev_restore_noirq,
    restore=testdev_restore), "guestos.drivers.testdev.testdev_pm_ops")


@device_initcall
def testdev_init(cpu: NativeCpu, cmdline: str) -> None:
    instances = range(parse_int(cmdline, "testdevs"))
    order = parse_word(cmdline, "testdev.order", "forward")
    if order not in ORDERS:
        printk(cpu, f"testdev: order {order!r} unknown (one of {', '.join(ORDERS)}): forward")
    if order == "reverse":
        instances = instances[::-1]
    for i in instances:
        device_register(cpu, testdev_pm_ops, i)
