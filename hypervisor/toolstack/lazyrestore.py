"""Lazy restore: run a saved image before its memory is in (``pvlab restore
--lazy``), as Firecracker's snapshot load with a page-fault handler and QEMU's
fast snapshot load (post-copy from a file) do.

The image's structure is checked first (every record, as an eager restore
checks it, against the digest of everything but the pages); its pages are
checked block by block, each the first time one of its pages is read, against
the page digests the save wrote (pagedigest.py). An image written before
those digests is checked whole first, as an eager restore checks it. Then, in
a new domain:

* every pfn gets its frame, in the eager restore's order (the same mfns for
  the same seed), and the pages no copy gives data are zeroed;
* the pagetables are read and localised at once (the MMU and the hypervisor's
  walker need them; a VCPU's walk could not fault on a table here);
* every other page is left *absent* (hypervisor/mm/absent.py) with the file
  offset of its last copy: the pager registered here copies it from the image,
  which is mapped (mmap), when anything first touches it;
* start_info, shared_info, the p2m list, the devices, the pins and the VCPUs
  as in an eager restore (start_info's and the rings' pages are fetched
  through the same mechanism when those steps touch them).

A page is never taken from the file but through its block's check: the
octets hashed are the octets served, and a block is read once. When a block
is checked, every absent frame whose copy is in it is filled from them at
once (the pagetables' blocks, which the check read, as the restore marks the
rest absent): a 64-page block costs little beside the 512-page chunk a VCPU's
fault fills, and a page changed in place after its block was checked is
never seen.

The guest then runs, and a background pass between slices fills
``BACKGROUND_FRAMES`` more each time (QEMU's eager thread), with the rest of
their blocks, so the image can be let go once every frame is in.

The image must not change underneath: it is opened before the check and held
open; its size and modification time are read then, must be the same after
the check (and the path must still name the file held open), and are read
again before every fetch. A change, or a batch whose pages do not match their
digest, is an ``ImageChanged``: refused before the guest runs, the end of the
guest after (its memory can no longer be trusted).
"""

from __future__ import annotations

import mmap
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import Domain, DomctlError, Hypervisor, KernelError, OutOfMemory
from hypervisor.public.xen import PAGE_SIZE
from hypervisor.toolstack import pfinfo
from hypervisor.toolstack.image import ImageError, ImageInfo, scan_image
from hypervisor.toolstack.pagedigest import DigestMismatch, PageDigests
from hypervisor.toolstack.restore import (
    RestoreContext,
    RestoreError,
    RestoreStats,
    complete,
    is_increment,
    localise_page,
    machine_for,
    populate_pfns,
)

BACKGROUND_FRAMES = 64  # frames the background pass asks for between two slices


class ImageChanged(RestoreError):
    """The image changed while a lazily restored guest still reads it."""


@dataclass(frozen=True)
class FileId:
    """What says a file is the one checked: inode, size, modification time."""

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


