"""The frame-accounting invariants, checked by a full recount from the
pagetables (what Xen's own audit code did in debug builds). They must hold
after every hypercall, every toolstack operation and every restore:

* every machine frame is owned by exactly one domain, by the hypervisor, or free;
* M2P and each guest's p2m agree for every populated pfn: the caller names
  where each p2m list is (the guest's and the toolstack's business; the
  hypervisor does not keep it), and a guest at rest is checked (between a
  decrease_reservation and its MMU_MACHPHYS_UPDATE the two legitimately
  differ, so a per-hypercall audit passes none);
* no present entry of a validated table maps a frame the domain may not map,
  and no writable L1 entry maps a pagetable frame;
* type and reference counts equal what a recount gives, and so does each
  table's linear_pt_count (its linear entries, less the ones mapping it).

``audit`` returns a list of problems (empty when all hold); tests assert it is
empty after every operation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from hypervisor.mm.frames import DOMID_XEN, FREE, PageType
from hypervisor.mm.memory import ENTRIES_PER_TABLE
from hypervisor.mm.pagetable import is_guest_l4_slot
from hypervisor.public.arch_x86 import _PAGE_PRESENT, _PAGE_RW, PTE_FRAME_MASK
from hypervisor.public.xen import INVALID_MFN

if TYPE_CHECKING:
    from hypervisor.domain import Domain
    from hypervisor.machine import Machine


class Audited(Protocol):
    """What the audit reads: a machine and its domains (the core has both)."""

    machine: Machine
    domains: Mapping[int, Domain]

_FRAME = np.uint64(PTE_FRAME_MASK)
# the L4 slots that are Xen's, not the guest's (is_guest_l4_slot's complement)
_XEN_L4_SLOTS = ~np.array([is_guest_l4_slot(s) for s in range(ENTRIES_PER_TABLE)])


@dataclass
class TableEntries:
    """Every present entry of every validated pagetable of every guest, one
    row an entry, in (table, slot) order: the table's mfn and level, the
    entry and the mfn it maps. Xen's own L4 slots are left out; entries that
    map device memory (beyond RAM) are in ``io`` as (table, level, mfn)
    instead."""

    table: np.ndarray
    level: np.ndarray
    pte: np.ndarray
    target: np.ndarray
    io: list[tuple[int, int, int]]


def table_entries(hv: Audited) -> TableEntries:
    """The entries of the validated tables, read in one gather of their frames."""
    ft = hv.machine.frames
    guest = (ft.owner != FREE) & (ft.owner != DOMID_XEN)
    mfns = np.flatnonzero(guest & ft.validated & (ft.type >= 1) & (ft.type <= 4))
    levels = ft.type[mfns].astype(np.int64)
    tables = hv.machine.memory.u64.reshape(-1, ENTRIES_PER_TABLE)[mfns]
    present = (tables & np.uint64(_PAGE_PRESENT)) != 0
    present &= ~((levels == 4)[:, None] & _XEN_L4_SLOTS[None, :])
    rows, slots = np.nonzero(present)
    ptes = tables[rows, slots]
    targets = ((ptes & _FRAME) >> np.uint64(12)).astype(np.int64)
    table, level = mfns[rows], levels[rows]
    io = targets >= ft.nr_frames  # device memory: checked against the domain's I/O ranges
    io_mfns = list(zip(table[io].tolist(), level[io].tolist(), targets[io].tolist(),
                       strict=True))
    ram = ~io
    return TableEntries(table[ram], level[ram], ptes[ram], targets[ram], io_mfns)


def _counts(mfns: np.ndarray, nr_frames: int) -> np.ndarray:
    return np.bincount(mfns, minlength=nr_frames).astype(np.int64)


def recount(hv: Audited, entries: TableEntries | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ref_count, type_count) as the pagetables, pins and VCPUs (their L4s and
    GDT frames) imply them."""
    ft = hv.machine.frames
    e = table_entries(hv) if entries is None else entries
    guest = (ft.owner != FREE) & (ft.owner != DOMID_XEN)
    # a table mapping itself holds no reference
    holds = (e.level == 1) | (e.target != e.table)
    refs = _counts(e.target[holds], ft.nr_frames)
    refs[guest & ft.allocated] += 1  # the allocation reference
    typed = holds & ((e.level > 1) | ((e.pte & np.uint64(_PAGE_RW)) != 0))
    types = _counts(e.target[typed], ft.nr_frames)
    pinned = np.flatnonzero(ft.pinned & guest)
    refs[pinned] += 1
    types[pinned] += 1
    for dom in hv.domains.values():
        for v in dom.vcpus:
            for mfn in (v.guest_table, v.guest_table_user, *v.gdt_frames):
                if mfn:
                    refs[mfn] += 1
                    types[mfn] += 1
    return refs, types


def linear_recount(hv: Audited, entries: TableEntries | None = None) -> np.ndarray:
    """linear_pt_count as the tables imply it: +1 per linear entry a table
    holds (one mapping another table of its own level), -1 per such entry
    mapping it; a table mapping itself counts for neither."""
    ft = hv.machine.frames
    e = table_entries(hv) if entries is None else entries
    lin = (e.level > 1) & (ft.type[e.target] == e.level) & (e.target != e.table)
    return _counts(e.table[lin], ft.nr_frames) - _counts(e.target[lin], ft.nr_frames)


