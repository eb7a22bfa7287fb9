"""What pvlab's pictures are drawn from, gathered from real runs: the machine's
frames by owner, type and pin state; a guest's pfn -> mfn map before a save and
after its restore on other frames; the balloon's pages over virtual time; a
live save's rounds and its downtime. (The
suspend path's timeline is timeline.py's.) Drawing is plots.py's: nothing here
knows how a picture looks."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import BalloonError, Domain, FrameDump, Hypervisor, PageType
from hypervisor.public.xen import DOMID_XEN, INVALID_MFN, PAGE_SIZE
from hypervisor.toolstack.balloonctl import balloon_of, guest_pages
from hypervisor.toolstack.config import DomainConfig
from hypervisor.toolstack.context import domain_of
from hypervisor.toolstack.control import SAVE, Request
from hypervisor.toolstack.precopy import MigrationInfo, PrecopyOptions
from hypervisor.toolstack.restore import restore_image, restore_stream
from hypervisor.toolstack.session import (
    Observer,
    boot,
    live_save,
    run_domain,
    suspend_and_save,
)
from hypervisor.toolstack.timeparse import format_duration

FREE_OWNER = -1  # the frame table's owner of a free frame

# a frame's category, in the pictures' legend order
CATEGORIES = ("free", "xen", "shared_info", "p2m list", "data", "L1", "L2", "L3", "L4",
              "seg_desc", "other domain")
_BY_TYPE = {PageType.l1: "L1", PageType.l2: "L2", PageType.l3: "L3", PageType.l4: "L4",
            PageType.seg_desc: "seg_desc"}
PAGETABLES = ("L1", "L2", "L3", "L4")


class PlotDataError(Exception):
    """The run gave nothing to draw: one line saying why."""


class Machines:
    """The machines a picture's runs make, closed together when it is drawn."""

    def __init__(self) -> None:
        self.made: list[Hypervisor] = []

    def boot(self, cfg: DomainConfig, seed: int | None = None,
             sched_seed: int | None = None) -> tuple[Hypervisor, Domain]:
        hv, dom = boot(cfg, seed=seed, sched_seed=sched_seed)
        self.made.append(hv)
        return hv, dom

    def restore(self, image: Path, seed: int | None = None) -> tuple[Hypervisor, Domain]:
        hv, dom, _ = restore_image(image, seed=seed)
        self.made.append(hv)
        return hv, dom

    def receive(self, image: Path) -> float:
        """The image received as a migration's stream (restore_stream):
        the host time from its last octet read to the domain ready to run."""
        with open(image, "rb") as f:
            src = _TimedReader(f)
            hv, _, _ = restore_stream(src)  # type: ignore[arg-type]
            done = time.perf_counter()
        self.made.append(hv)
        return done - src.last


class _TimedReader:
    """A stream being read, with the host time of its last read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.last = f, time.perf_counter()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.last = time.perf_counter()
        return data


@contextmanager
def closing_machines() -> Iterator[Machines]:
    machines = Machines()
    try:
        yield machines
    finally:
        for hv in machines.made:
            hv.close()


def category_index(name: str) -> int:
    return CATEGORIES.index(name)


def type_categories(d: FrameDump) -> np.ndarray:
    """Each row's category by its page type alone: a type with no type
    reference left is history, the frame plain data."""
    cat = np.full(len(d.mfns), category_index("data"), dtype=np.uint8)
    for ptype, name in _BY_TYPE.items():
        cat[(d.type == ptype) & (d.type_count > 0)] = category_index(name)
    return cat


# --- the machine's frames ------------------------------------------------------------------

@dataclass
class FrameMap:
    """Every machine frame, in mfn order: its category and pinned bit."""

    category: np.ndarray
    pinned: np.ndarray
    domain: str
    domid: int
    t_ns: int


def frame_map(hv: Hypervisor, dom: Domain) -> FrameMap:
    """The machine's frames as ``dom`` and the others hold them now."""
    d = domctl.dump_frames(hv)
    cat = type_categories(d)
    cat[d.owner == FREE_OWNER] = category_index("free")
    cat[d.owner == DOMID_XEN] = category_index("xen")
    other = (d.owner != dom.domid) & (d.owner != FREE_OWNER) & (d.owner != DOMID_XEN)
    cat[other] = category_index("other domain")
    cat[d.xenheap] = category_index("shared_info")
    p2m = domain_of(hv, dom).p2m_frames
    if p2m:
        cat[np.asarray(p2m, dtype=np.int64)] = category_index("p2m list")
    t = max(domctl.vcpu_clocks(dom), default=0)
    return FrameMap(cat, d.pinned.copy(), dom.name, dom.domid, t)


