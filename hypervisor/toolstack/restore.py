"""Restoring a saved image into a new domain (xg_sr_restore.c,
xg_sr_restore_x86_pv.c; libxl's domain creation around it).

A file is checked whole first (image.scan_image): a bad one is refused
before anything exists. A stream (a migration's, a Remus backup's) is
applied as it arrives, each record checked by the same parser when it comes
and the whole-stream checks made at its END (Receiver, below). Either way,
in a machine of its own:

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

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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
from hypervisor.toolstack.builder import BuildError, add_device, machine_mib_for
from hypervisor.toolstack.consoled import ConsoleBackend
from hypervisor.toolstack.context import context_of, domain_of
from hypervisor.toolstack.image import (
    PTE_FRAME_MASK,
    ImageError,
    ImageInfo,
    PageBatch,
    RecordParser,
    check_end,
    read_head,
    scan_image,
    table_targets,
)
from hypervisor.toolstack.incremental import materialised, parent_of
from hypervisor.toolstack.save import Progress
from hypervisor.toolstack.savefile import LibxlRecType
from hypervisor.toolstack.stream import RecType
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
    # a stream's receiver: the seconds from its last record to a domain
    # ready to run; a checkpointed stream's epochs committed, whether it
    # failed over (the stream broke inside an epoch) and why
    complete_s: float = 0.0
    epochs: int = 0
    failover: bool = False
    why: str = ""


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
    # over every entry at once, present or not (the gather and the select
    # cost less than finding the present ones first)
    present = (tables & np.uint64(_PAGE_PRESENT)).astype(bool)
    pfns = (tables & PTE_FRAME_MASK) >> np.uint64(PAGE_SHIFT)
    lookup = np.append(p2m, np.uint64(INVALID_MFN))  # a pfn beyond the p2m: no frame
    mfns = lookup[np.minimum(pfns, np.uint64(p2m.size)).astype(np.intp)]
    bad = present & (mfns == np.uint64(INVALID_MFN))
    if bad.any():
        row, slot = (int(x[0]) for x in np.nonzero(bad))
        level, entry = int(levels[row]), int(tables[row, slot])
        raise RestoreError(f"pagetable pfn {int(table_pfns[row]):#x} (L{level}) slot {slot}: "
                           f"entry {entry:#018x} names pfn {int(pfns[row, slot]):#x}, "
                           f"which has no frame (bad mfn for L{level}[{slot}])")
    return np.where(present, (tables & ~PTE_FRAME_MASK) | (mfns << np.uint64(PAGE_SHIFT)),
                    tables)


def machine_for(info: ImageInfo) -> int:
    """Machine memory (MiB) for restoring this image alone."""
    pages = max(int(info.domain.get("max_pages", 0)), info.nr_pfns)  # type: ignore[union-attr]
    return machine_mib_for(-(-pages * PAGE_SIZE // (1 << 20)))


def _create_domain(info: ImageInfo, where: str, seed: int | None, clock: str,
                   hv: Hypervisor | None) -> tuple[Hypervisor, Domain]:
    """The new domain from the xl config's pvlab part, on ``hv`` or a new
    machine sized for it. The seed shuffles the new frames: by default the
    saved one plus one, so that no pfn is likely to land on its old mfn."""
    d = info.domain
    if d is None or not d.get("pvlab_image"):
        raise ImageError(f"{where}: no pvlab part in the xl header's config: a Xen image, "
                         "which `pvlab image show` can read but pvlab cannot run (it has no "
                         "guest kernel binding)")
    if seed is None:
        seed = int(d.get("seed") or 0) + 1
    if hv is None:
        hv = Hypervisor(machine_for(info), seed=seed, clock=clock)
    return hv, domctl.createdomain(hv, str(d["name"]), int(d["vcpus"]), int(d["max_pages"]))


def restore_image(path: str | Path, seed: int | None = None, clock: str = "deterministic",
                  hv: Hypervisor | None = None, progress: Progress | None = None,
                  wire: bool = False) -> tuple[Hypervisor, Domain, RestoreStats]:
    """Check the image, then restore it into a new domain (on ``hv``, or a new
    machine sized for it). The seed shuffles the new frames: by default the
    saved one plus one, so that no pfn is likely to land on its old mfn.
    ``wire``: the image came over a migration's wire and has no digest."""
    if not wire and is_increment(Path(path)):
        with materialised(Path(path)) as whole:  # an increment: read through its chain
            return restore_image(whole, seed, clock, hv, progress, wire=True)
    t0 = time.perf_counter()
    info = scan_image(path, wire)
    hv, dom = _create_domain(info, str(path), seed, clock, hv)
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


