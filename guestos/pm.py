"""The PM core, reduced to what a save, checkpoint or restore needs (Linux's
drivers/base/power/main.c, and include/linux/pm.h on how Xen uses it):

    dpm_suspend_start(PMSG_FREEZE)     each device's freeze
    dpm_suspend_noirq(PMSG_FREEZE)     each device's freeze_noirq
    sysdev_suspend(PMSG_FREEZE)        system devices, on cpu0 in stop_machine
    cancelled = the suspend hypercall
    sysdev_resume()
    dpm_resume_noirq(cancelled ? PMSG_THAW : PMSG_RESTORE)
    dpm_resume_end(cancelled ? PMSG_THAW : PMSG_RESTORE)

A driver registers each device it drives with ``device_register(cpu, ops,
instance)``, ``ops`` its exported ``dev_pm_ops``; code that must run on cpu0
with the other cpus stopped (inside xen_suspend) registers ``syscore_ops``.
Both lists live in kernel data, as symbol numbers (guestos/symbols.py).

Devices are suspended last-registered first and resumed in registration
order. A driver may fail a freeze: the devices already frozen are thawed (in
reverse, as they were frozen) and the caller aborts the suspend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from guestos.kdata import AREAS
from guestos.layout import Layout, Ref
from guestos.printk import printk
from guestos.symbols import symbol, symbol_number
from hypervisor.public.errno import EBUSY
from hypervisor.public.native import NativeCpu

PMSG_FREEZE, PMSG_THAW, PMSG_RESTORE = 1, 2, 3
PMSG_NAMES = {PMSG_FREEZE: "FREEZE", PMSG_THAW: "THAW", PMSG_RESTORE: "RESTORE"}

# the callbacks of struct dev_pm_ops that these messages run
FREEZE, FREEZE_NOIRQ, THAW_NOIRQ, THAW, RESTORE_NOIRQ, RESTORE = range(6)
PHASES = ("freeze", "freeze_noirq", "thaw_noirq", "thaw", "restore_noirq", "restore")

MAX_DEVICES = 16
MAX_SYSCORE = 8
NO_DEVICE = 0xFFFFFFFFFFFFFFFF  # option pmfail= names none
PM = Layout("pm", [
    ("nr_devices", "u64"),
    ("nr_syscore", "u64"),
    ("fail_dev", "u64"),       # option pmfail=DEV:PHASE (NO_DEVICE: none)
    ("fail_phase", "u64"),
])
DEVICE = Layout("device", [("ops", "u64"), ("instance", "u64")])
DEVICES_OFFSET = PM.size
SYSCORE_OFFSET = DEVICES_OFFSET + MAX_DEVICES * DEVICE.size
assert SYSCORE_OFFSET + MAX_SYSCORE * 8 <= AREAS["pm"].size

Callback = Callable[[NativeCpu, int], int]  # (cpu, instance) -> 0 or -errno


@dataclass
class dev_pm_ops:
    """A driver's PM callbacks (include/linux/pm.h); export it before use."""

    name: str
    freeze: Callback | None = None
    freeze_noirq: Callback | None = None
    thaw_noirq: Callback | None = None
    thaw: Callback | None = None
    restore_noirq: Callback | None = None
    restore: Callback | None = None


@dataclass
class syscore_ops:
    """Run on cpu0 inside xen_suspend, the other cpus stopped (Linux's
    include/linux/syscore_ops.h); export it before use."""

    suspend: Callable[[NativeCpu], None]
    resume: Callable[[NativeCpu], None]


def pm_state(cpu: NativeCpu) -> Ref:
    return PM.at(cpu, AREAS["pm"].va(cpu))


def device(cpu: NativeCpu, i: int) -> Ref:
    return DEVICE.at(cpu, AREAS["pm"].va(cpu) + DEVICES_OFFSET + i * DEVICE.size)


def _ops(cpu: NativeCpu, i: int) -> dev_pm_ops:
    return symbol(device(cpu, i).ops)  # type: ignore[return-value]


def device_register(cpu: NativeCpu, ops: dev_pm_ops, instance: int = 0) -> int:
    """Add a device to the PM list: returns its number, or -EBUSY if full."""
    k = pm_state(cpu)
    n = k.nr_devices
    if n >= MAX_DEVICES:
        return -EBUSY
    d = device(cpu, n)
    d.ops, d.instance = symbol_number(ops), instance
    k.nr_devices = n + 1
    return n


def dev_name(cpu: NativeCpu, i: int) -> str:
    return f"{_ops(cpu, i).name}{device(cpu, i).instance}"


def _callback(ops: dev_pm_ops, phase: int) -> Callback | None:
    return (ops.freeze, ops.freeze_noirq, ops.thaw_noirq, ops.thaw, ops.restore_noirq,
            ops.restore)[phase]


def pmfail_error(word: str) -> str:
    """Why option ``pmfail=DEV:PHASE`` cannot be obeyed, or ""."""
    dev, _, phase = word[len("pmfail="):].partition(":")
    if dev.isdigit() and phase in PHASES:
        return ""
    return (f"option {word}: want pmfail=DEV:PHASE, DEV a device's number in registration "
            "order (0: the console, then the test devices), PHASE one of " + ", ".join(PHASES))