# --- pfn -> mfn across a save and restore ---------------------------------------------------

@dataclass
class P2mView:
    """One domain's pfn -> mfn map, pfn order, with each page's category and pin."""

    pfns: np.ndarray
    mfns: np.ndarray
    category: np.ndarray
    pinned: np.ndarray
    seed: int


def p2m_view(hv: Hypervisor, dom: Domain) -> P2mView:
    d = domctl.dump_frames(hv, dom)
    keep = d.pfns != INVALID_MFN
    order = np.argsort(d.pfns[keep], kind="stable")
    cat = type_categories(d)[keep][order]
    return P2mView(d.pfns[keep][order].astype(np.int64), d.mfns[keep][order].astype(np.int64),
                   cat, d.pinned[keep][order], hv.seed)


@dataclass
class P2mAcrossRestore:
    before: P2mView
    after: P2mView
    domain: str
    at_ns: int


def p2m_across_restore(cfg: DomainConfig, at_ns: int, seed: int | None = None,
                       restore_seed: int | None = None) -> P2mAcrossRestore:
    """Save the domain at ``at_ns`` (its p2m read just before it is destroyed)
    and restore the image on a machine with another frame shuffle."""
    seen: list[P2mView] = []
    with closing_machines() as machines, tempfile.TemporaryDirectory(
            prefix="pvlab-p2m-") as scratch:
        hv, dom = machines.boot(cfg, seed=seed)
        image = Path(scratch) / f"{dom.name}.img"
        _, outcome = suspend_and_save(hv, dom, image, at_ns, requests=cfg.requests,
                                      saved=lambda d: seen.append(p2m_view(hv, d)))
        if not outcome.ok:
            raise PlotDataError(f"the save at {format_duration(at_ns)} failed: {outcome.error}")
        hv2, dom2 = machines.restore(image, seed=restore_seed)
        return P2mAcrossRestore(seen[0], p2m_view(hv2, dom2), dom.name, at_ns)


# --- the balloon over time ------------------------------------------------------------------

@dataclass(frozen=True)
class BalloonSample:
    t_ns: int
    target: int       # the host's target, pages (num_pages)
    actual: int       # what the driver says the balloon holds (actual)
    reservation: int  # the domain's pages (tot_pages)


@dataclass
class BalloonRun:
    guest_pages: int
    domain: str
    samples: list[BalloonSample] = field(default_factory=list)
    # the guest's free memory as its statistics said, in pages: (time, pages)
    free: list[tuple[int, int]] = field(default_factory=list)
    marks: list[tuple[int, str]] = field(default_factory=list)  # (time, what happened)


