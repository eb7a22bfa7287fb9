"""When the kernel itself fails: print why, as Linux's panic() does. The
runtime crashes the domain after this returns."""

from __future__ import annotations

from guestos.printk import printk
from hypervisor.public.native import NativeCpu


def oops(cpu: NativeCpu, exc: Exception) -> None:
    printk(cpu, f"Kernel panic - not syncing: {type(exc).__name__}: {exc}")
