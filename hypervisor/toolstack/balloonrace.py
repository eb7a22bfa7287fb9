"""The balloon during post-copy, on a machine without a guest: the invariants
that must hold whatever the guest and the pages do, and a harness that makes
them happen in any order.

The harness holds one domain with the real balloon device and the real absent
frames (hypervisor/mm/absent.py), a test pager that stands for post-copy's
receiver, and a scripted guest that does what the balloon driver does:

* the pager keeps its own table of which frame each pfn's page goes to, made
  when it evicted them, and places a page that arrives by that table (Otto's
  Xen post-copy destination: a pfn is outstanding until its page is placed,
  or until the pager is told the guest dropped it, MEM_PAGING_DROP_PAGE,
  which pvlab does not have); a touch of an absent frame fetches it at once;
* the guest inflates a pfn as fill_balloon does (its p2m entry invalid, the
  frame named in an inflate request), deflates as leak_balloon does (a fresh
  frame from populate_physmap for the pfn, named in a deflate request, then
  used), writes its pages, and while the inhibit is held may take an inflated
  frame itself back (a deflate request naming it, its pfn back in the M2P);
* the release is post-copy's end: every page still outstanding arrives, then
  ``postcopy_release``.

``check`` lists every invariant that fails: a lab's grader calls it on the
same state. With no inhibit during post-copy, an inflate of a frame still
absent lets the frame be freed and handed out again while the pager still
holds it for its pfn: the page that arrives then lands on another pfn's data,
which ``check`` reports (QEMU's reason to inhibit the balloon).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import Balloon, Domain, DomctlError, Hypervisor
from hypervisor.public.xen import INVALID_MFN
from hypervisor.toolstack import balloonctl

WORDS = 512        # u64 in a page
VERSION_BITS = 20  # a stamp is pfn << VERSION_BITS | version


def stamp(pfn: int, version: int) -> int:
    """What every word of pfn's page holds after its ``version``-th write."""
    return pfn << VERSION_BITS | version


@dataclass
class FreeLog:
    """Every frame the balloon gave back, wrapped around its remove_page:
    what was wrong at the moment of the free."""

    hv: Hypervisor
    freed: set[int] = field(default_factory=set)   # freed, not handed out since
    wrong: list[str] = field(default_factory=list)
    count: int = 0

    def watch(self, bal: Balloon) -> None:
        remove = bal.host.remove_page

        def remove_page(mfn: int) -> int:
            self.count += 1
            if mfn in self.freed:
                self.wrong.append(f"mfn {mfn:#x} freed twice")
            if domctl.mem_paging_absent(self.hv, np.array([mfn]))[0]:
                self.wrong.append(f"mfn {mfn:#x} freed while absent")
            self.freed.add(mfn)
            return remove(mfn)
        bal.host = dataclasses.replace(bal.host, remove_page=remove_page)

    def handed_out(self, mfn: int) -> None:
        self.freed.discard(mfn)


def check(hv: Hypervisor, dom: Domain, p2m: np.ndarray, versions: Mapping[int, int],
          left: set[int], log: FreeLog | None = None) -> list[str]:
    """Every invariant that fails, for ``dom`` whose guest's p2m is ``p2m``:
    each frame free or owned by one domain (the audit); the frees (``log``);
    every mapped pfn on a frame of the domain's, its own, holding its own
    data (its ``versions`` stamp) unless still absent; the account: the
    domain's frames are its mapped pfns' and ``left``, what the policy left
    it without a pfn."""
    found = domctl.audit(hv)
    if log is not None:
        found += log.wrong
    mapped = np.flatnonzero(p2m != INVALID_MFN)
    mfns = p2m[mapped].astype(np.int64)
    found += _mapping(hv, dom, mapped, mfns)
    found += _data(hv, dom, mapped, mfns, versions)
    d = domctl.dump_frames(hv, dom)
    owned = set(d.mfns[~d.xenheap].tolist())  # shared_info is the hypervisor's
    extra, missing = owned - set(mfns.tolist()) - left, left - owned
    if extra:
        found.append(f"frames of the domain's neither mapped nor left by the policy "
                     f"(lost): {sorted(extra)[:5]}")
    if missing:
        found.append(f"frames the policy should have left are gone: {sorted(missing)[:5]}")
    return found


