"""copy_from_user and copy_to_user: the kernel's L4 does not map user memory
(each task has its own user L4), so the kernel walks the running task's
tables itself, reading them through its own read-only mapping and the M2P,
and reaches the user's page through its own mapping of every pfn."""

from __future__ import annotations

from guestos.mm import FRAME, mfn_to_pfn, va
from guestos.task import cpu_rq
from hypervisor.public.arch_x86 import _PAGE_PRESENT, _PAGE_RW
from hypervisor.public.native import NativeCpu


def user_pte(cpu: NativeCpu, uva: int) -> tuple[int, int] | None:
    """(pfn, the L1 entry) that maps ``uva`` for the running task, or None."""
    pfn, e = cpu_rq(cpu).user_pgd, 0
    for shift in (39, 30, 21, 12):
        e = cpu.read_u64(va(pfn) + 8 * ((uva >> shift) & 511))
        if not e & _PAGE_PRESENT:
            return None
        pfn = mfn_to_pfn(cpu, (e & FRAME) >> 12)
    return pfn, e


def user_pfn(cpu: NativeCpu, uva: int) -> int | None:
    pte = user_pte(cpu, uva)
    return None if pte is None else pte[0]


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


def copy_to_user(cpu: NativeCpu, uva: int, data: bytes) -> bool:
    """Write ``data`` at ``uva``; False (nothing written) if a page of it is
    not mapped writable for the task, as a user store would have faulted."""
    pages = []
    for page in range(uva & ~0xFFF, uva + len(data), 4096):
        pte = user_pte(cpu, page)
        if pte is None or not pte[1] & _PAGE_RW:
            return False
        pages.append(pte[0])
    done = 0
    for pfn in pages:
        off = (uva + done) & 0xFFF
        n = min(len(data) - done, 4096 - off)
        cpu.write(va(pfn) + off, data[done:done + n])
        done += n
    return True
