"""Initcalls (Linux's include/linux/init.h): the drivers' boot-time probes.

Which code runs at boot is part of the kernel's code, like Linux's initcall
section, not its state: this is the one table kept in Python. It is filled
as the drivers' modules are imported, so they run in import order, which
guestos/drivers/__init__.py fixes for the built-in drivers.
"""

from __future__ import annotations

from collections.abc import Callable

from hypervisor.public.native import NativeCpu

Initcall = Callable[[NativeCpu, str], None]
_initcalls: list[Initcall] = []


def device_initcall(fn: Initcall) -> Initcall:
    """Run ``fn(cpu, cmdline)`` at boot on cpu0, once the core is up."""
    _initcalls.append(fn)
    return fn


def do_initcalls(cpu: NativeCpu, cmdline: str) -> None:
    for fn in _initcalls:
        fn(cpu, cmdline)