def _mapping(hv: Hypervisor, dom: Domain, pfns: np.ndarray, mfns: np.ndarray) -> list[str]:
    d = domctl.dump_frames(hv)
    found = []
    if (d.owner[mfns] != dom.domid).any():
        found.append(f"pfns on frames not the domain's: {pfns[d.owner[mfns] != dom.domid][:5]}")
    if np.unique(mfns).size != mfns.size:
        found.append("two pfns on one frame")
    wrong = d.pfns[mfns] != pfns.astype(np.uint64)
    if wrong.any():
        found.append(f"M2P and p2m disagree at pfns {pfns[wrong][:5].tolist()}")
    return found


def _data(hv: Hypervisor, dom: Domain, pfns: np.ndarray, mfns: np.ndarray,
          versions: Mapping[int, int]) -> list[str]:
    """Each present mapped page of the domain's holds its own stamp (an
    absent one is read by nobody here: reading would fetch it)."""
    here = ~domctl.mem_paging_absent(hv, mfns) & (domctl.dump_frames(hv).owner[mfns]
                                                   == dom.domid)
    pfns, mfns = pfns[here], mfns[here]
    if not mfns.size:
        return []
    pages = np.asarray(domctl.map_foreign_bulk(hv, dom, mfns))
    want = np.array([stamp(p, versions[p]) for p in pfns.tolist()], dtype=np.uint64)
    bad = ((pages[:, 0] != want) | (pages[:, -1] != want)).nonzero()[0]
    return [f"pfn {pfns[i]:#x} holds {_whose(int(pages[i, 0]))}, not its own version "
            f"{versions[int(pfns[i])]}" for i in bad[:5].tolist()]


def _whose(word: int) -> str:
    if not word:
        return "zeros"
    return f"pfn {word >> VERSION_BITS:#x}'s version {word & ((1 << VERSION_BITS) - 1)}"


class Pager:
    """Post-copy's receiver for one domain: every pfn's page is at the
    source (version 1) until it arrives or is touched."""

    def __init__(self, hv: Hypervisor, dom: Domain, p2m: np.ndarray) -> None:
        self.hv, self.dom = hv, dom
        self.mfn_of = {pfn: int(m) for pfn, m in enumerate(p2m.tolist())}
        self.pfn_of = {m: pfn for pfn, m in self.mfn_of.items()}
        self.outstanding = set(self.mfn_of)
        domctl.mem_paging_setup(hv, self.fetch)
        domctl.mem_paging_evict(hv, dom, np.array(sorted(self.pfn_of), dtype=np.int64))

    def _page(self, pfn: int) -> np.ndarray:
        return np.full((1, WORDS), stamp(pfn, 1), dtype=np.uint64)

    def fetch(self, mfns: np.ndarray) -> None:
        """A touch of absent frames: their pages now (the fault path)."""
        pfns = [self.pfn_of[m] for m in mfns.tolist()]
        domctl.write_absent(self.hv, mfns, np.concatenate([self._page(p) for p in pfns]))
        self.outstanding -= set(pfns)

    def arrive(self, pfn: int) -> None:
        """pfn's page arrives from the source and is placed by the table."""
        if pfn in self.outstanding:
            self.outstanding.discard(pfn)
            mfn = np.array([self.mfn_of[pfn]], dtype=np.int64)
            domctl.write_absent(self.hv, mfn, self._page(pfn))
            domctl.mem_paging_loaded(self.hv, mfn)

    def finish(self) -> None:
        """The rest of the pages, lowest pfn first: post-copy is over."""
        for pfn in sorted(self.outstanding):
            self.arrive(pfn)
        domctl.mem_paging_setup(self.hv, None)


