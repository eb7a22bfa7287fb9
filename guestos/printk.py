"""printk: kernel messages to the console, prefixed with the cpu."""

from __future__ import annotations

from typing import Any

from guestos.hypercall import console_write
from guestos.kdata import scratch_va


def printk(cpu: Any, msg: str) -> None:
    data = f"[cpu{cpu.vcpu_id}] {msg}\n".encode()
    buf = scratch_va(cpu)
    for i in range(0, len(data), 256):
        chunk = data[i:i + 256]
        cpu.write(buf, chunk)
        console_write(cpu, buf, len(chunk))
