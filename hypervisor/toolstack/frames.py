"""The frame table of a domain, as ``pvlab frames`` prints it: per frame its
pfn (from the M2P), mfn, type, counts and pinned bit, and a summary per type."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor, PageType
from hypervisor.public.xen import INVALID_MFN

TYPE_NAMES = {PageType.none: "none", PageType.writable: "writable", PageType.l1: "L1",
              PageType.l2: "L2", PageType.l3: "L3", PageType.l4: "L4"}


@dataclass(frozen=True)
class FrameInfo:
    pfn: int | None
    mfn: int
    type: str
    type_count: int
    ref_count: int
    pinned: bool
    validated: bool
    shared: bool  # a hypervisor page shared with the domain (shared_info)


def frame_table(hv: Hypervisor, dom: Domain) -> list[FrameInfo]:
    """Every frame the domain owns, in pfn order (frames with no pfn last)."""
    d = domctl.dump_frames(hv, dom)
    rows = []
    for i, (mfn, pfn) in enumerate(zip(d.mfns.tolist(), d.pfns.tolist(), strict=True)):
        t = int(d.type[i])
        # a type with no type reference left is only history: show it as such
        name = TYPE_NAMES.get(PageType(t), str(t)) if d.type_count[i] else "none"
        rows.append(FrameInfo(None if pfn == INVALID_MFN else int(pfn), mfn, name,
                              int(d.type_count[i]), int(d.ref_count[i]), bool(d.pinned[i]),
                              bool(d.validated[i]), bool(d.xenheap[i])))
    rows.sort(key=lambda r: (r.pfn is None, r.pfn or 0, r.mfn))
    return rows


def summary(rows: list[FrameInfo]) -> dict[str, tuple[int, int]]:
    """type -> (frames, of which pinned)."""
    count = Counter(r.type for r in rows)
    pinned = Counter(r.type for r in rows if r.pinned)
    order = ["L4", "L3", "L2", "L1", "writable", "none"]
    return {t: (count[t], pinned[t]) for t in order if count[t]}


def format_table(dom: Domain, rows: list[FrameInfo], types: set[str] | None = None) -> str:
    lines = [f"domain {dom.domid} ({dom.name}): {len(rows)} frames, "
             f"{dom.tot_pages} in its reservation of at most {dom.max_pages}",
             f"{'pfn':>8} {'mfn':>8} {'type':<9} {'tcount':>6} {'refs':>5} pinned"]
    for r in rows:
        if types is not None and r.type not in types:
            continue
        pfn = f"{r.pfn:#x}" if r.pfn is not None else ("shared" if r.shared else "-")
        lines.append(f"{pfn:>8} {r.mfn:#8x} {r.type:<9} {r.type_count:>6} {r.ref_count:>5} "
                     f"{'pinned' if r.pinned else ''}")
    return "\n".join(lines)


def format_summary(rows: list[FrameInfo]) -> str:
    lines = ["summary:", f"  {'type':<9} {'frames':>7} {'pinned':>7}"]
    for t, (n, p) in summary(rows).items():
        lines.append(f"  {t:<9} {n:>7} {p:>7}")
    return "\n".join(lines)