class Harness:
    """One domain of ``nr_pages`` pages and ``spare`` more of reservation,
    its balloon under ``policy`` (None: no inhibit ever), its memory at the
    source when ``postcopy``. Steps take an index and pick their pfn with it,
    so that any list of steps is a valid schedule."""

    def __init__(self, policy: str | None, postcopy: bool = True, nr_pages: int = 48,
                 spare: int = 16, seed: int = 1) -> None:
        self.hv = Hypervisor(4, seed=seed)
        self.dom = domctl.createdomain(self.hv, "balloon", 1, nr_pages + spare)
        self.bal = domctl.add_virtio_balloon(self.hv, self.dom, domctl.next_mmio_base(self.hv),
                                             1, 0, False, policy or "drop")
        self.log = FreeLog(self.hv)
        self.log.watch(self.bal)
        self.p2m = domctl.populate_physmap(self.hv, self.dom, nr_pages).astype(np.uint64)
        domctl.mmu_machphys_update(self.hv, self.dom, self.p2m, np.arange(nr_pages))
        domctl.map_foreign_bulk(self.hv, self.dom, self.p2m.astype(np.int64))[:] = \
            np.array([[stamp(p, 1)] * WORDS for p in range(nr_pages)], dtype=np.uint64)
        self.versions = dict.fromkeys(range(nr_pages), 1)
        self.ballooned: dict[int, int] = {}  # pfn -> the frame its inflate named
        self.left: set[int] = set()          # frames the policy leaves without a pfn
        self.policy = policy
        self.pager = Pager(self.hv, self.dom, self.p2m) if postcopy else None
        self.inhibited = policy is not None and postcopy
        if self.inhibited:
            balloonctl.postcopy_inhibit(self.dom)

    def close(self) -> None:
        self.hv.close()

    def violations(self) -> list[str]:
        return check(self.hv, self.dom, self.p2m, self.versions, self.left, self.log)

    def _pick(self, pfns: list[int], i: int) -> int | None:
        return sorted(pfns)[i % len(pfns)] if pfns else None

    def mapped(self) -> list[int]:
        return np.flatnonzero(self.p2m != INVALID_MFN).tolist()

    # --- the guest's steps ------------------------------------------------------------

    def inflate(self, i: int) -> None:
        """fill_balloon of one page: its p2m entry invalid, its frame named."""
        pfn = self._pick(self.mapped(), i)
        if pfn is None:
            return
        mfn = int(self.p2m[pfn])
        self.p2m[pfn] = INVALID_MFN
        self.ballooned[pfn] = mfn
        if self.bal.inflate_frame(mfn):
            self.dom.flush_tlbs()
        elif self.inhibited:
            self.left.add(mfn)

    def deflate(self, i: int) -> None:
        """leak_balloon of one page: a fresh frame (within the reservation),
        named in a deflate request, then used."""
        pfn = self._pick(list(self.ballooned), i)
        if pfn is None or self.dom.tot_pages >= self.dom.max_pages:
            return  # "only 0 of 1 pages could be given frames again"
        mfn = int(domctl.populate_physmap(self.hv, self.dom, 1)[0])
        self.log.handed_out(mfn)
        domctl.mmu_machphys_update(self.hv, self.dom, np.array([mfn]), np.array([pfn]))
        del self.ballooned[pfn]
        self.p2m[pfn] = mfn
        self.bal.deflate_frame(mfn)
        self.write(pfn, exact=True)

    def reuse(self, i: int) -> None:
        """While inhibited only: the guest takes its inflated frame itself
        back (a deflate request naming it) and uses it."""
        pfn = self._pick(list(self.ballooned), i)
        if pfn is None or not self.inhibited:
            return
        mfn = self.ballooned.pop(pfn)
        try:
            domctl.mmu_machphys_update(self.hv, self.dom, np.array([mfn]), np.array([pfn]))
        except DomctlError as e:
            raise AssertionError(f"mfn {mfn:#x} left the domain while inhibited") from e
        self.p2m[pfn] = mfn
        self.left.discard(mfn)
        self.bal.deflate_frame(mfn)
        self.write(pfn, exact=True)

    def write(self, i: int, exact: bool = False) -> None:
        """The guest writes one of its pages whole (a touch: an absent
        frame is fetched first)."""
        pfn = i if exact else self._pick(self.mapped(), i)
        if pfn is None:
            return
        self.versions[pfn] += 1
        page = domctl.map_foreign_bulk(self.hv, self.dom, [int(self.p2m[pfn])])
        page[0][:] = stamp(pfn, self.versions[pfn])

    # --- post-copy's steps ------------------------------------------------------------

    def arrive(self, i: int) -> None:
        if self.pager is not None:
            pfn = self._pick(list(self.pager.outstanding), i)
            if pfn is not None:
                self.pager.arrive(pfn)

    def release(self, i: int = 0) -> None:
        """The last pages arrive, then the inhibit goes (post-copy's end)."""
        if self.pager is None:
            return
        self.pager.finish()
        self.pager = None
        if self.inhibited:
            self.inhibited = False
            balloonctl.postcopy_release(self.dom)
            if self.policy == "reconcile":
                self.left.clear()


STEPS = ("inflate", "deflate", "reuse", "write", "arrive", "release")
