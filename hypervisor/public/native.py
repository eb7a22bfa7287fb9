"""The native-entry ABI between the hypervisor and a Python guest kernel.

A guest image names its kernel (a Python module) in a pvlab ELF note. The module
exposes ``native_entries()``: a fixed, ordered list of functions. Entry ``i``
gets the guest virtual address ``native_text + NATIVE_ENTRY_STRIDE * i`` in the
image's native text range; entry 0 is the boot entry that the image's ENTRY note
names. When a VCPU reaches one of these addresses, the function runs with a
``NativeCpu`` for that VCPU and:

* returns an int (or None, read as 0): the result goes in rax and the VCPU
  returns to the address on top of its stack, as after a ``call``;
* returns a ``TailCall``: the hypercall is made *as the function's last act*;
  the VCPU then continues at the continuation's native address with the
  hypercall's result in rax. If the hypercall blocks, the VCPU sleeps right
  there; it may wake in another process after a restore, and the continuation
  runs then. Hypercalls that do not return (iret) take no continuation. The
  arguments are left in rdi, rsi, rdx, r10, r8, as an x86 hypercall has them
  (the toolstack reads the suspend hypercall's third from vcpu0's rdx).

If a native function raises, the runtime calls the kernel module's ``oops(cpu,
exc)`` (if it has one) to let it report, then crashes the domain: an exception in
the kernel is a guest kernel bug, never the hypervisor's.

A kernel module may also have ``check_cmdline(cmdline) -> str``: "" if the
kernel can obey every option of ``cmdline``, else the one-line reason it
cannot. The builder asks it before the domain first runs, so that a mistyped
option is refused as bad input rather than found by the booting guest.

Everything a kernel function keeps beyond its own return lives in guest memory:
the ``NativeCpu`` is rebuilt for every entry.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

NATIVE_ENTRY_STRIDE = 16

# where a pvlab guest image is linked: its header is the first byte there
VIRT_BASE = 0xFFFFFFFF80000000

PVLAB_IMAGE_MAGIC = 0x474D4942414C5650  # "PVLABIMG" little-endian


class pvlab_image_header(ctypes.LittleEndianStructure):
    """The header at the first byte of a pvlab guest image (firmware/kernel/head.S)."""

    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("version", ctypes.c_uint64),
        ("native_text", ctypes.c_uint64),
        ("native_text_size", ctypes.c_uint64),
        ("hypercall_page", ctypes.c_uint64),
        ("programs", ctypes.c_uint64),
        ("kernel_data", ctypes.c_uint64),
        ("kernel_data_size", ctypes.c_uint64),
        ("image_end", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class TailCall:
    """End a native function by making hypercall ``op`` with ``args``; resume at
    ``continuation`` (a native entry) with the result in rax."""

    op: int
    args: tuple[int, ...] = ()
    continuation: Callable[..., object] | None = None


class NativeCpu(Protocol):
    """What a native kernel function may do with the VCPU it runs on. Memory
    is reached through the VCPU's current pagetables, as its code would;
    ``readl``/``writel`` are single loads and stores of 1, 2 or 4 bytes, which
    is what a device register needs (``read`` may split an access)."""

    vcpu_id: int

    def reg(self, name: str) -> int: ...
    def regs(self) -> dict[str, int]: ...
    def set_regs(self, **regs: int) -> None: ...
    def read(self, va: int, size: int) -> bytes: ...
    def write(self, va: int, data: bytes) -> None: ...
    def read_u64(self, va: int) -> int: ...
    def write_u64(self, va: int, value: int) -> None: ...
    def readl(self, va: int, size: int = 4) -> int: ...
    def writel(self, va: int, value: int, size: int = 4) -> None: ...
    def hypercall(self, op: int, *args: int) -> int: ...
    def native_addr(self, fn: Callable[..., object]) -> int: ...
    # a line for the hypervisor's trace buffer alone, if the toolstack enabled
    # one (Linux's tracefs trace_marker): never the console, nothing otherwise
    def trace_marker(self, text: str) -> None: ...