def is_increment(path: Path) -> bool:
    """An incremental checkpoint (its config names a parent)? A file that is
    no image is left to the check to refuse."""
    try:
        return parent_of(path) is not None
    except (OSError, stream.StreamError):
        return False


def restore_stream(src: BinaryIO, seed: int | None = None, clock: str = "deterministic",
                   hv: Hypervisor | None = None, progress: Progress | None = None,
                   postcopy: Any = None) -> tuple[Hypervisor, Domain, RestoreStats]:
    """Restore a domain from a stream (a pipe or a socket: a migration's
    receiver) as it arrives, reading exactly its octets, xl's header to
    libxl's END, and nothing after them (the handshake goes on on the same
    connection). The domain is created from the xl header's config; each
    PAGE_DATA is applied when it arrives; at END the checks that need the
    whole stream, then stream_complete (Receiver). Raises ImageError for a
    bad stream, RestoreError for a failed restore or a stream cut short; on
    any failure nothing is left of the new domain. ``postcopy`` takes the
    records of a post-copy migration (postcopy.Incoming); without it such a
    stream is refused, as any reader that does not know them refuses it."""
    rx = receive(src, seed, clock, hv, progress, postcopy=postcopy)
    return rx.ctx.hv, rx.ctx.dom, rx.ctx.stats


def receive_checkpoints(src: BinaryIO, seed: int | None = None,
                        clock: str = "deterministic", hv: Hypervisor | None = None,
                        on_commit: Callable[[int], None] | None = None,
                        progress: Progress | None = None,
                        on_optional: Callable[[stream.Record], None] | None = None,
                        ) -> tuple[Hypervisor, Domain, RestoreStats]:
    """The backup's side of a checkpointed stream (Remus), as Xen's
    receiver: records are applied as they come up to the first CHECKPOINT;
    after it each epoch's records are checked as they arrive and buffered,
    and applied when its CHECKPOINT and libxl's CHECKPOINT_END have come
    (save.write_epoch_end writes them); ``on_commit(epoch)`` is called then,
    epochs numbered from 0 (the primary's output commit waits for it).

    Returns when the stream ends: at a clean END (save.end_checkpointed_stream)
    or when it breaks (EOF, a read error, a reset) while an epoch is being
    buffered: **failover**, the partial epoch dropped. Either way the domain
    is completed from the last committed epoch (stream_complete) and left
    ready to run its RESTORE path; stats.epochs counts the epochs committed,
    stats.failover says whether it failed over and stats.why why. A break
    before the first whole checkpoint is a RestoreError and a bad record,
    even in a buffered epoch, an ImageError (Xen's receiver fails on it
    too): nothing is left of the domain. An OSError out of ``on_commit``
    (the backup's answer to a primary that is gone) is a break too: the
    epoch it was called for is committed. An optional libxc record (bit 31)
    goes to ``on_optional`` as it arrives, never buffered (Remus's output
    channel rides the stream so: stream.REMUS_OUTPUT)."""
    rx = receive(src, seed, clock, hv, progress, checkpointed=True, on_commit=on_commit,
                 on_optional=on_optional)
    return rx.ctx.hv, rx.ctx.dom, rx.ctx.stats


