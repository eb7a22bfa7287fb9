"""Restoring a saved image into a new domain (xg_sr_restore.c,
xg_sr_restore_x86_pv.c; libxl's domain creation around it).

The image is checked whole first (image.scan_image): a bad one is refused
before anything exists. Then, in a machine of its own:

* every pfn the image populates gets a frame from the shuffled allocator (the
  mfns differ from the saved ones), and the M2P learns them;
* the pages are copied in, pagetables *localised* on the way (pfn -> new mfn
  in every present entry), the guest's p2m frames rewritten with the new map;
* a new shared_info gets the saved vcpu_info and arch parts, every event
  channel masked and none pending (the guest binds its ports anew);
* start_info gets the new store and console frames and ports, nr_pages, the
  new shared_info's address and flags 0; vcpu0's rdx its new mfn;
* what was pinned is pinned again with the recorded type (Xen validates it);
* every VCPU's context is loaded with CR3 as an mfn again, the kernel bound.

vcpu0 then returns from its suspend hypercall with 0: the guest goes the
RESTORE way. On any failure the new domain is destroyed: no half domain.

Each step is a function named as Xen names it, the mirror of a step of
save.py: populate_pfns and process_page_data (save: send_domain_memory_nonlive,
write_batch), localise_page (canonicalise), update_guest_p2m
(write_static_data's P2M_FRAMES), handle_shared_info (write_shared_info),
process_start_info (the suspend record in vcpu0's rdx), pin_pagetables (the
LPINTAB types of getpageframeinfo3), update_vcpu_context (write_one_vcpu_basic),
all under stream_complete as x86_pv_stream_complete does.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import (
    Domain,
    DomctlError,
    Hypervisor,
    KernelError,
    OutOfMemory,
)
from hypervisor.public.arch_x86 import _PAGE_PRESENT, L1_PAGETABLE_ENTRIES, vcpu_guest_context
from hypervisor.public.xen import (
    INVALID_MFN,
    PAGE_SHIFT,
    PAGE_SIZE,
    XEN_LEGACY_MAX_VCPUS,
    shared_info,
    start_info,
)
from hypervisor.toolstack import pfinfo, savefile, stream
from hypervisor.toolstack.builder import BuildError, add_balloon, machine_mib_for
from hypervisor.toolstack.consoled import ConsoleBackend
from hypervisor.toolstack.context import context_of, domain_of
from hypervisor.toolstack.image import PTE_FRAME_MASK, ImageError, ImageInfo, scan_image
from hypervisor.toolstack.incremental import materialised, parent_of
from hypervisor.toolstack.save import Progress
from hypervisor.toolstack.xenstored import home

DOMID_TOOLSTACK = 0  # the other end of the console and store channels
ALL_MASKED = (1 << 64) - 1  # a word of evtchn_mask


class RestoreError(Exception):
    """The image could not be restored; no domain is left behind."""


@dataclass
class RestoreStats:
    pages: int = 0
    tables: int = 0
    pinned: int = 0
    localise_s: float = 0.0
    total_s: float = 0.0
    info: ImageInfo | None = None


@dataclass
class RestoreContext:
    """What the restore carries from step to step (xc_sr_context's restore half)."""

    hv: Hypervisor
    dom: Domain
    info: ImageInfo
    stats: RestoreStats
    p2m: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    start_info_mfn: int = 0


def localise_page(tables: np.ndarray, levels: np.ndarray, table_pfns: np.ndarray,
                  p2m: np.ndarray) -> np.ndarray:
    """x86_pv_localise_page for many tables at once: ``tables`` is (n, 512)
    u64, ``levels`` their levels, ``table_pfns`` their pfns. Returns the
    tables with every present entry's pfn replaced by its new mfn (p2m);
    flags and non-present entries are kept as they are. save.canonicalise did
    the reverse. A present entry whose pfn has no frame here (beyond the p2m,
    or one the image does not populate) is a RestoreError naming the table
    and slot, as Xen's "Bad mfn for L%u[%u]": the image's check refuses such
    a file first, but a stream is localised as it arrives."""
    present = (tables & np.uint64(_PAGE_PRESENT)) != 0
    rows, slots = np.nonzero(present)
    entries = tables[rows, slots]
    pfns = (entries & PTE_FRAME_MASK) >> np.uint64(PAGE_SHIFT)
    mfns = np.full(pfns.size, INVALID_MFN, dtype=np.uint64)
    inside = pfns < np.uint64(p2m.size)
    mfns[inside] = p2m[pfns[inside].astype(np.int64)]
    bad = np.flatnonzero(mfns == np.uint64(INVALID_MFN))
    if bad.size:
        i = int(bad[0])
        row, slot, level = int(rows[i]), int(slots[i]), int(levels[int(rows[i])])
        raise RestoreError(f"pagetable pfn {int(table_pfns[row]):#x} (L{level}) slot {slot}: "
                           f"entry {int(entries[i]):#018x} names pfn {int(pfns[i]):#x}, "
                           f"which has no frame (bad mfn for L{level}[{slot}])")
    out = tables.copy()
    out[rows, slots] = (entries & ~PTE_FRAME_MASK) | (mfns << np.uint64(PAGE_SHIFT))
    return out


def machine_for(info: ImageInfo) -> int:
    """Machine memory (MiB) for restoring this image alone."""
    pages = max(int(info.domain.get("max_pages", 0)), info.nr_pfns)  # type: ignore[union-attr]
    return machine_mib_for(-(-pages * PAGE_SIZE // (1 << 20)))


def restore_image(path: str | Path, seed: int | None = None, clock: str = "deterministic",
                  hv: Hypervisor | None = None, progress: Progress | None = None,
                  wire: bool = False) -> tuple[Hypervisor, Domain, RestoreStats]:
    """Check the image, then restore it into a new domain (on ``hv``, or a new
    machine sized for it). The seed shuffles the new frames: by default the
    saved one plus one, so that no pfn is likely to land on its old mfn.
    ``wire``: the image came over a migration's wire and has no digest."""
    if not wire and _parent_of(Path(path)):
        with materialised(Path(path)) as whole:  # an increment: read through its chain
            return restore_image(whole, seed, clock, hv, progress, wire=True)
    t0 = time.perf_counter()
    info = scan_image(path, wire)
    if info.domain is None or not info.domain.get("pvlab_image"):
        raise ImageError(f"{path}: no pvlab part in the xl header's config: a Xen image, "
                         "which `pvlab image show` can read but pvlab cannot run (it has no "
                         "guest kernel binding)")
    if seed is None:
        seed = int(info.domain.get("seed") or 0) + 1
    if hv is None:
        hv = Hypervisor(machine_for(info), seed=seed, clock=clock)
    d = info.domain
    dom = domctl.createdomain(hv, str(d["name"]), int(d["vcpus"]), int(d["max_pages"]))
    stats = RestoreStats(info=info)
    try:
        restore(RestoreContext(hv, dom, info, stats), progress)
    except (ImageError, KernelError) as e:
        # what the hypervisor refuses of the image's contents (a table, a
        # context, the kernel binding): a refusal of the image as the check's
        # are (exit 2), not a failed restore
        domctl.destroydomain(hv, dom)
        raise ImageError(f"{path}: {e}; nothing is left of the new domain") from None
    except (OutOfMemory, OSError, DomctlError, RestoreError) as e:
        domctl.destroydomain(hv, dom)
        raise RestoreError(f"restoring {path} failed: {e}; nothing is left of the new "
                           "domain") from None
    stats.total_s = time.perf_counter() - t0
    return hv, dom, stats


def _parent_of(path: Path) -> bool:
    """An incremental checkpoint (its config names a parent)? A file that is
    no image is left to the check to refuse."""
    try:
        return parent_of(path) is not None
    except (OSError, stream.StreamError):
        return False


def restore_stream(src: BinaryIO, seed: int | None = None, clock: str = "deterministic",
                   hv: Hypervisor | None = None, progress: Progress | None = None,
                   ) -> tuple[Hypervisor, Domain, RestoreStats]:
    """Restore a domain from a stream (a pipe or a socket: a migration's
    receiver), reading exactly its octets, xl's header to libxl's END, and
    nothing after them (the handshake goes on on the same connection).
    Raises as restore_image does; a stream cut short is a RestoreError."""
    with tempfile.TemporaryDirectory(prefix="pvlab-incoming-") as tmp:
        spool = Path(tmp) / "incoming.img"
        with open(spool, "wb") as f:
            try:
                copy_stream(stream.CountingReader(src), f)
            except stream.StreamError as e:
                raise RestoreError(f"the incoming stream: {e}; nothing was created") from None
        return restore_image(spool, seed, clock, hv, progress, wire=True)


def copy_stream(src: stream.CountingReader, out: BinaryIO) -> None:
    """Copy one stream's octets by its framing: xl's header, libxl's header,
    libxl's records with the libxc stream inline at LIBXC_CONTEXT, up to
    libxl's END. What the records hold is checked by the restore."""
    def take(n: int, what: str) -> bytes:
        data = stream.read_exact(src, n, what, src.tell())
        out.write(data)
        return data

    optlen = savefile.XL_HDR.unpack(take(savefile.XL_HDR.size, "the xl header"))[4]
    if optlen > savefile.XL_OPTDATA_MAX:
        raise stream.StreamError(f"{optlen} octets of xl optional data, over the limit")
    take(optlen, "the xl header's optional data")
    take(savefile.LIBXL_HDR.size, "the libxl header")
    while True:
        rtype = _copy_record(take, "a libxl record")
        if rtype == savefile.LibxlRecType.END:
            return
        if rtype == savefile.LibxlRecType.LIBXC_CONTEXT:
            take(stream.IHDR.size + stream.DHDR.size, "the libxc stream's headers")
            while _copy_record(take, "a libxc record") != stream.RecType.END:
                pass


def _copy_record(take: Callable[[int, str], bytes], what: str) -> int:
    """One record's header and padded body; returns its type."""
    rtype, length = stream.RHDR.unpack(take(stream.RHDR.size, what))
    if length > stream.REC_LENGTH_MAX:
        raise stream.StreamError(f"a record of {length} octets, over the limit")
    take(length + (-length % stream.REC_ALIGN), what)
    return rtype


def restore(ctx: RestoreContext, progress: Progress | None) -> None:
    """xg_sr_restore.c's restore: the memory, then the records that follow it,
    then stream_complete. The order is the frames' allocation order: keep it."""
    populate_pfns(ctx)
    process_page_data(ctx, progress)
    update_guest_p2m(ctx)
    handle_shared_info(ctx)
    process_start_info(ctx)
    handle_devices(ctx)
    stream_complete(ctx)


# --- memory ---------------------------------------------------------------------------

def populate_pfns(ctx: RestoreContext) -> None:
    """A new frame for every pfn the image gives one (the first copy of a
    populating type: a pfn sent again is not populated again, and one sent
    later as XTAB keeps its frame, as Xen's populated_pfns bitmap has it);
    the M2P learns them. Frames are not zeroed: each gets its page from the
    image, but those no copy gives data (XALLOC, allocate only; a pfn only a
    pagetable's earlier copy named), zeroed here."""
    hv, dom, info = ctx.hv, ctx.dom, ctx.info
    pfns = info.populated()
    free = domctl.physinfo(hv).free_pages
    if pfns.size > free:
        raise RestoreError(f"{pfns.size} frames wanted, {free} free")
    mfns = domctl.populate_physmap(hv, dom, int(pfns.size), zero=False)
    ctx.p2m = np.full(info.nr_pfns, INVALID_MFN, dtype=np.uint64)
    ctx.p2m[pfns] = mfns.astype(np.uint64)
    domctl.mmu_machphys_update(hv, dom, mfns, pfns)
    no_data = pfns[~info.ever_data[pfns]]
    domctl.map_foreign_bulk(hv, dom, ctx.p2m[no_data].astype(np.int64))[:] = 0


def process_page_data(ctx: RestoreContext, progress: Progress | None) -> None:
    """Every PAGE_DATA batch's pages into their new frames in stream order,
    pagetables localised on the way (save: write_batch). A pfn sent in
    several rounds is written each time, each copy localised by its own
    type: the last copy wins. Nothing is validated or pinned here: the
    frames are plain memory until stream_complete pins by the last types."""
    info, stats = ctx.info, ctx.stats
    done = 0
    with open(info.path, "rb", buffering=0) as f:
        for batch in info.batches:
            n = int(batch.with_data.sum())
            if n:
                f.seek(batch.data_offset)
                raw = f.read(n * PAGE_SIZE)
                if len(raw) != n * PAGE_SIZE:
                    raise RestoreError(f"{info.path} changed while it was read")
                pages = np.frombuffer(raw, dtype=np.uint64).reshape(n, L1_PAGETABLE_ENTRIES)
                _write_pages(ctx, batch.pfns[batch.with_data], batch.nibbles[batch.with_data],
                             pages)
                stats.pages += n
            done += batch.pfns.size
            if progress is not None:
                progress(done, info.copies)


def _write_pages(ctx: RestoreContext, pfns: np.ndarray, nibbles: np.ndarray,
                 pages: np.ndarray) -> None:
    """The batch's pages into their frames; the tables among them localised
    (written over the raw copy: nothing runs or validates them meanwhile)."""
    dest = domctl.map_foreign_bulk(ctx.hv, ctx.dom, ctx.p2m[pfns].astype(np.int64))
    dest[:] = pages
    table = pfinfo.is_table(nibbles)
    if table.any():
        tl = time.perf_counter()
        dest[table] = localise_page(pages[table], pfinfo.level(nibbles[table]), pfns[table],
                                    ctx.p2m)
        ctx.stats.localise_s += time.perf_counter() - tl
        ctx.stats.tables += int(table.sum())


def update_guest_p2m(ctx: RestoreContext) -> None:
    """The guest's p2m list, in its own frames, rewritten with the new map."""
    hv, dom, p2m = ctx.hv, ctx.dom, ctx.p2m
    frame_mfns = p2m[ctx.info.p2m_frame_pfns].astype(np.int64)
    flat = np.full(frame_mfns.size * L1_PAGETABLE_ENTRIES, INVALID_MFN, dtype=np.uint64)
    flat[:p2m.size] = p2m
    domctl.map_foreign_bulk(hv, dom, frame_mfns)[:] = flat.reshape(-1, L1_PAGETABLE_ENTRIES)
    # where the p2m list is, for the frame audit
    tdom = domain_of(hv, dom)
    tdom.p2m_frames = frame_mfns.tolist()
    tdom.p2m_size = int(p2m.size)


# --- the records after the memory -------------------------------------------------------

def handle_shared_info(ctx: RestoreContext) -> None:
    """A new shared_info with the saved vcpu_info and arch parts, every event
    channel masked and none pending: the guest binds its ports anew."""
    hv, dom = ctx.hv, ctx.dom
    domctl.alloc_shared_info(hv, dom)
    old = shared_info.from_buffer_copy(ctx.info.shared_info)
    new = domctl.map_shared_info(hv, dom)
    for i in range(XEN_LEGACY_MAX_VCPUS):
        new.vcpu_info[i] = old.vcpu_info[i]
        new.vcpu_info[i].evtchn_pending_sel = 0
    new.arch = old.arch
    new.arch.pfn_to_mfn_frame_list_list = 0  # the guest tells it again
    for w in range(len(new.evtchn_pending)):
        new.evtchn_pending[w] = 0
        new.evtchn_mask[w] = ALL_MASKED


def process_start_info(ctx: RestoreContext) -> None:
    """start_info, found from the suspend record (vcpu0's rdx): the new store
    and console frames and ports, nr_pages, the new shared_info, flags 0;
    the console and store backends connected to them."""
    hv, dom, p2m, info = ctx.hv, ctx.dom, ctx.p2m, ctx.info
    si_pfn = int(info.context(0).user_regs.rdx)
    ctx.start_info_mfn = int(p2m[si_pfn])
    si = domctl.map_struct(hv, dom, ctx.start_info_mfn, start_info)
    for what, pfn in (("store", si.store_mfn), ("console", si.console.domU.mfn)):
        if pfn >= p2m.size or p2m[pfn] == INVALID_MFN:
            raise ImageError(f"start_info's {what} pfn {pfn:#x} is not in the image")
    si.store_mfn = int(p2m[si.store_mfn])
    si.console.domU.mfn = int(p2m[si.console.domU.mfn])
    si.console.domU.evtchn = domctl.evtchn_alloc_unbound(dom, DOMID_TOOLSTACK)
    si.store_evtchn = domctl.evtchn_alloc_unbound(dom, DOMID_TOOLSTACK)
    si.nr_pages = info.nr_pfns
    si.shared_info = domctl.shared_info_frame(dom) << PAGE_SHIFT
    si.flags = 0
    ctx = context_of(hv)
    tdom = ctx.domain(dom)
    tdom.console = ConsoleBackend(hv, dom, si.console.domU.mfn, si.console.domU.evtchn)
    store = ctx.xenstore()
    tdom.xenstore = store.introduce_domain(hv, dom, si.store_mfn, si.store_evtchn)
    for rel, value in info.xenstore:
        store.write(f"{home(dom.domid)}/{rel}", value)


def handle_devices(ctx: RestoreContext) -> None:
    """libxl's EMULATOR_CONTEXT records: each device at the address and port
    the guest knows from its command line, with what the host kept of it."""
    for d in ctx.info.devices:
        try:
            add_balloon(ctx.hv, ctx.dom, d["stats_interval_ns"], d["deflate_on_oom"],
                        base=d["base"], port=d["port"], state=d)
        except (BuildError, ValueError) as e:
            raise ImageError(f"the balloon at {d['base']:#x} cannot be re-created: {e}") \
                from None


# --- the end of the stream ---------------------------------------------------------------

def stream_complete(ctx: RestoreContext) -> None:
    """x86_pv_stream_complete: pin what was pinned, then the VCPUs."""
    pin_pagetables(ctx)
    kernel = ctx.info.domain.get("kernel") if ctx.info.domain else None
    if kernel:
        domctl.load_kernel(ctx.dom, str(kernel["module"]), int(kernel["text"]),
                           int(kernel["size"]))
    for vcpu_id in sorted(ctx.info.vcpus):
        update_vcpu_context(ctx, vcpu_id)
    handle_tsc_info(ctx)
    domctl.tlb_flush(ctx.hv, ctx.dom)


def handle_tsc_info(ctx: RestoreContext) -> None:
    """Each VCPU's clock from the config's pvlab part, else X86_TSC_INFO's
    nanoseconds (save: write_tsc_info, domain_config)."""
    clocks = ctx.info.domain.get("clocks", []) if ctx.info.domain else []
    tsc_ns = ctx.info.tsc[2] if ctx.info.tsc else 0
    domctl.settscinfo(ctx.dom, {i: int(clocks[i]) if i < len(clocks) else tsc_ns
                                for i in ctx.info.vcpus})


def pin_pagetables(ctx: RestoreContext) -> None:
    """Pin again what was pinned, by each pfn's last type in the stream (Xen
    validates it here, once, after END): a table pinned in an early round
    and unpinned by the end is not pinned."""
    info = ctx.info
    for pfn in np.flatnonzero(pfinfo.is_pinned_table(info.nibbles)).tolist():
        level = int(pfinfo.level(info.nibbles[pfn]))
        rc = domctl.mmuext_pin_table(ctx.hv, ctx.dom, int(ctx.p2m[pfn]), level)
        if rc:
            raise ImageError(f"pinning pfn {pfn:#x} as an L{level} table failed ({rc}): "
                             "the hypervisor refuses the table's contents")
        ctx.stats.pinned += 1


def update_vcpu_context(ctx: RestoreContext, vcpu_id: int) -> None:
    """A VCPU's saved context with machine frames again (save:
    write_one_vcpu_basic); vcpu0 returns 0 from its suspend hypercall and
    finds start_info's new mfn in rdx."""
    vc = vcpu_guest_context.from_buffer_copy(ctx.info.vcpus[vcpu_id])
    vc.ctrlreg[3] = int(ctx.p2m[vc.ctrlreg[3] >> PAGE_SHIFT]) << PAGE_SHIFT
    if vc.ctrlreg[1] & stream.USER_L4_SET:
        vc.ctrlreg[1] = int(ctx.p2m[vc.ctrlreg[1] >> PAGE_SHIFT]) << PAGE_SHIFT
    if vcpu_id == 0:
        vc.user_regs.rdx = ctx.start_info_mfn
        vc.user_regs.rax = 0  # the suspend hypercall returns 0: resumed in a new domain
    rc = domctl.setvcpucontext(ctx.dom, vcpu_id, vc)
    if rc:
        raise ImageError(f"vcpu{vcpu_id}'s context is refused ({rc}): its cr3 does "
                         "not validate")
