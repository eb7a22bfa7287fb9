"""The kernel's data, at the image's ``kernel_data`` area, and the one
allocator that places each subsystem's part of it.

The image header (at VIRT_BASE, hypervisor/public/native.py) says where that
area is; everything the kernel remembers between two native calls is here or
in pages it allocated and recorded here. Each subsystem declares the layout
of its part in its own module, with a check that it fits its area; AREAS
below gives every area its size and, in that order, its place.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from guestos.layout import Layout, Ref
from guestos.symbols import NO_SYMBOL, symbol_number
from hypervisor.public.native import VIRT_BASE, NativeCpu, pvlab_image_header
from hypervisor.public.xen import start_info

KERNEL_DATA_SIZE = 65536  # firmware/kernel/head.S reserves this much
MAX_CPUS = 32
KSTACK_PAGES = 2
MAX_TASKS = 64
NR_PORTS = 4096  # the 2-level event channel ABI's 64 x 64

MAX_DRVDATA = 8


@dataclass(frozen=True)
class Area:
    name: str
    offset: int
    size: int

    def va(self, cpu: NativeCpu) -> int:
        return header(cpu).kernel_data + self.offset


def _place(sizes: list[tuple[str, int]]) -> dict[str, Area]:
    """Areas one after the other, each 64-byte aligned."""
    areas, off = {}, 0
    for name, size in sizes:
        areas[name] = Area(name, off, size)
        off = (off + size + 63) // 64 * 64
    assert off <= KERNEL_DATA_SIZE, f"kernel data outgrew KERNEL_DATA_SIZE ({off} bytes)"
    return areas


AREAS = _place([
    ("kernel", 128),                    # KERNEL below: what boot learns from start_info
    ("percpu", MAX_CPUS * 8),           # PERCPU below, one a cpu
    ("sched_percpu", MAX_CPUS * 32),    # each cpu's run queue (guestos/task.py)
    ("stop_percpu", MAX_CPUS * 32),     # each cpu's stopper (guestos/stop_machine.py)
    ("tick_percpu", MAX_CPUS * 16),     # each cpu's tick (guestos/time.py)
    ("scratch", MAX_CPUS * 256),        # hypercall arguments (guestos/hypercall.py)
    ("mm", 64),                         # the page allocator (guestos/mm.py)
    ("sched", 128),                     # the scheduler's globals (guestos/task.py)
    ("tasks", MAX_TASKS * 256),         # the task table (guestos/task.py)
    ("pgd_list", MAX_TASKS * 8),        # guestos/pgd.py
    ("evtchn", NR_PORTS + 32 * 40),     # evtchn_to_irq and irq_info (guestos/evtchn.py)
    ("stop_machine", 128),              # guestos/stop_machine.py
    ("xencons", 16),                    # guestos/xencons.py
    ("xenbus", 64 + 8 * 128 + 8 * 256 + 16 + 4096),  # guestos/xenbus.py
    ("pm", 32 + 16 * 16 + 8 * 16),      # devices and syscore ops (guestos/pm.py)
    ("workqueue", 8 + 8 * 24),          # guestos/workqueue.py
    ("drvdata", MAX_DRVDATA * 16),      # driver_data() below
    ("freezer", 32),                    # guestos/freezer.py
    ("suspend", 32),                    # guestos/suspend.py
    ("manage", 48),                     # guestos/manage.py
    ("tty", 64 + 4096),                 # the console's line buffer (guestos/tty.py)
    ("fs", 32 * 32 + 64 * 48),          # device nodes and open files (guestos/fs.py)
])

# what boot learns from start_info and the hypervisor, which every subsystem reads
KERNEL = Layout("kernel", [
    ("start_info", "u64"),     # VA of start_info
    ("shared_info", "u64"),    # VA where shared_info is mapped
    ("nr_pages", "u64"),
    ("mfn_list", "u64"),       # VA of the p2m list
    ("kernel_l4_pfn", "u64"),
    ("nr_cpus", "u64"),
    ("cpus_up", "u64"),
])
assert KERNEL.size <= AREAS["kernel"].size

# per-cpu data: each subsystem declares its own layout and has an area with
# one copy a cpu (per_cpu below); this is boot's
PERCPU = Layout("percpu", [
    ("stack_top", "u64"),       # the cpu's kernel stack, empty whenever it is not in use
])
assert PERCPU.size <= AREAS["percpu"].size // MAX_CPUS


def header(cpu: NativeCpu) -> pvlab_image_header:
    size = ctypes.sizeof(pvlab_image_header)
    return pvlab_image_header.from_buffer_copy(cpu.read(VIRT_BASE, size))


def kernel(cpu: NativeCpu) -> Ref:
    return KERNEL.at(cpu, AREAS["kernel"].va(cpu))


def per_cpu(cpu: NativeCpu, area: str, layout: Layout, n: int | None = None) -> Ref:
    """Cpu n's copy (this cpu's by default) of per-cpu data kept in ``area``."""
    n = cpu.vcpu_id if n is None else n
    a = AREAS[area]
    return layout.at(cpu, a.va(cpu) + n * (a.size // MAX_CPUS))


def percpu(cpu: NativeCpu, n: int | None = None) -> Ref:
    return per_cpu(cpu, "percpu", PERCPU, n)


def read_start_info(cpu: NativeCpu) -> start_info:
    """The start_info page Xen (or the restorer) wrote for this domain."""
    return start_info.from_buffer_copy(cpu.read(kernel(cpu).start_info,
                                                ctypes.sizeof(start_info)))


def write_start_info(cpu: NativeCpu, si: start_info) -> None:
    cpu.write(kernel(cpu).start_info, bytes(si))


# --- a driver's own data ---------------------------------------------------------------

def _drvdata(cpu: NativeCpu) -> list[int]:
    raw = cpu.read(AREAS["drvdata"].va(cpu), AREAS["drvdata"].size)
    return list(struct.unpack(f"<{2 * MAX_DRVDATA}Q", raw))


def driver_data(cpu: NativeCpu, key: object) -> int:
    """What the driver that exported ``key`` keeps here (its state page, say),
    or 0: a driver has no area of its own in AREAS, which it cannot edit."""
    words, number = _drvdata(cpu), symbol_number(key)
    for i in range(0, len(words), 2):
        if words[i] == number:
            return words[i + 1]
    return 0


def set_driver_data(cpu: NativeCpu, key: object, value: int) -> None:
    words, number = _drvdata(cpu), symbol_number(key)
    for i in range(0, len(words), 2):
        if words[i] in (number, NO_SYMBOL):
            cpu.write(AREAS["drvdata"].va(cpu) + 8 * i, struct.pack("<QQ", number, value))
            return
    raise RuntimeError("no free driver data slot")
