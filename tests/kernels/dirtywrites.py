"""A test kernel that writes the pages a test chose, in three ways, then
powers off: the log-dirty tests' guest.

``X86`` pfns are written by x86 stores in guest kernel mode: the kernel puts
a small loop of machine code in its last page (a ``mov %rdi, (%rdi)``
over a table of addresses) and jumps there; the loop ends by jumping to
the native entry ``finish``. ``PYTHON`` pfns are written by the Python
kernel's own stores (NativeCpu.write_u64). ``HYPERCALL`` pfns are written by
the hypervisor's copy_to_guest: XENVER_extraversion's string lands there.
``REPOPULATE`` pfns are given back (XENMEM_decrease_reservation) and
populated again (XENMEM_populate_physmap): a new frame, written by no one.
Nothing else near the top of its RAM is written."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

from hypervisor.public.memory import (
    XENMEM_decrease_reservation,
    XENMEM_populate_physmap,
    xen_memory_reservation,
)
from hypervisor.public.native import VIRT_BASE, TailCall
from hypervisor.public.sched import SCHEDOP_shutdown, SHUTDOWN_poweroff
from hypervisor.public.xen import DOMID_SELF, Hypercall, XENVER_extraversion, start_info

X86: list[int] = []
PYTHON: list[int] = []
HYPERCALL: list[int] = []
REPOPULATE: list[int] = []

# lea table(%rip),%rsi; 1: mov (%rsi),%rdi; test %rdi,%rdi; jz 2f;
# mov %rdi,(%rdi); add $8,%rsi; jmp 1b; 2: movabs $finish,%rax; jmp *%rax
_LOOP = bytes.fromhex("488d3521000000" "488b3e" "4885ff" "7409" "48893f" "4883c608" "ebef"
                      "48b8") + bytes(8) + bytes.fromhex("ffe0") + bytes(4)
_FINISH_AT = 26  # offset of movabs's immediate
_TABLE_AT = 40


def va(pfn: int) -> int:
    return VIRT_BASE + (pfn << 12)


def nr_pages(cpu: Any) -> int:
    si = start_info.from_buffer_copy(cpu.read(cpu.reg("rsi"), ctypes.sizeof(start_info)))
    return int(si.nr_pages)


def start(cpu: Any) -> TailCall:
    last = nr_pages(cpu) - 1
    for pfn in PYTHON:
        cpu.write_u64(va(pfn) + 8, pfn)
    for pfn in HYPERCALL:
        cpu.hypercall(Hypercall.xen_version, XENVER_extraversion, va(pfn) + 64)
    for pfn in REPOPULATE:
        repopulate(cpu, pfn, va(last))
    code = va(last)
    loop = bytearray(_LOOP)
    loop[_FINISH_AT:_FINISH_AT + 8] = struct.pack("<Q", cpu.native_addr(finish))
    table = b"".join(struct.pack("<Q", va(p) + 16) for p in X86) + bytes(8)
    cpu.write(code, bytes(loop) + table)
    cpu.set_regs(rip=code)
    return TailCall(Hypercall.sched_op, (0, 0), None)  # SCHEDOP_yield, then the loop


def repopulate(cpu: Any, pfn: int, scratch: int) -> None:
    """Balloon one pfn out and in again (the scratch page holds the args)."""
    si = start_info.from_buffer_copy(cpu.read(cpu.reg("rsi"), ctypes.sizeof(start_info)))
    mfn = cpu.read_u64(si.mfn_list + 8 * pfn)
    assert cpu.hypercall(Hypercall.update_va_mapping, va(pfn), 0, 0) == 0  # unmapped first
    for cmd, value in ((XENMEM_decrease_reservation, mfn), (XENMEM_populate_physmap, pfn)):
        cpu.write_u64(scratch + 64, value)
        cpu.write(scratch, bytes(xen_memory_reservation(
            extent_start=scratch + 64, nr_extents=1, domid=DOMID_SELF)))
        assert cpu.hypercall(Hypercall.memory_op, cmd, scratch) == 1


def finish(cpu: Any) -> TailCall:
    buf = cpu.reg("rsi")  # the end of the loop's table, in the code page
    cpu.write(buf, struct.pack("<I", SHUTDOWN_poweroff))
    return TailCall(Hypercall.sched_op, (SCHEDOP_shutdown, buf), None)


def native_entries() -> list[Callable[..., object]]:
    return [start, finish]
