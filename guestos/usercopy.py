"""copy_from_user: the kernel's L4 does not map user memory (each task has its
own user L4), so the kernel walks the running task's tables itself, reading
them through its own read-only mapping and the M2P."""

from __future__ import annotations

from guestos.mm import FRAME, mfn_to_pfn, va
from guestos.task import cpu_rq
from hypervisor.public.arch_x86 import _PAGE_PRESENT
from hypervisor.public.native import NativeCpu


def user_pfn(cpu: NativeCpu, uva: int) -> int | None:
    pfn = cpu_rq(cpu).user_pgd
    for shift in (39, 30, 21, 12):
        e = cpu.read_u64(va(pfn) + 8 * ((uva >> shift) & 511))
        if not e & _PAGE_PRESENT:
            return None
        pfn = mfn_to_pfn(cpu, (e & FRAME) >> 12)
    return pfn


def copy_from_user(cpu: NativeCpu, uva: int, size: int) -> bytes | None:
    out = bytearray()
    while size:
        n = min(size, 4096 - (uva & 0xFFF))
        pfn = user_pfn(cpu, uva)
        if pfn is None:
            return None
        out += cpu.read(va(pfn) + (uva & 0xFFF), n)
        uva += n
        size -= n
    return bytes(out)