class _BalloonWatch:
    """The observer of a balloon run: a sample every ``every_ns``."""

    def __init__(self, out: BalloonRun, every_ns: int) -> None:
        self.out = out
        self.every_ns = every_ns
        self.hv: Hypervisor | None = None
        self.dom: Domain | None = None

    def watch(self, hv: Hypervisor, dom: Domain) -> Observer:
        """Watch ``dom`` from its VCPUs' time on (a restored one's is the save's)."""
        self.hv, self.dom = hv, dom
        now = max(domctl.vcpu_clocks(dom), default=0)
        return Observer(self.every_ns, self.look, (now // self.every_ns + 1) * self.every_ns)

    def look(self, t_ns: int) -> None:
        assert self.hv is not None and self.dom is not None
        if not self.dom.is_running:
            return
        bal = balloon_of(self.dom)
        self.out.samples.append(BalloonSample(t_ns, bal.num_pages, bal.actual,
                                              self.dom.tot_pages))
        info = bal.info()
        free = info["stats"].get("free-memory")
        when = info["stats_updated_ns"]
        if free is not None and when is not None and (not self.out.free or
                                                       self.out.free[-1][0] != when):
            self.out.free.append((when, int(free) // PAGE_SIZE))


def _marks(requests: Sequence[Request]) -> list[tuple[int, str]]:
    out = []
    for r in requests:
        if r.command in ("checkpoint", "suspend", SAVE):
            out.append((r.at_ns, r.command))
        elif r.command == "mem-set":
            out.append((r.at_ns, f"mem-set {r.value}"))
    return out


def balloon_run(cfg: DomainConfig, until_ns: int, every_ns: int, seed: int | None = None,
                save_at: int | None = None,
                after: Sequence[Request] = ()) -> BalloonRun:
    """Run the domain to ``until_ns``, its balloon sampled every ``every_ns``;
    with ``save_at``, save it then and restore the image (on other frames),
    making the requests ``after`` of the restored guest."""
    with closing_machines() as machines:
        hv, dom = machines.boot(cfg, seed=seed)
        try:
            balloon_of(dom)
        except BalloonError as e:
            raise PlotDataError(str(e)) from None
        out = BalloonRun(guest_pages(hv, dom), dom.name)
        watch = _BalloonWatch(out, every_ns)
        if save_at is None:
            run_domain(hv, dom, until_ns, requests=cfg.requests,
                       observer=watch.watch(hv, dom))
            out.marks = _marks(cfg.requests)
            return out
        restored_at = _save_then_restore(machines, cfg, (hv, dom), watch, save_at, until_ns,
                                         after)
    out.marks = _marks([r for r in cfg.requests if r.at_ns < save_at] + list(after))
    out.marks += [(save_at, "save"), (restored_at, "restore")]
    return out


def _save_then_restore(machines: Machines, cfg: DomainConfig,
                       booted: tuple[Hypervisor, Domain], watch: _BalloonWatch,
                       save_at: int, until_ns: int, after: Sequence[Request]) -> int:
    """Save at ``save_at``, restore, run on to ``until_ns``: the virtual time
    the restored guest starts from."""
    hv, dom = booted
    with tempfile.TemporaryDirectory(prefix="pvlab-balloon-") as scratch:
        image = Path(scratch) / f"{dom.name}.img"
        _, outcome = suspend_and_save(hv, dom, image, save_at, requests=cfg.requests,
                                      observer=watch.watch(hv, dom))
        if not outcome.ok:
            raise PlotDataError(f"the save at {format_duration(save_at)} failed: "
                                f"{outcome.error}")
        hv2, dom2 = machines.restore(image)
    restored_at = max(domctl.vcpu_clocks(dom2))
    run_domain(hv2, dom2, until_ns, requests=after, observer=watch.watch(hv2, dom2))
    return restored_at


# --- a live migration's rounds ------------------------------------------------------------

@dataclass
class MigrationRun:
    """A real live save's rounds and where its downtime went: the final
    round's and the tail records' virtual time on the modelled link (the
    guest suspended), and the receiver's work once the stream has ended, in
    host time (restore_stream applies the pages as they arrive; what is left
    at the end is the END checks and stream_complete)."""

    domain: str
    at_ns: int
    total_pfns: int
    info: MigrationInfo
    receive_s: float

    @property
    def final_ns(self) -> int:
        return self.info.rounds[-1].wire_ns

    @property
    def tail_ns(self) -> int:
        return self.info.downtime_ns - self.final_ns

    def dirty_rates(self) -> list[float]:
        """Pages dirtied per second of virtual time while each live round was
        on the wire (the next round's pfns over its time)."""
        return [b.pfns * 1e9 / a.wire_ns if a.wire_ns else 0.0
                for a, b in pairwise(self.info.rounds)]


def migration_run(cfg: DomainConfig, at_ns: int, seed: int | None = None,
                  opts: PrecopyOptions | None = None) -> MigrationRun:
    """Live-save the domain at ``at_ns`` (Xen's loop and stop policy), then
    receive the image as a stream on other frames, timing the receiver's
    work after the stream's last octet."""
    with closing_machines() as machines, tempfile.TemporaryDirectory(
            prefix="pvlab-migration-") as scratch:
        hv, dom = machines.boot(cfg, seed=seed)
        image = Path(scratch) / f"{dom.name}.img"
        _, outcome, info = live_save(hv, dom, image, at_ns, opts or PrecopyOptions(),
                                     requests=cfg.requests)
        if not outcome.ok or info is None:
            raise PlotDataError(f"the live save at {format_duration(at_ns)} failed: "
                                f"{outcome.error}")
        receive_s = machines.receive(image)
    return MigrationRun(dom.name, at_ns, info.total // PAGE_SIZE, info, receive_s)
