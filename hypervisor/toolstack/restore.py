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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hypervisor.core import Hypervisor
from hypervisor.cpu.context import set_context
from hypervisor.devices.balloon import restore_state
from hypervisor.domain import Domain
from hypervisor.mm.frames import INVALID_MFN, OutOfMemory
from hypervisor.mm.memory import ENTRIES_PER_TABLE, PAGE_SHIFT, PAGE_SIZE
from hypervisor.mm.pagetable import LEVEL_TYPE
from hypervisor.native import KernelError, NativeKernel
from hypervisor.public.arch_x86 import _PAGE_PRESENT, VGCF_online, vcpu_guest_context
from hypervisor.public.domctl import PFINFO_LTAB_SHIFT, PFINFO_XALLOC
from hypervisor.public.xen import XEN_LEGACY_MAX_VCPUS, shared_info, start_info
from hypervisor.toolstack.builder import BuildError, add_virtio_device, balloon_host
from hypervisor.toolstack.consoled import ConsoleBackend
from hypervisor.toolstack.image import PTE_FRAME_MASK, ImageError, ImageInfo, scan_image
from hypervisor.toolstack.save import Progress
from hypervisor.toolstack.session import machine_mib_for
from hypervisor.toolstack.xenstored import Store, home


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


def localise(tables: np.ndarray, p2m: np.ndarray) -> np.ndarray:
    """x86_pv_localise_page for many tables at once: every present entry's pfn
    becomes its new mfn (the image's check made sure each pfn has one)."""
    present = (tables & np.uint64(_PAGE_PRESENT)) != 0
    entries = tables[present]
    pfns = ((entries & PTE_FRAME_MASK) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    out = tables.copy()
    out[present] = (entries & ~PTE_FRAME_MASK) | (p2m[pfns] << np.uint64(PAGE_SHIFT))
    return out


def machine_for(info: ImageInfo) -> int:
    """Machine memory (MiB) for restoring this image alone."""
    pages = max(int(info.domain.get("max_pages", 0)), info.nr_pfns)  # type: ignore[union-attr]
    return machine_mib_for(-(-pages * PAGE_SIZE // (1 << 20)))


def restore_image(path: str | Path, seed: int | None = None, clock: str = "deterministic",
                  hv: Hypervisor | None = None, progress: Progress | None = None,
                  ) -> tuple[Hypervisor, Domain, RestoreStats]:
    """Check the image, then restore it into a new domain (on ``hv``, or a new
    machine sized for it). The seed shuffles the new frames: by default the
    saved one plus one, so that no pfn is likely to land on its old mfn."""
    t0 = time.perf_counter()
    info = scan_image(path)
    if info.domain is None or not info.domain.get("pvlab_image"):
        raise ImageError(f"{path}: no PVLAB_DOMAIN record: a Xen image, which "
                         "`pvlab image show` can read but pvlab cannot run (it has no "
                         "guest kernel binding)")
    if seed is None:
        seed = int(info.domain.get("seed") or 0) + 1
    if hv is None:
        hv = Hypervisor(machine_for(info), seed=seed, clock=clock)
    d = info.domain
    nr_vcpus = int(d.get("vcpus", 1))
    if max(info.vcpus) >= nr_vcpus:
        raise ImageError(f"{path}: a context for vcpu {max(info.vcpus)}, but the domain has "
                         f"{nr_vcpus} vcpus")
    dom = hv.create_domain(str(d.get("name", "restored")), int(d.get("max_pages", info.nr_pfns)),
                           nr_vcpus)
    stats = RestoreStats(info=info)
    try:
        _restore(hv, dom, info, stats, progress)
    except ImageError:
        hv.destroy_domain(dom)
        raise
    except (OutOfMemory, OSError, KernelError, RestoreError) as e:
        hv.destroy_domain(dom)
        raise RestoreError(f"restoring {path} failed: {e}; nothing is left of the new "
                           "domain") from None
    stats.total_s = time.perf_counter() - t0
    return hv, dom, stats


def _restore(hv: Hypervisor, dom: Domain, info: ImageInfo, stats: RestoreStats,
             progress: Progress | None) -> None:
    machine = hv.machine
    ft = machine.frames
    mem = machine.memory
    frames = mem.u64.reshape(-1, ENTRIES_PER_TABLE)

    # populate: a new frame for every pfn the image gives one
    pfns = info.populated()
    if pfns.size > ft.nr_free:
        raise RestoreError(f"{pfns.size} frames wanted, {ft.nr_free} free")
    p2m = np.full(info.nr_pfns, INVALID_MFN, dtype=np.uint64)
    # frames not zeroed here: every one gets its page from the image below, but
    # the XALLOC ones (allocate only, no data), zeroed after
    mfns = np.array(ft.alloc_many(dom.domid, int(pfns.size), zero=False), dtype=np.int64)
    p2m[pfns] = mfns.astype(np.uint64)
    machine.m2p[mfns] = pfns.astype(np.uint64)
    no_data = pfns[info.nibbles[pfns] == PFINFO_XALLOC >> PFINFO_LTAB_SHIFT]
    frames[p2m[no_data].astype(np.int64)] = 0

    # the pages, localised where they are pagetables
    done = 0
    with open(info.path, "rb", buffering=0) as f:
        for batch in info.batches:
            n = int(batch.with_data.sum())
            if n:
                f.seek(batch.data_offset)
                raw = f.read(n * PAGE_SIZE)
                if len(raw) != n * PAGE_SIZE:
                    raise RestoreError(f"{info.path} changed while it was read")
                pages = np.frombuffer(raw, dtype=np.uint64).reshape(n, ENTRIES_PER_TABLE)
                pfn = batch.pfns[batch.with_data]
                level = batch.nibbles[batch.with_data] & 0x7
                table = (level >= 1) & (level <= 4)
                if table.any():
                    tl = time.perf_counter()
                    pages = pages.copy()
                    pages[table] = localise(pages[table], p2m)
                    stats.localise_s += time.perf_counter() - tl
                    stats.tables += int(table.sum())
                frames[p2m[pfn].astype(np.int64)] = pages
                stats.pages += n
            done += batch.pfns.size
            if progress is not None:
                progress(done, info.nr_pfns)

    # the guest's p2m list, in its own frames
    frame_mfns = p2m[info.p2m_frame_pfns].astype(np.int64)
    flat = np.full(frame_mfns.size * ENTRIES_PER_TABLE, INVALID_MFN, dtype=np.uint64)
    flat[:p2m.size] = p2m
    frames[frame_mfns] = flat.reshape(-1, ENTRIES_PER_TABLE)
    dom.p2m_frames = frame_mfns.tolist()
    dom.p2m_size = int(p2m.size)

    # shared_info: the saved vcpu_info and arch, every port masked, none pending
    shinfo_mfn = ft.alloc(dom.domid)
    ft.xenheap[shinfo_mfn] = True
    dom.set_shared_info(shinfo_mfn)
    old = shared_info.from_buffer_copy(info.shared_info)
    new = dom.shared_info
    for i in range(XEN_LEGACY_MAX_VCPUS):
        new.vcpu_info[i] = old.vcpu_info[i]
        new.vcpu_info[i].evtchn_pending_sel = 0
    new.arch = old.arch
    new.arch.pfn_to_mfn_frame_list_list = 0  # the guest tells it again
    for w in range(64):
        new.evtchn_pending[w] = 0
        new.evtchn_mask[w] = 0xFFFFFFFFFFFFFFFF

    # start_info: new frames, new ports, the new shared_info (process_start_info)
    ctx0 = info.context(0)
    si_pfn = int(ctx0.user_regs.rdx)
    si_maddr = int(p2m[si_pfn]) << PAGE_SHIFT
    si = start_info.from_buffer(mem.buf, si_maddr)
    for what, pfn in (("store", si.store_mfn), ("console", si.console.domU.mfn)):
        if pfn >= p2m.size or p2m[pfn] == INVALID_MFN:
            raise RestoreError(f"start_info's {what} pfn {pfn:#x} is not in the image")
    si.store_mfn = int(p2m[si.store_mfn])
    si.console.domU.mfn = int(p2m[si.console.domU.mfn])
    console_port = dom.evtchn.alloc_unbound(0)
    store_port = dom.evtchn.alloc_unbound(0)
    si.console.domU.evtchn = console_port
    si.store_evtchn = store_port
    si.nr_pages = info.nr_pfns
    si.shared_info = shinfo_mfn << PAGE_SHIFT
    si.flags = 0
    dom.console_backend = ConsoleBackend(dom, si.console.domU.mfn, console_port)
    if hv.xenstore is None:
        hv.xenstore = Store()
    dom.xenstore = hv.xenstore.introduce(dom, si.store_mfn, store_port)
    for rel, value in info.xenstore:
        hv.xenstore.write(f"{home(dom.domid)}/{rel}", value)
    del si
    # the devices, at the addresses and ports the guest knows from its command
    # line, with what the host kept of them
    for d in info.devices:
        try:
            add_virtio_device(hv, dom, restore_state(d, balloon_host(hv, dom)),
                              base=d["base"], port=d["port"])
        except (BuildError, ValueError) as e:
            raise RestoreError(f"the balloon at {d['base']:#x} cannot be re-created: {e}") \
                from None

    # pin again what was pinned, with the recorded types (pin_pagetables)
    for pfn in np.flatnonzero((info.nibbles >= 0x9) & (info.nibbles <= 0xC)).tolist():
        level = int(info.nibbles[pfn]) & 0x7
        mfn = int(p2m[pfn])
        rc = machine.types.get_page_and_type(mfn, LEVEL_TYPE[level], dom.domid)
        if rc:
            raise RestoreError(f"pinning pfn {pfn:#x} as an L{level} table failed ({rc}): "
                               "the hypervisor refuses the table's contents")
        ft.pinned[mfn] = True
        stats.pinned += 1

    # the VCPUs: contexts with machine frames again, the kernel bound
    kernel = info.domain.get("kernel") if info.domain else None
    if kernel:
        dom.kernel_module = str(kernel["module"])
        dom.native = NativeKernel(dom, dom.kernel_module, int(kernel["text"]),
                                  int(kernel["size"]))
        for v in dom.vcpus:
            dom.native.bind(v)
    clocks = info.domain.get("clocks", []) if info.domain else []
    tsc_ns = info.tsc[2] if info.tsc else 0
    for vcpu_id in sorted(info.vcpus):
        ctx = vcpu_guest_context.from_buffer_copy(info.vcpus[vcpu_id])
        ctx.ctrlreg[3] = int(p2m[ctx.ctrlreg[3] >> PAGE_SHIFT]) << PAGE_SHIFT
        if ctx.ctrlreg[1] & 1:
            ctx.ctrlreg[1] = int(p2m[ctx.ctrlreg[1] >> PAGE_SHIFT]) << PAGE_SHIFT
        if vcpu_id == 0:
            ctx.user_regs.rdx = si_maddr >> PAGE_SHIFT
            ctx.user_regs.rax = 0  # the suspend hypercall returns 0: resumed in a new domain
        v = dom.vcpus[vcpu_id]
        rc = set_context(v, bytes(ctx))
        if rc:
            raise RestoreError(f"vcpu{vcpu_id}'s context is refused ({rc}): its cr3 does "
                               "not validate")
        v.online = bool(ctx.flags & VGCF_online)
        v.initialised = True
        v.clock = int(clocks[vcpu_id]) if vcpu_id < len(clocks) else tsc_ns
    hv.flush_tlbs(dom)
