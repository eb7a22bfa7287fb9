"""Thin hypercall wrappers, named as in Linux's asm/xen/hypercall.h."""

from __future__ import annotations

import struct
from typing import Any

from hypervisor.public.sched import SCHEDOP_shutdown
from hypervisor.public.xen import DOMID_SELF, CONSOLEIO_write, Hypercall


def console_write(cpu: Any, buf_va: int, size: int) -> int:
    return cpu.hypercall(Hypercall.console_io, CONSOLEIO_write, size, buf_va)


def with_args(cpu: Any, data: bytes) -> int:
    """Put an argument struct where the hypervisor can read it: this cpu's
    scratch slot in kernel data."""
    from guestos.kdata import scratch_va
    va = scratch_va(cpu)
    cpu.write(va, data)
    return va


def shutdown_args(cpu: Any, reason: int) -> tuple[int, int]:
    return SCHEDOP_shutdown, with_args(cpu, struct.pack("<I", reason))


def mmuext(cpu: Any, cmd: int, arg1: int) -> int:
    va = with_args(cpu, struct.pack("<IIQQ", cmd, 0, arg1, 0) + b"\0" * 8)
    return cpu.hypercall(Hypercall.mmuext_op, va, 1, 0, DOMID_SELF)
