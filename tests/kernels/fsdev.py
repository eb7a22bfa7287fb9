"""The guest kernel with a loopback device file, "loop0", for the file
layer's tests (guestos/fs.py): what a program writes to it is what the next
read returns; a read on an empty loop waits until a write comes. Its buffer
is a page the driver allocates at its initcall (guest memory, as all kernel
state)."""

from __future__ import annotations

import struct

from guestos import native_entries, oops
from guestos.fs import device_create, file_operations, wake_up_node
from guestos.init import device_initcall
from guestos.kdata import driver_data, set_driver_data
from guestos.layout import Ref
from guestos.mm import alloc_pages, va
from guestos.printk import printk
from guestos.symbols import export
from guestos.usercopy import copy_from_user, copy_to_user
from hypervisor.public.errno import EFAULT
from hypervisor.public.native import NativeCpu

__all__ = ["native_entries", "oops"]

CAPACITY = 4096 - 16  # the page: [node index, length, data]


def _page(cpu: NativeCpu) -> int:
    return va(driver_data(cpu, loop_fops))


def loop_open(cpu: NativeCpu, file: Ref) -> int:
    return 0


def loop_read(cpu: NativeCpu, file: Ref, ubuf: int, size: int) -> int | None:
    page = _page(cpu)
    length = struct.unpack("<Q", cpu.read(page + 8, 8))[0]
    if not length:
        return None  # wait for a write
    n = min(size, length)
    data = cpu.read(page + 16, length)
    if not copy_to_user(cpu, ubuf, data[:n]):
        return -EFAULT
    rest = data[n:]
    cpu.write(page + 8, struct.pack("<Q", len(rest)) + rest)
    return n


def loop_write(cpu: NativeCpu, file: Ref, ubuf: int, size: int) -> int | None:
    page = _page(cpu)
    node, length = struct.unpack("<QQ", cpu.read(page, 16))
    n = min(size, CAPACITY - length)
    data = copy_from_user(cpu, ubuf, n)
    if data is None:
        return -EFAULT
    cpu.write(page + 16 + length, data)
    cpu.write(page + 8, struct.pack("<Q", length + n))
    wake_up_node(cpu, node)
    return n


loop_fops = export(file_operations(loop_open, loop_read, loop_write),
                   "tests.kernels.fsdev.loop_fops")


@device_initcall
def loop_init(cpu: NativeCpu, cmdline: str) -> None:
    pfn = alloc_pages(cpu)
    set_driver_data(cpu, loop_fops, pfn)
    node = device_create(cpu, "loop0", loop_fops, 0)
    cpu.write(va(pfn), struct.pack("<Q", node))
    printk(cpu, f"fsdev: loop0 is node {node}")