def _linear_problems(hv: Audited, guest: np.ndarray, entries: TableEntries) -> list[str]:
    ft = hv.machine.frames
    recounted = linear_recount(hv, entries)
    bad = np.flatnonzero(guest & (recounted != ft.linear.astype(np.int64)))
    return [f"mfn {mfn:#x}: linear_pt_count {int(ft.linear[mfn])}, recount {recounted[mfn]}"
            for mfn in bad[:5].tolist()]


def _first_per_table(e: TableEntries, where: np.ndarray) -> list[tuple[int, int, int]]:
    """(table, level, target) of the first entry of each table where ``where`` holds."""
    tables, first = np.unique(e.table[where], return_index=True)
    level, target = e.level[where][first], e.target[where][first]
    return list(zip(tables.tolist(), level.tolist(), target.tolist(), strict=True))


def _mapping_problems(hv: Audited, e: TableEntries) -> list[str]:
    """Every present entry of a validated table maps a frame of the same
    domain, and no writable L1 entry maps a pagetable; by table, in mfn order."""
    ft = hv.machine.frames
    found = [(t, 0, f"L{lv} {t:#x} maps frame {m:#x} of another owner")
             for t, lv, m in _first_per_table(e, ft.owner[e.target] != ft.owner[e.table])]
    ty = ft.type[e.target]
    pt = (e.level == 1) & ((e.pte & np.uint64(_PAGE_RW)) != 0) & (ty >= 1) & (ty <= 4) \
        & (ft.type_count[e.target] > 0)
    found += [(t, 1, f"L1 {t:#x} maps pagetable {m:#x} writable")
              for t, _lv, m in _first_per_table(e, pt)]
    return [msg for _t, _k, msg in sorted(found)]


# domid -> (the frames holding its p2m list, the number of entries)
P2mLists = Mapping[int, tuple[Sequence[int], int]]


def audit(hv: Audited, p2m_lists: P2mLists | None = None) -> list[str]:
    """Every invariant that fails; the p2m check for the lists given."""
    ft = hv.machine.frames
    problems: list[str] = []
    known = {FREE, DOMID_XEN, *hv.domains}
    for owner in np.unique(ft.owner).tolist():
        if owner not in known:
            problems.append(f"frames owned by unknown domain {owner}")
    free = ft.free_mfns()
    if free.size != int((ft.owner == FREE).sum()):
        problems.append("free list and owner table disagree")
    if np.unique(free).size != free.size:
        problems.append("a frame is on the free list twice")

    guest = (ft.owner != FREE) & (ft.owner != DOMID_XEN)
    entries = table_entries(hv)
    refs, types = recount(hv, entries)
    bad = np.flatnonzero(guest & (refs != ft.ref_count.astype(np.int64)))
    for mfn in bad[:5].tolist():
        problems.append(f"mfn {mfn:#x}: ref_count {int(ft.ref_count[mfn])}, recount {refs[mfn]}")
    bad = np.flatnonzero(guest & (types != ft.type_count.astype(np.int64)))
    for mfn in bad[:5].tolist():
        problems.append(f"mfn {mfn:#x}: type_count {int(ft.type_count[mfn])} "
                        f"(type {PageType(int(ft.type[mfn])).name}), recount {types[mfn]}")
    problems += _mapping_problems(hv, entries)
    problems += _linear_problems(hv, guest, entries)

    permitted = hv.machine.types.iomem_permitted
    for table, level, mfn in entries.io:
        if level != 1 or not permitted(int(ft.owner[table]), mfn):
            problems.append(f"L{level} {table:#x} maps device memory {mfn:#x} it was not given")

    # M2P <-> p2m, for the domains whose p2m list the caller names
    for domid, (frames, size) in (p2m_lists or {}).items():
        dom = hv.domains.get(domid)
        if dom is None or not size:
            continue
        p2m = _guest_p2m(hv, frames, size)
        populated = p2m != INVALID_MFN
        mfns = p2m[populated].astype(np.int64)
        pfns = np.flatnonzero(populated)
        wrong = pfns[hv.machine.m2p[mfns] != pfns.astype(np.uint64)]
        if wrong.size:
            problems.append(f"domain {dom.domid}: M2P and p2m disagree at pfn {int(wrong[0]):#x}")
        if (ft.owner[mfns] != dom.domid).any():
            problems.append(f"domain {dom.domid}: its p2m lists a frame it does not own")
    return problems


def _guest_p2m(hv: Audited, frames: Sequence[int], size: int) -> np.ndarray:
    """The guest's own p2m list, read from its frames."""
    mem = hv.machine.memory
    out = np.empty(size, dtype=np.uint64)
    for i, mfn in enumerate(frames):
        chunk = mem.frame(int(mfn))
        n = min(512, size - 512 * i)
        out[512 * i:512 * i + n] = chunk[:n]
    return out
