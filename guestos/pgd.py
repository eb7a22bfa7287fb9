"""The pgd_list and pinning, as Linux's arch/x86/xen/mmu_pv.c has them.

Every task's pgd (its user L4) is on the pgd_list from the moment it is built
until it is freed. It is built as ordinary pages, pinned before its first use
(its tables made read-only in the kernel's mapping, then MMUEXT_PIN_L4_TABLE,
which has Xen validate the whole tree), unpinned when the task exits, and
freed. PG_pinned in mem_map says which. A save first pins the pgds that are
not (xen_mm_pin_all: tasks under construction or teardown), marking them
PG_savepinned, and resume unpins exactly those (xen_mm_unpin_all).
"""

from __future__ import annotations

from guestos.hypercall import mmuext
from guestos.kdata import AREAS, MAX_TASKS
from guestos.mm import (
    FRAME,
    PG_PINNED,
    PG_SAVEPINNED,
    PG_TABLE,
    KernelPanic,
    free_page,
    our_pfn,
    page_flags,
    pfn_to_mfn,
    set_page_flags,
    set_page_ro,
    va,
)
from hypervisor.public.arch_x86 import _PAGE_PRESENT
from hypervisor.public.native import NativeCpu
from hypervisor.public.xen import MMUEXT_PIN_L4_TABLE, MMUEXT_UNPIN_TABLE

USER_L4_SLOTS = 256  # the lower half: the user's part of a pgd


# --- the list --------------------------------------------------------------------

def pgd_list(cpu: NativeCpu) -> list[int]:
    """The pfns of every pgd the kernel has built and not yet freed."""
    raw = cpu.read(AREAS["pgd_list"].va(cpu), 8 * MAX_TASKS)
    return [p for p in (int.from_bytes(raw[i:i + 8], "little")
                        for i in range(0, len(raw), 8)) if p]


def pgd_list_add(cpu: NativeCpu, pfn: int) -> None:
    """Put a new pgd on the list (Linux's pgd_list_add, from pgd_ctor)."""
    base = AREAS["pgd_list"].va(cpu)
    for i in range(MAX_TASKS):
        if not cpu.read_u64(base + 8 * i):
            cpu.write_u64(base + 8 * i, pfn)
            return
    raise KernelPanic("pgd_list is full")


def pgd_list_del(cpu: NativeCpu, pfn: int) -> None:
    """Take a pgd off the list as it is freed (Linux's pgd_list_del, from pgd_dtor)."""
    base = AREAS["pgd_list"].va(cpu)
    for i in range(MAX_TASKS):
        if cpu.read_u64(base + 8 * i) == pfn:
            cpu.write_u64(base + 8 * i, 0)
            return
    raise KernelPanic(f"pgd {pfn:#x} is not on the pgd_list")


def pgd_pinned(cpu: NativeCpu, pfn: int) -> bool:
    return bool(page_flags(cpu, pfn) & PG_PINNED)


# --- walking a pgd -----------------------------------------------------------------

def _pfn_of_entry(cpu: NativeCpu, pgd: int, level: int, slot: int, e: int) -> int:
    """The pfn an entry of one of pgd's tables maps. A pgd that went through a
    save unpinned was never canonicalised: on the new machine its entries hold
    the old machine's mfns, which name no frame of ours or the wrong one.
    Either is found here, before Xen is asked to pin a tree of garbage."""
    mfn = (e & FRAME) >> 12
    stale = "a stale mfn: was this pgd saved unpinned, its mfns never canonicalised?"
    pfn = our_pfn(cpu, mfn)
    if pfn is None:
        raise KernelPanic(f"pgd {pgd:#x}: L{level} entry {slot} holds mfn {mfn:#x}, which "
                          f"is not this domain's ({stale})")
    if level > 1 and not page_flags(cpu, pfn) & PG_TABLE:
        raise KernelPanic(f"pgd {pgd:#x}: L{level} entry {slot} holds mfn {mfn:#x}, pfn "
                          f"{pfn:#x}, which is no pagetable page ({stale})")
    return pfn


def pgd_walk(cpu: NativeCpu, pgd: int) -> tuple[list[int], list[int]]:
    """(table pfns, pfns the L1s map) of the user part of a pgd, read through
    the kernel's mapping and the M2P (the tables hold machine frames)."""
    tables, leaves = [pgd], []
    level = [pgd]
    for depth in range(3):  # L4 -> L3 -> L2 -> L1
        nxt = []
        for t in level:
            raw = cpu.read(va(t), 4096)
            n = USER_L4_SLOTS if depth == 0 else 512
            for i in range(n):
                e = int.from_bytes(raw[8 * i:8 * i + 8], "little")
                if e & _PAGE_PRESENT:
                    nxt.append(_pfn_of_entry(cpu, pgd, 4 - depth, i, e))
        tables += nxt
        level = nxt
    for t in level:
        raw = cpu.read(va(t), 4096)
        for i in range(512):
            e = int.from_bytes(raw[8 * i:8 * i + 8], "little")
            if e & _PAGE_PRESENT:
                leaves.append(_pfn_of_entry(cpu, pgd, 1, i, e))
    return tables, leaves


# --- pin, unpin, free -------------------------------------------------------------

def pgd_pin(cpu: NativeCpu, pgd: int) -> None:
    """xen_pgd_pin: every table read-only in the kernel's mapping, then pin the L4."""
    tables, _ = pgd_walk(cpu, pgd)
    for t in tables:
        set_page_ro(cpu, t)
    rc = mmuext(cpu, MMUEXT_PIN_L4_TABLE, pfn_to_mfn(cpu, pgd))
    if rc:
        raise KernelPanic(f"pinning pgd {pgd:#x} failed: {rc}")
    for t in tables:
        set_page_flags(cpu, t, set_=PG_PINNED)


def pgd_unpin(cpu: NativeCpu, pgd: int) -> None:
    """xen_pgd_unpin: unpin the L4, then the tables are writable pages again."""
    rc = mmuext(cpu, MMUEXT_UNPIN_TABLE, pfn_to_mfn(cpu, pgd))
    if rc:
        raise KernelPanic(f"unpinning pgd {pgd:#x} failed: {rc}")
    tables, _ = pgd_walk(cpu, pgd)
    for t in tables:
        set_page_ro(cpu, t, ro=False)
        set_page_flags(cpu, t, clear=PG_PINNED | PG_SAVEPINNED)


def pgd_free(cpu: NativeCpu, pgd: int) -> None:
    """Free an unpinned pgd with every page it maps, and take it off the list."""
    if pgd_pinned(cpu, pgd):
        raise KernelPanic(f"freeing pgd {pgd:#x} while it is pinned")
    tables, leaves = pgd_walk(cpu, pgd)
    pgd_list_del(cpu, pgd)
    for p in leaves + tables[::-1]:
        free_page(cpu, p)


def xen_mm_pin_all(cpu: NativeCpu) -> int:
    """Pin every pgd that is not pinned, marking it PG_savepinned; returns how many."""
    n = 0
    for pgd in pgd_list(cpu):
        if not pgd_pinned(cpu, pgd):
            pgd_pin(cpu, pgd)
            set_page_flags(cpu, pgd, set_=PG_SAVEPINNED)
            n += 1
    return n


def xen_mm_unpin_all(cpu: NativeCpu) -> int:
    """Unpin exactly the pgds xen_mm_pin_all pinned; returns how many."""
    n = 0
    for pgd in pgd_list(cpu):
        if page_flags(cpu, pgd) & PG_SAVEPINNED:
            pgd_unpin(cpu, pgd)
            n += 1
    return n
