"""A bench kernel: runs an x86 loop of N null hypercalls (xen_version) in guest
kernel mode through the hypercall page, then powers off; also times N null
hypercalls made from Python through the same dispatcher.

The loop is assembled by hand (a few bytes) so that the bench needs no
toolchain:

    mov  $N, %rbx
 1: mov  $0, %edi                 # XENVER_version
    xor  %esi, %esi
    call *%r12                    # hypercall_page + 17 * 32
    dec  %rbx
    jnz  1b
    jmp  *%r13                    # a native entry: done
"""

from __future__ import annotations

import ctypes
import struct
import time
from collections.abc import Callable
from typing import Any

from hypervisor.public.native import VIRT_BASE, TailCall, pvlab_image_header
from hypervisor.public.sched import SCHEDOP_shutdown, SHUTDOWN_poweroff
from hypervisor.public.xen import Hypercall, XENVER_version

HEADER_SIZE = ctypes.sizeof(pvlab_image_header)
COUNT = 100_000
RESULTS: dict[str, float] = {}


def _loop(n: int) -> bytes:
    return (b"\x48\xc7\xc3" + struct.pack("<i", n)      # mov $n, %rbx
            + b"\xbf\x00\x00\x00\x00"                    # mov $0, %edi
            + b"\x31\xf6"                                # xor %esi, %esi
            + b"\x41\xff\xd4"                            # call *%r12
            + b"\x48\xff\xcb"                            # dec %rbx
            + b"\x75\xf1"                                # jnz back to mov $0, %edi
            + b"\x41\xff\xe5")                           # jmp *%r13


def start(cpu: Any) -> int:
    hdr = pvlab_image_header.from_buffer_copy(cpu.read(VIRT_BASE, HEADER_SIZE))
    # Python path first
    t = time.perf_counter()
    for _ in range(COUNT):
        cpu.hypercall(Hypercall.xen_version, XENVER_version, 0)
    RESULTS["python_us"] = (time.perf_counter() - t) / COUNT * 1e6
    code = hdr.kernel_data + 0x8000  # a page of the kernel's data area, away from the stack
    cpu.write(code, _loop(COUNT))
    cpu.set_regs(r12=hdr.hypercall_page + 32 * Hypercall.xen_version,
                 r13=cpu.native_addr(done))
    # "return" into the loop: it becomes the address our ret pops
    cpu.write_u64(cpu.reg("rsp"), code)
    RESULTS["x86_start"] = time.perf_counter()
    return 0


def done(cpu: Any) -> TailCall:
    RESULTS["x86_us"] = (time.perf_counter() - RESULTS["x86_start"]) / COUNT * 1e6
    buf = pvlab_image_header.from_buffer_copy(cpu.read(VIRT_BASE, HEADER_SIZE)).kernel_data
    cpu.write(buf, struct.pack("<I", SHUTDOWN_poweroff))
    return TailCall(Hypercall.sched_op, (SCHEDOP_shutdown, buf), None)


def native_entries() -> list[Callable[..., object]]:
    return [start, done]