def pm_fail_option(cpu: NativeCpu, cmdline: str) -> None:
    """Option pmfail=DEV:PHASE: device DEV (in registration order) fails
    PHASE, for the tests of the rollback."""
    k = pm_state(cpu)
    k.fail_dev = NO_DEVICE
    for word in cmdline.split():
        if word.startswith("pmfail="):
            why = pmfail_error(word)
            if why:
                printk(cpu, why)
                continue
            dev, _, phase = word[len("pmfail="):].partition(":")
            k.fail_dev, k.fail_phase = int(dev), PHASES.index(phase)


def _call(cpu: NativeCpu, i: int, phase: int) -> int:
    cb = _callback(_ops(cpu, i), phase)
    rc = cb(cpu, device(cpu, i).instance) if cb is not None else 0
    k = pm_state(cpu)
    if rc == 0 and k.fail_dev == i and k.fail_phase == phase:
        rc = -EBUSY
    return rc


def _suspend(cpu: NativeCpu, phase: int, undo: int, what: str) -> int:
    """One suspend phase (Linux's dpm_suspend, dpm_noirq_suspend_devices):
    log ``PM: what(FREEZE)``, call ``phase`` of every device, last-registered
    first. If one fails, log it, call ``undo`` of the devices this phase had
    already done, newest first, and return the error; else 0."""
    n = pm_state(cpu).nr_devices
    printk(cpu, f"PM: {what}(FREEZE)")
    for i in reversed(range(n)):
        rc = _call(cpu, i, phase)
        if rc:
            printk(cpu, f"PM: device {dev_name(cpu, i)} failed to {PHASES[phase]}: error {rc}")
            for j in range(i + 1, n):  # the ones already frozen, in reverse
                _call(cpu, j, undo)
            return rc
    return 0


def dpm_suspend_start(cpu: NativeCpu) -> int:
    """Each device's freeze: 0, or a device's error (the frozen ones thawed)."""
    return _suspend(cpu, FREEZE, THAW, "dpm_suspend_start")


def dpm_suspend_noirq(cpu: NativeCpu) -> int:
    """Each device's freeze_noirq: 0, or a device's error (those done get thaw_noirq)."""
    return _suspend(cpu, FREEZE_NOIRQ, THAW_NOIRQ, "dpm_suspend_noirq")


def _resume(cpu: NativeCpu, msg: int, phase: int, what: str) -> None:
    """One resume phase (Linux's dpm_resume_noirq, dpm_resume): log
    ``PM: what(MSG)``, call ``phase`` of every device in registration order;
    one that fails is logged and the others go on."""
    printk(cpu, f"PM: {what}({PMSG_NAMES[msg]})")
    for i in range(pm_state(cpu).nr_devices):
        rc = _call(cpu, i, phase)
        if rc:
            printk(cpu, f"PM: device {dev_name(cpu, i)} failed to {PHASES[phase]}: error {rc}")


def dpm_resume_noirq(cpu: NativeCpu, msg: int) -> None:
    """Each device's thaw_noirq (msg PMSG_THAW) or restore_noirq (PMSG_RESTORE)."""
    _resume(cpu, msg, THAW_NOIRQ if msg == PMSG_THAW else RESTORE_NOIRQ, "dpm_resume_noirq")


def dpm_resume_end(cpu: NativeCpu, msg: int) -> None:
    """Each device's thaw (msg PMSG_THAW) or restore (PMSG_RESTORE)."""
    _resume(cpu, msg, THAW if msg == PMSG_THAW else RESTORE, "dpm_resume_end")


# --- system devices (syscore), run on cpu0 with the others stopped ------------------

def _syscore_va(cpu: NativeCpu) -> int:
    return AREAS["pm"].va(cpu) + SYSCORE_OFFSET


def register_syscore_ops(cpu: NativeCpu, ops: syscore_ops) -> None:
    k = pm_state(cpu)
    if k.nr_syscore >= MAX_SYSCORE:
        raise RuntimeError("too many syscore_ops")
    cpu.write_u64(_syscore_va(cpu) + 8 * k.nr_syscore, symbol_number(ops))
    k.nr_syscore = k.nr_syscore + 1


def _syscore(cpu: NativeCpu) -> list[syscore_ops]:
    base = _syscore_va(cpu)
    return [symbol(cpu.read_u64(base + 8 * i))  # type: ignore[misc]
            for i in range(pm_state(cpu).nr_syscore)]


def sysdev_suspend(cpu: NativeCpu) -> None:
    printk(cpu, "PM: sysdev_suspend(FREEZE)")
    for ops in reversed(_syscore(cpu)):
        ops.suspend(cpu)


def sysdev_resume(cpu: NativeCpu) -> None:
    for ops in _syscore(cpu):
        ops.resume(cpu)
    printk(cpu, "PM: sysdev_resume")
