"""A one-entry test kernel: boots, runs the function the test installed in
``PROBE`` with the NativeCpu, prints its result, and powers off.

It lets tests make hypercalls from the Python kernel path of a real booted
domain (the x86 path is tested by firmware/tests guests)."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

from hypervisor.public.native import VIRT_BASE, TailCall, pvlab_image_header
from hypervisor.public.sched import SCHEDOP_shutdown, SHUTDOWN_poweroff
from hypervisor.public.xen import Hypercall

HEADER_SIZE = ctypes.sizeof(pvlab_image_header)
PROBE: Callable[[Any], object] | None = None
RESULT: list[object] = []


def scratch(cpu: Any) -> int:
    """A free spot for argument structs: the image's kernel_data area."""
    return pvlab_image_header.from_buffer_copy(cpu.read(VIRT_BASE, HEADER_SIZE)).kernel_data


def start(cpu: Any) -> TailCall:
    RESULT.clear()
    RESULT.append(PROBE(cpu) if PROBE is not None else None)
    buf = scratch(cpu)
    cpu.write(buf, struct.pack("<I", SHUTDOWN_poweroff))
    return TailCall(Hypercall.sched_op, (SCHEDOP_shutdown, buf), None)


def native_entries() -> list[Callable[..., object]]:
    return [start]