def receive(src: BinaryIO, seed: int | None, clock: str, hv: Hypervisor | None,
            progress: Progress | None, checkpointed: bool = False,
            on_commit: Callable[[int], None] | None = None,
            on_optional: Callable[[stream.Record], None] | None = None,
            postcopy: Any = None) -> Receiver:
    """xc_domain_restore on a stream: the head read, the domain created from
    its config (libxl's domain creation), the records received into it; on
    any failure the domain is destroyed."""
    t0 = time.perf_counter()
    reader = stream.CountingReader(src)
    where = "the incoming stream"
    try:
        _, info = read_head(reader, where)
    except (stream.Truncated, OSError) as e:
        raise RestoreError(f"{where}: {e}; nothing was created") from None
    except stream.StreamError as e:
        raise ImageError(f"{where}: {e}; nothing was created") from None
    hv, dom = _create_domain(info, where, seed, clock, hv)
    ctx = RestoreContext(hv, dom, info, RestoreStats(info=info))
    rx = Receiver(reader, ctx, RecordParser(info, keep=False), checkpointed, on_commit,
                  progress, on_optional, postcopy)
    try:
        rx.restore()
    except (stream.Truncated, OSError, OutOfMemory, DomctlError, RestoreError) as e:
        domctl.destroydomain(hv, dom)
        raise RestoreError(f"{where} failed: {e}; nothing is left of the new domain") \
            from None
    except (stream.StreamError, KernelError) as e:  # ImageError is one
        domctl.destroydomain(hv, dom)
        raise ImageError(f"{where}: {e}; nothing is left of the new domain") from None
    ctx.stats.total_s = time.perf_counter() - t0
    return rx


@dataclass
class Committed:
    """What a checkpointed stream's receiver knew at its last commit: a
    failover goes back to it (the partial epoch's records were checked into
    the ImageInfo as they came, not applied)."""

    nibbles: np.ndarray
    ever_populated: np.ndarray
    ever_data: np.ndarray
    copies: int
    tsc: tuple[int, int, int, int] | None
    shared_info: bytes
    vcpus: dict[int, bytes]
    xenstore: list[tuple[str, bytes]]
    devices: list[dict]

    @classmethod
    def of(cls, info: ImageInfo) -> Committed:
        return cls(info.nibbles.copy(), info.ever_populated.copy(), info.ever_data.copy(),
                   info.copies, info.tsc, info.shared_info, dict(info.vcpus), list(info.xenstore),
                   list(info.devices))

    def put_back(self, info: ImageInfo) -> None:
        info.nibbles, info.ever_populated, info.ever_data, info.copies = \
            self.nibbles, self.ever_populated, self.ever_data, self.copies
        info.tsc, info.shared_info, info.vcpus = self.tsc, self.shared_info, self.vcpus
        info.xenstore, info.devices = self.xenstore, self.devices


