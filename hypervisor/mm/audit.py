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

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from hypervisor.mm.frames import DOMID_XEN, FREE, PageType
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


def validated_tables(hv: Audited, io_mfns: list[tuple[int, int, int]] | None = None,
                     ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(mfn, level, present ptes, their target mfns) for every validated
    pagetable of every guest; Xen's own L4 slots are left out, and entries
    that map device memory (beyond RAM) go to ``io_mfns`` as (table, level,
    mfn) instead."""
    if io_mfns is None:
        io_mfns = []
    ft = hv.machine.frames
    mem = hv.machine.memory
    guest = (ft.owner != FREE) & (ft.owner != DOMID_XEN)
    for mfn in np.flatnonzero(guest & ft.validated & (ft.type >= 1) & (ft.type <= 4)).tolist():
        level = int(ft.type[mfn])
        t = mem.frame(mfn)
        slots = np.flatnonzero(t & np.uint64(_PAGE_PRESENT))
        if level == 4:
            slots = slots[[is_guest_l4_slot(s) for s in slots.tolist()]]
        ptes = t[slots]
        targets = ((ptes & _FRAME) >> np.uint64(12)).astype(np.int64)
        io = targets >= ft.nr_frames
        if io.any():  # device memory: checked against the domain's I/O ranges
            io_mfns.extend((mfn, level, int(m)) for m in targets[io].tolist())
            ptes, targets = ptes[~io], targets[~io]
        yield mfn, level, ptes, targets


def recount(hv: Audited) -> tuple[np.ndarray, np.ndarray]:
    """(ref_count, type_count) as the pagetables, pins and VCPUs (their L4s and
    GDT frames) imply them."""
    ft = hv.machine.frames
    refs = np.zeros(ft.nr_frames, dtype=np.int64)
    types = np.zeros(ft.nr_frames, dtype=np.int64)
    guest = (ft.owner != FREE) & (ft.owner != DOMID_XEN)
    refs[guest & ft.allocated] += 1  # the allocation reference
    for mfn, level, ptes, targets in validated_tables(hv):
        if level > 1:  # a table mapping itself holds no reference
            ptes, targets = ptes[targets != mfn], targets[targets != mfn]
        np.add.at(refs, targets, 1)
        if level == 1:
            np.add.at(types, targets[(ptes & np.uint64(_PAGE_RW)) != 0], 1)
        else:
            np.add.at(types, targets, 1)
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


def linear_recount(hv: Audited) -> np.ndarray:
    """linear_pt_count as the tables imply it: +1 per linear entry a table
    holds (one mapping another table of its own level), -1 per such entry
    mapping it; a table mapping itself counts for neither."""
    ft = hv.machine.frames
    linear = np.zeros(ft.nr_frames, dtype=np.int64)
    for mfn, level, _ptes, targets in validated_tables(hv):
        if level > 1:
            lin = targets[(ft.type[targets] == level) & (targets != mfn)]
            linear[mfn] += lin.size
            np.subtract.at(linear, lin, 1)
    return linear


def _linear_problems(hv: Audited, guest: np.ndarray) -> list[str]:
    ft = hv.machine.frames
    recounted = linear_recount(hv)
    bad = np.flatnonzero(guest & (recounted != ft.linear.astype(np.int64)))
    return [f"mfn {mfn:#x}: linear_pt_count {int(ft.linear[mfn])}, recount {recounted[mfn]}"
            for mfn in bad[:5].tolist()]


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
    if len(ft._free) != int((ft.owner == FREE).sum()):
        problems.append("free list and owner table disagree")
    if len(set(ft._free)) != len(ft._free):
        problems.append("a frame is on the free list twice")

    guest = (ft.owner != FREE) & (ft.owner != DOMID_XEN)
    refs, types = recount(hv)
    bad = np.flatnonzero(guest & (refs != ft.ref_count.astype(np.int64)))
    for mfn in bad[:5].tolist():
        problems.append(f"mfn {mfn:#x}: ref_count {int(ft.ref_count[mfn])}, recount {refs[mfn]}")
    bad = np.flatnonzero(guest & (types != ft.type_count.astype(np.int64)))
    for mfn in bad[:5].tolist():
        problems.append(f"mfn {mfn:#x}: type_count {int(ft.type_count[mfn])} "
                        f"(type {PageType(int(ft.type[mfn])).name}), recount {types[mfn]}")

    # every present entry of a validated table maps a frame of the same domain,
    # or device memory the domain was given, and no writable L1 entry maps a
    # pagetable
    io: list[tuple[int, int, int]] = []
    for mfn, level, ptes, targets in validated_tables(hv, io):
        foreign = targets[ft.owner[targets] != ft.owner[mfn]]
        if foreign.size:
            problems.append(f"L{level} {mfn:#x} maps frame {int(foreign[0]):#x} of another owner")
        if level == 1:
            rw = targets[(ptes & np.uint64(_PAGE_RW)) != 0]
            pt = rw[(ft.type[rw] >= 1) & (ft.type[rw] <= 4) & (ft.type_count[rw] > 0)]
            if pt.size:
                problems.append(f"L1 {mfn:#x} maps pagetable {int(pt[0]):#x} writable")

    problems += _linear_problems(hv, guest)

    permitted = hv.machine.types.iomem_permitted
    for table, level, mfn in io:
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
