"""printk: kernel messages to the console, prefixed with the cpu. Before
the console ring is known (the first lines of boot) they go through the
console_io hypercall, as Linux's early printk does."""

from __future__ import annotations

from guestos.hypercall import console_write, scratch_va
from guestos.xencons import hvc_write, xencons
from hypervisor.public.native import NativeCpu


def console_out(cpu: NativeCpu, data: bytes) -> None:
    if xencons(cpu).port:
        hvc_write(cpu, data)
        return
    buf = scratch_va(cpu)
    for i in range(0, len(data), 256):
        chunk = data[i:i + 256]
        cpu.write(buf, chunk)
        console_write(cpu, buf, len(chunk))


def printk(cpu: NativeCpu, msg: str) -> None:
    console_out(cpu, f"[cpu{cpu.vcpu_id}] {msg}\n".encode())