@dataclass
class Receiver:
    """A stream restored as it arrives: xg_sr_restore.c's restore() loop
    (read_record, process_record; buffer_record and handle_checkpoint in a
    checkpointed stream), with libxl_stream_read.c's records around and,
    at a CHECKPOINT, inside it."""

    src: stream.CountingReader
    ctx: RestoreContext
    parser: RecordParser
    checkpointed: bool = False
    on_commit: Callable[[int], None] | None = None
    progress: Progress | None = None
    on_optional: Callable[[stream.Record], None] | None = None
    # a post-copy migration's records and the domain's absent part
    # (postcopy.Incoming: record, transition_end, transitioned, prepare)
    postcopy: Any = None
    # the last copy of each pfn last sent as a pagetable, canonical: the END
    # checks read them (guest memory holds them localised)
    tables: dict[int, np.ndarray] = field(default_factory=dict)
    buffering: bool = False       # after the first CHECKPOINT of a checkpointed stream
    buffered: list[tuple[stream.Record, PageBatch | None]] = field(default_factory=list)
    committed: Committed | None = None
    copies: int = 0

    def restore(self) -> None:
        """The records up to libxl's END, or a failover; then the END checks
        and stream_complete."""
        try:
            self.read_stream()
        except (stream.Truncated, OSError) as e:
            if not self.buffering:
                raise
            self.failover(str(e))
        tc = time.perf_counter()
        if self.postcopy is not None and self.postcopy.transitioned:
            self.postcopy.prepare(self)  # the pages still at the source made absent
        check_end(self.ctx.info, self.read_pages)
        complete(self.ctx)
        self.ctx.stats.complete_s = time.perf_counter() - tc

    def read_stream(self) -> None:
        while True:
            rec = savefile.read_libxl_record(self.src)
            if self.postcopy is not None and self.postcopy.transition_end(self, rec):
                return  # post-copy: the rest of the stream is the pager's
            rtype = self.parser.libxl(rec)
            if rtype == LibxlRecType.END:
                return
            if rtype == LibxlRecType.LIBXC_CONTEXT:
                self.read_libxc()

    def read_libxc(self) -> None:
        """The libxc stream to its END: each record checked as it comes, then
        processed, or buffered while an epoch is open."""
        base = self.src.tell()
        self.parser.headers(*stream.read_headers(self.src, base), base)
        while True:
            rec = stream.read_record(self.src, self.src.tell())
            if self.postcopy is not None and rec.type in stream.PostcopyType._value2member_map_:
                if self.postcopy.record(self, rec):
                    return  # POSTCOPY_TRANSITION: libxl's records come now
                continue
            batch = self.parser.libxc(rec)
            if rec.type == RecType.END:
                return
            if rec.type == RecType.CHECKPOINT:
                self.handle_checkpoint()
            elif rec.type & stream.REC_TYPE_OPTIONAL and self.on_optional is not None:
                self.on_optional(rec)
            elif self.buffering:
                self.buffered.append((rec, batch))  # buffer_record
            else:
                self.process_record(rec, batch)

    def process_record(self, rec: stream.Record, batch: PageBatch | None) -> None:
        """What a record does to the new domain as it is applied; the rest
        (TSC, SHARED_INFO, the VCPUs, libxl's records) the parser keeps in
        the ImageInfo for stream_complete."""
        if batch is not None:
            process_batch(self, batch, rec.body)
        elif rec.type == RecType.X86_PV_P2M_FRAMES:
            self.ctx.p2m = np.full(self.ctx.info.nr_pfns, INVALID_MFN, dtype=np.uint64)

    def handle_checkpoint(self) -> None:
        """libxl's records up to CHECKPOINT_END (libxl's checkpoint callback),
        then the buffered epoch applied; the epoch is committed."""
        while self.parser.libxl(savefile.read_libxl_record(self.src)) \
                != LibxlRecType.CHECKPOINT_END:
            pass
        for rec, batch in self.buffered:
            self.process_record(rec, batch)
        self.buffered = []
        self.buffering = self.checkpointed
        self.committed = Committed.of(self.ctx.info)
        stats = self.ctx.stats
        stats.epochs += 1
        if self.on_commit is not None:
            self.on_commit(stats.epochs - 1)

    def failover(self, why: str) -> None:
        """The stream broke inside an epoch: it is dropped, the domain is
        the last committed epoch's (remus_failover)."""
        assert self.committed is not None
        self.committed.put_back(self.ctx.info)
        self.buffered = []
        self.ctx.stats.failover, self.ctx.stats.why = True, why

    def read_pages(self, pfns: np.ndarray) -> np.ndarray:
        """The last copy of these pfns' pages: a table's as it came (kept),
        any other's from guest memory (written as it came)."""
        out = np.empty((pfns.size, L1_PAGETABLE_ENTRIES), dtype=np.uint64)
        kept = np.array([int(p) in self.tables for p in pfns.tolist()], dtype=bool)
        for k in np.flatnonzero(kept).tolist():
            out[k] = self.tables[int(pfns[k])]
        if (~kept).any():
            mfns = self.ctx.p2m[pfns[~kept]].astype(np.int64)
            out[~kept] = domctl.map_foreign_bulk(self.ctx.hv, self.ctx.dom, mfns)
        return out