class LazyImage:
    """The image held open and mapped, and the pager that reads it."""

    def __init__(self, path: str, fd: int, checked: FileId,
                 digests: PageDigests | None = None) -> None:
        self.path = path
        self.fd = fd
        self.checked = checked
        self.digests = digests  # None: the whole image was checked
        self.map = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        self.hv: Hypervisor | None = None
        self.offset_of: np.ndarray = np.zeros(0, np.int64)  # per mfn; -1: none
        self._by_block = np.zeros(0, np.int64)  # the lazy mfns, by their copy's block
        self._block_first = np.zeros(1, np.int64)  # per block, where its mfns start there

    def check_unchanged(self) -> None:
        now = FileId.of(os.fstat(self.fd))
        if now != self.checked:
            raise ImageChanged(f"{self.path} changed while the guest was running from it "
                               f"(size {self.checked.size} -> {now.size}, mtime changed: "
                               f"{now.mtime_ns != self.checked.mtime_ns}): its memory cannot "
                               "be read any more")

    def _read(self, at: int, n: int) -> bytes:
        # a copy (at most a block, 256 KiB): no view of the mapping may
        # outlive the read (an ImageChanged's traceback would keep it mapped)
        return self.map[at:at + n]

    def pages(self, offsets: np.ndarray) -> np.ndarray:
        """Pages of the image at these file offsets, as rows of 512 u64,
        from the octets their blocks were checked with (checked now if not
        yet: PageDigests.pages)."""
        if self.digests is None:
            out = np.empty((offsets.size, PAGE_SIZE // 8), dtype=np.uint64)
            for i, off in enumerate(offsets.tolist()):
                out[i] = np.frombuffer(self._read(off, PAGE_SIZE), dtype=np.uint64)
            return out
        try:
            return self.digests.pages(offsets, self._read)
        except DigestMismatch as e:
            raise ImageChanged(f"{self.path}: {e}: its memory cannot be read any "
                               "more") from None

    def set_frames(self, hv: Hypervisor, mfns: np.ndarray, offsets: np.ndarray) -> None:
        """The frames the pager fills, each from its last copy at ``offsets``."""
        self.hv = hv
        self.offset_of = np.full(hv.machine.nr_frames, -1, dtype=np.int64)
        self.offset_of[mfns] = offsets
        if self.digests is not None:
            blocks = self.digests.block_of(offsets)
            order = np.argsort(blocks, kind="stable")
            self._by_block = mfns[order]
            self._block_first = np.searchsorted(blocks[order],
                                                np.arange(self.digests.starts.size + 1))

    def load_checked(self, skip: np.ndarray | None = None) -> None:
        """Every frame still absent whose copy is in a block checked and
        kept (PageDigests.release), from those octets, but ``skip``: a block
        checked is never read from the file again (mem_paging_load)."""
        assert self.digests is not None and self.hv is not None
        kept = self.digests.release()
        if not kept:
            return
        mfns = np.concatenate([self._by_block[self._block_first[i]:self._block_first[i + 1]]
                               for i in kept])
        mfns = mfns[domctl.mem_paging_absent(self.hv, mfns)]
        if skip is not None:
            mfns = mfns[~np.isin(mfns, skip)]
        if mfns.size:
            rows = np.empty((mfns.size, PAGE_SIZE // 8), dtype=np.uint64)
            at = self.offset_of[mfns]
            blocks = self.digests.block_of(at)
            for k, (i, off) in enumerate(zip(blocks.tolist(), at.tolist(), strict=True)):
                rows[k] = np.frombuffer(kept[i], dtype=np.uint64, count=PAGE_SIZE // 8,
                                        offset=off - int(self.digests.starts[i]))
            domctl.mem_paging_load(self.hv, mfns, rows)

    def fetch(self, mfns: np.ndarray) -> None:
        """The pager: absent frames from their last copy in the image, and
        every other absent frame whose copy is in a block this checked."""
        self.check_unchanged()
        offsets = self.offset_of[mfns]
        assert (offsets >= 0).all(), "an absent frame with no page in the image"
        assert self.hv is not None
        domctl.write_absent(self.hv, mfns, self.pages(offsets))
        if self.digests is not None:
            self.load_checked(skip=mfns)

    def close(self) -> None:
        """Let the image go (every frame is in, or the domain is gone)."""
        if self.hv is not None and domctl.mem_paging_stats(self.hv)[0] == 0:
            domctl.mem_paging_setup(self.hv, None)
        self.map.close()
        os.close(self.fd)


def open_checked(path: str | Path) -> tuple[LazyImage, ImageInfo]:
    """Open the image, check it (scan_image: its structure and the pages it
    reads, or all of it for an image without page digests), and map it,
    refusing a file that changed or was replaced meanwhile."""
    p = str(path)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            raise ImageError(f"{p}: not a regular file")
        fd = os.open(p, os.O_RDONLY)
    except OSError as e:
        raise ImageError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        before = FileId.of(os.fstat(fd))
        info = scan_image(p, lazy=True)
        if FileId.of(os.fstat(fd)) != before or FileId.of(os.stat(p)) != before:
            raise ImageError(f"{p} changed while it was checked: not restored")
        return LazyImage(p, fd, before, info.page_digests), info
    except BaseException:
        os.close(fd)
        raise


def last_copies(info: ImageInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pfn sent with data: its last copy's file offset and type nibble
    (the copy an eager restore leaves in the frame; the check found them).
    Returns (pfns, offsets, nibbles)."""
    pfns = np.flatnonzero(info.last_offset >= 0)
    return pfns, info.last_offset[pfns], info.last_nibble[pfns]


def restore_lazy(ctx: RestoreContext, image: LazyImage) -> None:
    """populate_pfns, the tables now, the rest absent with the pager set,
    then what follows the memory (restore.complete)."""
    populate_pfns(ctx)
    pfns, offsets, nibbles = last_copies(ctx.info)
    table = pfinfo.is_table(nibbles)
    mfns = ctx.p2m[pfns].astype(np.int64)
    if table.any():
        rows = localise_page(image.pages(offsets[table]), pfinfo.level(nibbles[table]),
                             pfns[table], ctx.p2m)
        domctl.map_foreign_bulk(ctx.hv, ctx.dom, mfns[table])[:] = rows
        ctx.stats.tables += int(table.sum())
    # the p2m list's frames are left present and not read: update_guest_p2m
    # writes every word of them (what the eager restore copied is overwritten)
    p2m_frame = np.zeros(ctx.info.nr_pfns, dtype=bool)
    p2m_frame[ctx.info.p2m_frame_pfns] = True
    lazy = ~table & ~p2m_frame[pfns]
    image.set_frames(ctx.hv, mfns[lazy], offsets[lazy])
    domctl.mem_paging_setup(ctx.hv, image.fetch, BACKGROUND_FRAMES)
    domctl.mem_paging_evict(ctx.hv, ctx.dom, mfns[lazy])
    if image.digests is not None:
        image.load_checked()  # the check's blocks: their other pages now, as hashed
    ctx.stats.pages = int(table.sum())
    complete(ctx)


def restore_image_lazy(path: str | Path, seed: int | None = None,
                       clock: str = "deterministic", hv: Hypervisor | None = None,
                       ) -> tuple[Hypervisor, Domain, RestoreStats, LazyImage]:
    """Check the image, then restore it lazily into a new domain (on ``hv``,
    or a new machine sized for it; the seed as restore_image takes it).
    The caller closes the LazyImage once the domain is gone."""
    t0 = time.perf_counter()
    image, info = open_checked(path)
    try:
        if info.domain is None or not info.domain.get("pvlab_image"):
            raise ImageError(f"{path}: no pvlab part in the xl header's config: a Xen "
                             "image, which pvlab cannot run")
        if is_increment(Path(path)):
            raise ImageError(f"{path}: an incremental checkpoint: restore it without "
                             "--lazy (its pages are spread over its chain)")
        if seed is None:
            seed = int(info.domain.get("seed") or 0) + 1
        if hv is None:
            hv = Hypervisor(machine_for(info), seed=seed, clock=clock)
        hv, dom, stats = _restore_into(hv, info, image, str(path))
    except BaseException:
        image.close()
        raise
    stats.total_s = time.perf_counter() - t0
    return hv, dom, stats, image


def _restore_into(hv: Hypervisor, info: ImageInfo, image: LazyImage,
                  path: str) -> tuple[Hypervisor, Domain, RestoreStats]:
    d = info.domain or {}
    dom = domctl.createdomain(hv, str(d["name"]), int(d["vcpus"]), int(d["max_pages"]))
    stats = RestoreStats(info=info)
    try:
        restore_lazy(RestoreContext(hv, dom, info, stats), image)
    except (ImageError, KernelError, ImageChanged) as e:
        _undo(hv, dom)  # a page the restore read did not match: refused as the check's are
        raise ImageError(f"{path}: {e}; nothing is left of the new domain") from None
    except (OutOfMemory, OSError, DomctlError, RestoreError) as e:
        _undo(hv, dom)
        raise RestoreError(f"restoring {path} lazily failed: {e}; nothing is left of the "
                           "new domain") from None
    return hv, dom, stats


def _undo(hv: Hypervisor, dom: Domain) -> None:
    domctl.destroydomain(hv, dom)  # its frames freed: none is absent any more
    domctl.mem_paging_setup(hv, None)