def process_batch(rx: Receiver, batch: PageBatch, body: bytes) -> None:
    """One PAGE_DATA batch into the new domain as it arrives
    (process_page_data): a pfn populated at its first populating copy
    (populate_pfns), and every pfn a table names that has no frame yet
    (x86_pv_localise_page); each page written, each table localised by its
    own type; the last copy wins."""
    ctx, info = rx.ctx, rx.ctx.info
    count = batch.pfns.size
    pages = np.frombuffer(body, dtype=np.uint64, offset=stream.PAGE_DATA_HDR.size + 8 * count
                          ).reshape(-1, L1_PAGETABLE_ENTRIES)
    pfns, nib = batch.pfns[batch.with_data], batch.nibbles[batch.with_data]
    levels = pfinfo.level(nib)
    rows = np.flatnonzero(levels)
    wanted = [batch.pfns[pfinfo.populates(batch.nibbles)]]
    wanted += [table_targets(info, int(pfns[k]), int(levels[k]), pages[k]) for k in rows]
    new = populate(ctx, np.concatenate(wanted))
    blank = np.setdiff1d(new, pfns)  # frames no page of this batch fills
    if blank.size:
        domctl.map_foreign_bulk(ctx.hv, ctx.dom, ctx.p2m[blank].astype(np.int64))[:] = 0
    if pfns.size:
        _write_pages(ctx, pfns, nib, pages)
    for k, pfn in enumerate(pfns.tolist()):
        if levels[k]:
            rx.tables[pfn] = pages[k].copy()
        else:
            rx.tables.pop(pfn, None)
    ctx.stats.pages += int(pfns.size)
    rx.copies += count
    if rx.progress is not None:
        rx.progress(rx.copies, info.nr_pfns)


def populate(ctx: RestoreContext, pfns: np.ndarray) -> np.ndarray:
    """A frame for each of these pfns that has none yet (populate_pfns, as a
    stream needs it: batch by batch); the M2P learns them. Returns the pfns
    populated now."""
    new = np.unique(pfns)
    new = new[ctx.p2m[new] == np.uint64(INVALID_MFN)]
    if not new.size:
        return new
    free = domctl.physinfo(ctx.hv).free_pages
    if new.size > free:
        raise RestoreError(f"{new.size} frames wanted, {free} free")
    mfns = domctl.populate_physmap(ctx.hv, ctx.dom, int(new.size), zero=False)
    ctx.p2m[new] = mfns.astype(np.uint64)
    domctl.mmu_machphys_update(ctx.hv, ctx.dom, mfns, new)
    ctx.info.ever_populated[new] = True
    return new


def complete(ctx: RestoreContext) -> None:
    """What a stream's receiver does once the records are in, as the file's
    restore does after its pages: the guest's p2m, shared_info, start_info,
    the devices, then stream_complete."""
    update_guest_p2m(ctx)
    handle_shared_info(ctx)
    process_start_info(ctx)
    handle_devices(ctx)
    stream_complete(ctx)


def restore(ctx: RestoreContext, progress: Progress | None) -> None:
    """xg_sr_restore.c's restore: the memory, then the records that follow it,
    then stream_complete. The order is the frames' allocation order: keep it."""
    populate_pfns(ctx)
    process_page_data(ctx, progress)
    complete(ctx)


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
            add_device(ctx.hv, ctx.dom, d, base=d["base"], port=d["port"])
        except (BuildError, ValueError, OSError) as e:
            raise ImageError(f"the {d['kind']} at {d['base']:#x} cannot be re-created: {e}") \
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
    and unpinned by the end is not pinned. The L1s are validated in one
    pass first when they can be (validate_l1s): the pins then find them
    validated."""
    info = ctx.info
    l1_mfns = validate_l1s(ctx)
    try:
        for pfn in np.flatnonzero(pfinfo.is_pinned_table(info.nibbles)).tolist():
            level = int(pfinfo.level(info.nibbles[pfn]))
            rc = domctl.mmuext_pin_table(ctx.hv, ctx.dom, int(ctx.p2m[pfn]), level)
            if rc:
                raise ImageError(f"pinning pfn {pfn:#x} as an L{level} table failed "
                                 f"({rc}): the hypervisor refuses the table's contents")
            ctx.stats.pinned += 1
    finally:
        domctl.release_unreferenced_l1s(ctx.hv, l1_mfns)


def validate_l1s(ctx: RestoreContext) -> np.ndarray:
    """Every L1 of the image validated at once (domctl.validate_l1_tables),
    ahead of the pins; returns them, or none if they need the one-by-one
    validation of the pins (an entry out of the common case, whose exact
    error the pins give)."""
    levels = pfinfo.level(ctx.info.nibbles)
    tables = ctx.p2m[np.flatnonzero(levels)].astype(np.int64)
    l1_mfns = ctx.p2m[np.flatnonzero(levels == 1)].astype(np.int64)
    if not domctl.validate_l1_tables(ctx.hv, ctx.dom, l1_mfns, tables):
        return l1_mfns[:0]
    return l1_mfns


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
