"""Saving a suspended domain as ``xl save`` does: xl's header with the
domain's configuration, then libxl's stream around Xen's libxc migration
stream (tools/libs/guest/xg_sr_save.c and xg_sr_save_x86_pv.c, the non-live
path), then libxl's records of the xenstore nodes and the device models.

The guest has suspended itself (SHUTDOWN_suspend, start_info's mfn in vcpu0's
rdx). The save then

* finds the guest's p2m through shared_info.arch (p2m_cr3, p2m_vaddr, max_pfn:
  the virtual p2m list the kernel published), walking the guest's own tables;
* asks the frame table each page's type, as XEN_DOMCTL_getpageframeinfo3 does:
  a pagetable pinned or in use (validated) is L1..L4, pinned ones with LPINTAB;
  one that is neither is plain data, NOTAB, and goes out raw;
* canonicalises every L1..L4 page (normalise_pagetable): each present entry's
  mfn becomes its pfn, an L4's hypervisor slots are cleared; an mfn that is not
  the domain's is an error naming the pagetable's pfn and the slot;
* writes the VCPU contexts with CR3, the user L4 and vcpu0's rdx as pfns.

Canonicalisation works on whole arrays of tables at once (numpy). The image
goes to a temporary file in the destination's directory, is flushed and
renamed into place: a failed save leaves nothing at the destination.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import Domain, DomctlError, Hypervisor
from hypervisor.public import arch_x86
from hypervisor.public.arch_x86 import (
    _PAGE_PRESENT,
    _PAGE_PSE,
    L1_PAGETABLE_ENTRIES,
    ROOT_PAGETABLE_FIRST_XEN_SLOT,
    ROOT_PAGETABLE_LAST_XEN_SLOT,
    table_offset,
)
from hypervisor.public.domctl import (
    PFINFO_XTAB,
    TSC_MODE_ALWAYS_EMULATE,
    XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL,
    XEN_DOMCTL_SHADOW_OP_CLEAN,
    XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
    XEN_DOMCTL_SHADOW_OP_OFF,
    xen_domctl_shadow_op,
)
from hypervisor.public.sched import SHUTDOWN_suspend
from hypervisor.public.xen import INVALID_MFN, PAGE_SHIFT, PAGE_SIZE
from hypervisor.toolstack import pfinfo, savefile, stream
from hypervisor.toolstack.context import context_of
from hypervisor.toolstack.precopy import (
    NS,
    MigrationInfo,
    Policy,
    PrecopyOptions,
    PrecopyStats,
    Round,
    precopy_policy,
)
from hypervisor.toolstack.savefile import LibxlRecType
from hypervisor.toolstack.stream import RecType
from hypervisor.toolstack.xenstored import Store, home

_T = TypeVar("_T")
PTE_FRAME_MASK = np.uint64(arch_x86.PTE_FRAME_MASK)
P2M_VIRTUAL_LIST = 0xFFFFFFFFFFFFFFFF  # shared_info.arch.pfn_to_mfn_frame_list_list
FPP = PAGE_SIZE // 8                   # p2m entries per frame, 64-bit guest
TSC_KHZ = 1_000_000                    # deterministic clock: one instruction, one ns
# xenstore nodes the toolstack makes itself at XS_INTRODUCE; not carried over
INTRODUCED_NODES = ("name", "domid")

Progress = Callable[[int, int], None]  # (pages done, pages in all)


class SaveError(Exception):
    """The domain cannot be saved; nothing is left at the destination."""


@dataclass
class SaveStats:
    pages: int = 0
    tables: int = 0
    pinned: int = 0
    bytes: int = 0
    canonicalise_s: float = 0.0
    digest_s: float = 0.0   # of total_s, hashing for the integrity digest
    total_s: float = 0.0


# --- finding the guest's memory ------------------------------------------------------

def _walk(hv: Hypervisor, dom: Domain, l4_mfn: int, va: int) -> int:
    """The mfn ``va`` maps to in the guest's tables from ``l4_mfn``, walked
    through foreign mappings as the tools do (map_p2m_tree); SaveError if
    it is not mapped by a 4 KiB page of the domain's."""
    mfn = l4_mfn
    for lvl in (4, 3, 2, 1):
        slot = table_offset(va, lvl)
        try:
            entry = int(domctl.map_foreign_bulk(hv, dom, [mfn])[0][slot])
        except DomctlError:
            entry = 0
        if not entry & _PAGE_PRESENT or (lvl > 1 and entry & _PAGE_PSE):
            raise SaveError(f"va {va:#x} is not mapped by p2m_cr3 (L{lvl} slot {slot})")
        mfn = (entry & arch_x86.PTE_FRAME_MASK) >> PAGE_SHIFT
    return mfn


def locate_p2m(hv: Hypervisor, dom: Domain) -> tuple[np.ndarray, np.ndarray]:
    """The guest's p2m (pfn -> mfn, INVALID_MFN where none) and the pfns of the
    frames that hold it, found from shared_info.arch as Xen's tools find it
    (x86_pv_map_m2p's neighbour, map_p2m_list)."""
    arch = domctl.map_shared_info(hv, dom).arch
    if arch.pfn_to_mfn_frame_list_list != P2M_VIRTUAL_LIST or not arch.p2m_vaddr:
        raise SaveError("the guest has not published its p2m list in shared_info.arch "
                        "(p2m_vaddr, p2m_cr3): its kernel does not support save")
    max_pfn = int(arch.max_pfn)
    if not 0 < max_pfn <= dom.max_pages:
        raise SaveError(f"shared_info.arch.max_pfn is {max_pfn}; the domain may have at "
                        f"most {dom.max_pages} pages")
    nframes = -(-max_pfn // FPP)
    cr3 = int(arch.p2m_cr3) >> PAGE_SHIFT
    if not cr3 or domctl.getpageframeinfo3(hv, dom, np.array([cr3]))[0] == PFINFO_XTAB:
        raise SaveError(f"shared_info.arch.p2m_cr3 {int(arch.p2m_cr3):#x} is no L4 of the "
                        "domain's")
    mfns = np.empty(nframes, dtype=np.int64)
    for i in range(nframes):
        va = int(arch.p2m_vaddr) + i * PAGE_SIZE
        try:
            mfns[i] = _walk(hv, dom, cr3, va)
        except SaveError:
            raise SaveError(f"p2m frame {i} (va {va:#x}) is not mapped by p2m_cr3") from None
    try:
        p2m = np.asarray(domctl.map_foreign_bulk(hv, dom, mfns)).reshape(-1)[:max_pfn].copy()
    except DomctlError:
        raise SaveError("a frame of the p2m list is not the domain's") from None
    frame_pfns = domctl.map_m2p(hv)[mfns].astype(np.int64)
    bad = np.flatnonzero((frame_pfns >= max_pfn)
                         | (p2m[np.minimum(frame_pfns, max_pfn - 1)] != mfns.astype(np.uint64)))
    if bad.size:
        raise SaveError(f"bad mfn in p2m_frame_list[{int(bad[0])}]: "
                        f"{int(mfns[bad[0]]):#x} is not in the domain's pseudophysical map")
    return p2m, frame_pfns


def page_types(hv: Hypervisor, dom: Domain, p2m: np.ndarray) -> np.ndarray:
    """XEN_DOMCTL_getpageframeinfo3 for every pfn: the PFINFO type (u32); XTAB
    where the p2m has no frame. Every frame the p2m names must be the
    domain's, and the M2P must name its pfn back."""
    types = np.full(p2m.size, PFINFO_XTAB, dtype=np.uint32)
    pfns = np.flatnonzero(p2m != INVALID_MFN)
    mfns = p2m[pfns].astype(np.int64)
    out = domctl.getpageframeinfo3(hv, dom, mfns)
    m2p = domctl.map_m2p(hv)
    foreign = out == PFINFO_XTAB
    foreign[~foreign] = m2p[mfns[~foreign]] != pfns[~foreign].astype(np.uint64)
    if foreign.any():
        i = int(np.flatnonzero(foreign)[0])
        raise SaveError(f"p2m[{int(pfns[i]):#x}] = {int(mfns[i]):#x}: not a frame of the "
                        "domain's (or the M2P disagrees)")
    types[pfns] = out
    return types


# --- canonicalisation ----------------------------------------------------------------

def canonicalise(tables: np.ndarray, levels: np.ndarray, table_pfns: np.ndarray,
                 p2m: np.ndarray, m2p: np.ndarray) -> np.ndarray:
    """normalise_pagetable for many tables at once: ``tables`` is (n, 512) u64,
    the guest's pages read through a foreign mapping (never changed: the
    result is a copy); ``levels`` their levels (1..4) and ``table_pfns``
    their pfns, one a table; ``p2m`` the guest's pfn -> mfn (INVALID_MFN
    where none) and ``m2p`` the machine's mfn -> pfn. Returns the tables
    with every present entry's mfn replaced by its pfn and an L4's Xen slots
    cleared; a frame that is not the domain's, or a superpage, is a
    SaveError. restore.localise_page undoes it."""
    out = tables.copy()
    xen = slice(ROOT_PAGETABLE_FIRST_XEN_SLOT, ROOT_PAGETABLE_LAST_XEN_SLOT + 1)
    out[levels == 4, xen] = 0  # the hypervisor's slots: it fills them again itself
    present = (out & np.uint64(_PAGE_PRESENT)) != 0
    superpage = present & ((out & np.uint64(_PAGE_PSE)) != 0) & (levels[:, None] > 1)
    if superpage.any():
        row, slot = (int(x[0]) for x in np.nonzero(superpage))
        raise SaveError(f"cannot migrate a superpage: pagetable pfn {int(table_pfns[row]):#x} "
                        f"(L{int(levels[row])}) slot {slot}: {int(out[row, slot]):#018x}")
    rows, slots = np.nonzero(present)
    entries = out[rows, slots]
    mfns = (entries & PTE_FRAME_MASK) >> np.uint64(PAGE_SHIFT)
    ok = mfns < np.uint64(m2p.size)
    pfns = np.full(mfns.size, INVALID_MFN, dtype=np.uint64)
    pfns[ok] = m2p[mfns[ok].astype(np.int64)]
    ok &= pfns < np.uint64(p2m.size)
    ok[ok] = p2m[pfns[ok].astype(np.int64)] == mfns[ok]
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        row, slot = int(rows[i]), int(slots[i])
        raise SaveError(f"pagetable pfn {int(table_pfns[row]):#x} (L{int(levels[row])}) "
                        f"slot {slot}: entry {int(entries[i]):#018x} holds mfn "
                        f"{int(mfns[i]):#x}, which is not the domain's (bad mfn for "
                        f"L{int(levels[row])}[{slot}])")
    out[rows, slots] = (entries & ~PTE_FRAME_MASK) | (pfns << np.uint64(PAGE_SHIFT))
    return out


def in_pseudophysmap(tables: np.ndarray, levels: np.ndarray, p2m: np.ndarray,
                     m2p: np.ndarray) -> np.ndarray:
    """Per table: every present entry names a frame of the domain's, as
    mfn_in_pseudophysmap asks (an L4's hypervisor slots aside). A live round
    defers a table that is not (normalise_pagetable's EAGAIN), before
    canonicalise would refuse it."""
    t = tables.copy()
    t[levels == 4, ROOT_PAGETABLE_FIRST_XEN_SLOT:ROOT_PAGETABLE_LAST_XEN_SLOT + 1] = 0
    present = (t & np.uint64(_PAGE_PRESENT)) != 0
    mfns = ((t & PTE_FRAME_MASK) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    inside = mfns < m2p.size
    pfns = np.where(inside, m2p[np.where(inside, mfns, 0)], np.uint64(INVALID_MFN))
    mine = pfns < np.uint64(p2m.size)
    back = p2m[np.where(mine, pfns, 0).astype(np.int64)] == mfns.astype(np.uint64)
    return (~present | (inside & mine & back)).all(axis=1)


def _mfn_to_pfn(hv: Hypervisor, p2m: np.ndarray, mfn: int, what: str) -> int:
    """mfn_to_pfn with Xen's mfn_in_pseudophysmap check."""
    m2p = domctl.map_m2p(hv)
    pfn = int(m2p[mfn]) if 0 <= mfn < m2p.size else -1
    if not 0 <= pfn < p2m.size or int(p2m[pfn]) != mfn:
        raise SaveError(f"bad mfn for {what}: {mfn:#x} is not in the domain's "
                        "pseudophysical map")
    return pfn


# --- the records ---------------------------------------------------------------------

def write_one_vcpu_basic(hv: Hypervisor, dom: Domain, vcpu_id: int,
                         p2m: np.ndarray) -> bytes:
    """A VCPU's context with its frames as pfns (restore.update_vcpu_context
    turns them back into mfns)."""
    ctx = domctl.getvcpucontext(dom, vcpu_id)
    ctx.ctrlreg[3] = _mfn_to_pfn(hv, p2m, ctx.ctrlreg[3] >> PAGE_SHIFT,
                                 f"vcpu{vcpu_id}'s cr3") << PAGE_SHIFT
    if ctx.ctrlreg[1]:
        user = _mfn_to_pfn(hv, p2m, ctx.ctrlreg[1] >> PAGE_SHIFT, f"vcpu{vcpu_id}'s user L4")
        ctx.ctrlreg[1] = stream.USER_L4_SET | user << PAGE_SHIFT
    if vcpu_id == 0:
        # the suspend record: start_info's mfn, the hypercall's third argument
        ctx.user_regs.rdx = _mfn_to_pfn(hv, p2m, int(ctx.user_regs.rdx), "suspend record")
        ctx.user_regs.rax = 0  # the suspend hypercall's result as Xen leaves it
    return bytes(ctx)


def vcpu_records(hv: Hypervisor, dom: Domain, p2m: np.ndarray) -> list[tuple[int, bytes]]:
    """write_all_vcpu_information: (vcpu id, canonical context) for every
    online VCPU."""
    online = [i for i in range(domctl.max_vcpus(dom)) if domctl.getvcpuinfo(dom, i).online]
    return [(i, write_one_vcpu_basic(hv, dom, i, p2m)) for i in online]


def domain_config(dom: Domain, kind: str, seed: int | None,
                  devices: list[dict]) -> bytes:
    """The configuration xl puts in its save file's header: libxl_domain_config's
    JSON (c_info, b_info with the VCPUs up as avail_vcpus), and under "pvlab"
    what only pvlab needs to run the image again: the kernel binding, each
    VCPU's clock, the seed and where each device is (their state goes in
    EMULATOR_CONTEXT records)."""
    config = {
        "c_info": {"type": "pv", "name": dom.name},
        "b_info": {"max_vcpus": domctl.max_vcpus(dom),
                   "avail_vcpus": [i for i in range(domctl.max_vcpus(dom))
                                   if domctl.getvcpuinfo(dom, i).online],
                   "max_memkb": dom.max_pages * PAGE_SIZE // 1024},
        "pvlab": {
            "image": savefile.PVLAB_IMAGE_VERSION,
            "kind": kind,
            "seed": seed,
            "kernel": domctl.kernel_binding(dom),
            "clocks": domctl.vcpu_clocks(dom),
            "devices": [{k: d[k] for k in savefile.DEVICE_CONFIG_KEYS} for d in devices],
        },
    }
    return json.dumps(config, sort_keys=True).encode()


def xenstore_record(store: Store, dom: Domain) -> bytes:
    """The domain's home in the store, as NUL-terminated relative path and value
    pairs: the data of libxl's EMULATOR_XENSTORE_DATA record."""
    top = home(dom.domid)
    out = bytearray()
    for path, value in sorted(store.nodes.items()):
        if path.startswith(top + "/"):
            rel = path[len(top) + 1:]
            if rel not in INTRODUCED_NODES:
                out += rel.encode() + b"\0" + value + b"\0"
    return bytes(out)


def devices_state(dom: Domain) -> list[dict]:
    """The domain's devices, where they are and what the host keeps of them
    (a balloon's target and actual: the ``keep`` policy relies on them). The
    guest must have frozen them: a live one is refused."""
    try:
        return domctl.devices_state(dom)
    except DomctlError as e:
        raise SaveError(str(e)) from None


# --- the stream ----------------------------------------------------------------------

@dataclass
class SaveContext:
    """What the save found before it writes a byte (xc_sr_context's save half)."""

    p2m: np.ndarray           # pfn -> mfn
    frame_pfns: np.ndarray    # the pfns of the p2m list's frames
    types: np.ndarray         # PFINFO per pfn
    canon: np.ndarray         # the canonical pagetables, in table_pfns order
    slot_of: np.ndarray       # pfn -> its row in canon, or -1
    vcpus: list[tuple[int, bytes]]
    devices: list[dict]       # each device model's state (EMULATOR_CONTEXT)


def x86_pv_setup(hv: Hypervisor, dom: Domain, stats: SaveStats) -> SaveContext:
    """Everything that can fail, before the first byte is written: the p2m,
    the page types, every pagetable normalised, the VCPU records."""
    if dom.shutdown_reason != SHUTDOWN_suspend:
        raise SaveError(f"domain {dom.name} is not suspended")
    p2m, frame_pfns = locate_p2m(hv, dom)
    types = page_types(hv, dom, p2m)
    # a pfn with no frame (ballooned out: INVALID_MFN in the p2m) is XTAB,
    # level 0: never mapped as a table, never counted as one
    levels = pfinfo.level(pfinfo.nibble(types))
    table_pfns = np.flatnonzero(levels)
    tc = time.perf_counter()
    tables = np.asarray(domctl.map_foreign_bulk(hv, dom, p2m[table_pfns].astype(np.int64)))
    canon = canonicalise(tables, levels[table_pfns], table_pfns, p2m, domctl.map_m2p(hv))
    stats.canonicalise_s = time.perf_counter() - tc
    stats.tables = int(table_pfns.size)
    stats.pinned = int(pfinfo.is_pinned_table(pfinfo.nibble(types)).sum())
    slot_of = np.full(p2m.size, -1, dtype=np.int64)
    slot_of[table_pfns] = np.arange(table_pfns.size)
    devices = devices_state(dom)
    return SaveContext(p2m, frame_pfns, types, canon, slot_of, vcpu_records(hv, dom, p2m),
                       devices)


def write_static_data(hv: Hypervisor, dom: Domain, out: BinaryIO, sc: SaveContext) -> None:
    """The libxc headers, X86_PV_INFO, STATIC_DATA_END and X86_PV_P2M_FRAMES
    (write_x86_pv_info, write_x86_pv_p2m_frames)."""
    major, minor = domctl.xen_version(hv)
    stream.write_headers(out, major, minor)
    rec = stream.write_record
    rec(out, RecType.X86_PV_INFO, stream.X86_PV_INFO.pack(stream.GUEST_WIDTH_X86_64,
                                                          stream.PT_LEVELS_X86_64))
    rec(out, RecType.STATIC_DATA_END)
    max_pfn = sc.p2m.size - 1
    p2m_list = np.zeros(max_pfn // FPP + 1, dtype=np.uint64)
    p2m_list[:sc.frame_pfns.size] = sc.frame_pfns.astype(np.uint64)
    rec(out, RecType.X86_PV_P2M_FRAMES,
        stream.P2M_FRAMES_HDR.pack(0, max_pfn) + p2m_list.tobytes())


def write_batch(hv: Hypervisor, dom: Domain, out: savefile.CountingWriter, sc: SaveContext,
                pfns: np.ndarray) -> int:
    """One PAGE_DATA record: the batch's types and pfns, then the pages of those
    that have data, pagetables in their canonical form. Returns the pages."""
    t = sc.types[pfns]
    with_data = pfns[t != PFINFO_XTAB]
    pages = np.asarray(domctl.map_foreign_bulk(hv, dom, sc.p2m[with_data].astype(np.int64)))
    rows = sc.slot_of[with_data]
    is_table = rows >= 0
    if is_table.any():
        pages[is_table] = sc.canon[rows[is_table]]
    entries = (t.astype(np.uint64) << np.uint64(stream.PAGE_DATA_TYPE_SHIFT)) \
        | pfns.astype(np.uint64)
    body_len = stream.PAGE_DATA_HDR.size + 8 * pfns.size + PAGE_SIZE * with_data.size
    out.write(stream.RHDR.pack(RecType.PAGE_DATA, body_len))
    out.write(stream.PAGE_DATA_HDR.pack(pfns.size))
    out.write(entries.tobytes())
    out.write_pages(pages.tobytes())  # body_len is a multiple of 8: no padding
    return int(with_data.size)


def send_domain_memory_nonlive(hv: Hypervisor, dom: Domain, out: BinaryIO, sc: SaveContext,
                               stats: SaveStats, progress: Progress | None) -> None:
    """Every pfn once, in batches of MAX_BATCH_SIZE (restore: process_page_data)."""
    total = sc.p2m.size
    for first in range(0, total, stream.MAX_BATCH_SIZE):
        pfns = np.arange(first, min(first + stream.MAX_BATCH_SIZE, total))
        stats.pages += write_batch(hv, dom, out, sc, pfns)
        if progress is not None:
            progress(int(pfns[-1]) + 1, total)


def end_of_checkpoint(hv: Hypervisor, dom: Domain, out: BinaryIO, sc: SaveContext) -> None:
    """x86_pv_end_of_checkpoint: X86_TSC_INFO (write_tsc_info; restore:
    handle_tsc_info), SHARED_INFO (write_shared_info), a X86_PV_VCPU_BASIC
    per VCPU."""
    rec = stream.write_record
    clock = max(domctl.vcpu_clocks(dom), default=0)
    rec(out, RecType.X86_TSC_INFO,
        stream.X86_TSC_INFO.pack(TSC_MODE_ALWAYS_EMULATE, TSC_KHZ, clock, 0))
    mfn = domctl.shared_info_frame(dom)
    rec(out, RecType.SHARED_INFO, domctl.map_foreign_range(hv, dom, mfn).tobytes())
    for vcpu_id, ctx in sc.vcpus:
        rec(out, RecType.X86_PV_VCPU_BASIC, stream.VCPU_HDR.pack(vcpu_id) + ctx)


def write_checkpoint(hv: Hypervisor, dom: Domain, out: BinaryIO, sc: SaveContext) -> None:
    """The end of an epoch of a checkpointed stream, as Xen interleaves its
    two layers on one fd: libxc's CHECKPOINT (write_checkpoint_record), then
    libxl's checkpoint records inline, before libxc's next record
    (libxl_stream_write.c's checkpoint: the emulator records, CHECKPOINT_END).
    The receiver's libxc hands the fd to libxl at CHECKPOINT and takes it
    back after CHECKPOINT_END (restore.receive_checkpoints)."""
    stream.write_record(out, RecType.CHECKPOINT)
    write_emulator_records(hv, dom, out, sc)
    savefile.write_libxl_record(out, LibxlRecType.CHECKPOINT_END)


def write_end_of_checkpoint(hv: Hypervisor, dom: Domain, out: BinaryIO, sc: SaveContext,
                            checkpoint: bool) -> None:
    """The end of the libxc stream: end_of_checkpoint, a checkpoint's
    CHECKPOINT with libxl's records after it if it is one, END."""
    end_of_checkpoint(hv, dom, out, sc)
    if checkpoint:
        write_checkpoint(hv, dom, out, sc)
    stream.write_record(out, RecType.END)


def write_emulator_records(hv: Hypervisor, dom: Domain, out: BinaryIO,
                           sc: SaveContext) -> None:
    """libxl's EMULATOR_XENSTORE_DATA (the xenstore nodes) and an
    EMULATOR_CONTEXT per device model."""
    rec = savefile.write_libxl_record
    store = context_of(hv).store
    if store is not None:
        rec(out, LibxlRecType.EMULATOR_XENSTORE_DATA,
            savefile.emulator_record(0, xenstore_record(store, dom)))
    for index, state in enumerate(sc.devices):
        rec(out, LibxlRecType.EMULATOR_CONTEXT,
            savefile.emulator_record(index, json.dumps(state, sort_keys=True).encode()))


def write_libxl_tail(hv: Hypervisor, dom: Domain, out: BinaryIO, sc: SaveContext,
                     checkpoint: bool) -> None:
    """What libxl writes after the libxc stream (libxl_stream_write.c): the
    emulator records, unless a checkpoint carried them, then END."""
    if not checkpoint:
        write_emulator_records(hv, dom, out, sc)
    savefile.write_libxl_record(out, LibxlRecType.END)


def write_image(hv: Hypervisor, dom: Domain, out: BinaryIO, checkpoint: bool = False,
                seed: int | None = None, progress: Progress | None = None) -> SaveStats:
    """Write the whole image of a suspended domain to ``out``: xl's header
    and config, libxl's header and LIBXC_CONTEXT, the libxc stream
    (xg_sr_save.c's save: setup, static data, memory, end of checkpoint),
    libxl's records after it; every octet hashed on its way out, the
    digest written into the xl header last. ``out`` must be seekable."""
    t0 = time.perf_counter()
    stats = SaveStats()
    sc = x86_pv_setup(hv, dom, stats)
    config = domain_config(dom, "checkpoint" if checkpoint else "save",
                           hv.seed if seed is None else seed, sc.devices)
    hashed = savefile.DigestWriter(out)
    digest_offset = savefile.write_xl_header(hashed, config)
    savefile.write_libxl_header(hashed)
    savefile.write_libxl_record(hashed, LibxlRecType.LIBXC_CONTEXT)
    write_static_data(hv, dom, hashed, sc)
    send_domain_memory_nonlive(hv, dom, hashed, sc, stats, progress)
    write_end_of_checkpoint(hv, dom, hashed, sc, checkpoint)
    write_libxl_tail(hv, dom, hashed, sc, checkpoint)
    hashed.finish(digest_offset)
    stats.digest_s = hashed.seconds
    stats.total_s = time.perf_counter() - t0
    return stats


def save_to_file(hv: Hypervisor, dom: Domain, path: str | os.PathLike[str],
                 checkpoint: bool = False, seed: int | None = None,
                 progress: Progress | None = None) -> SaveStats:
    """Write the image to a temporary file beside ``path``, flush it to disk and
    rename it into place. On any failure the temporary file is removed and
    nothing is left at ``path``."""
    def write(f: BinaryIO) -> SaveStats:
        stats = write_image(hv, dom, f, checkpoint, seed, progress)
        stats.bytes = f.tell()
        return stats

    stats, total_s = write_in_place(path, write)
    stats.total_s = total_s  # the data on disk, as xl save ends
    return stats


def write_in_place(path: str | os.PathLike[str], write: Callable[[BinaryIO], _T]
                    ) -> tuple[_T, float]:
    """``write`` into a temporary file beside ``path``, flushed to disk and
    renamed into place, and the seconds it all took; on any failure the
    temporary file is removed and nothing is left at ``path``."""
    dest = Path(path)
    if dest.is_dir():
        raise SaveError(f"{dest} is a directory; name the image file")
    if not dest.parent.is_dir():
        raise SaveError(f"{dest.parent} does not exist: cannot write {dest.name} there")
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    t0 = time.perf_counter()
    try:
        with open(tmp, "wb", buffering=1 << 22) as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SaveError(f"cannot write {dest}: {e.strerror or e}") from None
        raise
    return result, time.perf_counter() - t0


# --- the live save (xg_sr_save.c send_domain_memory_live) ------------------------------

class LiveCallbacks(Protocol):
    """What the live save's caller does for it (save_callbacks): let the
    guest run while a round is on the wire, and suspend it through the same
    path as a save (raising SaveError if it does not suspend)."""

    def run_for(self, ns: int) -> None: ...

    def suspend(self) -> None: ...


Report = Callable[[MigrationInfo], None]


@dataclass
class LiveSave:
    """What the live loop carries from round to round (xc_sr_context's save
    half in a live save)."""

    hv: Hypervisor
    dom: Domain
    out: savefile.CountingWriter
    callbacks: LiveCallbacks
    opts: PrecopyOptions
    info: MigrationInfo
    report: Report | None
    p2m: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    frame_pfns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    deferred: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    paused: bool = False    # suspended: a page that fails now is an error
    start_ns: int = 0       # the guest's time at the start, for the report
    logdirty: bool = False
    reported: int = 0       # rounds the report has seen
    # asked between rounds: switch to post-copy now (QEMU's migrate-start-postcopy)
    switch: Callable[[], bool] | None = None
    to_postcopy: bool = False  # the rounds ended in a switch to post-copy


def _shadow_op(ls: LiveSave, op: int, bitmap: np.ndarray | None = None,
               mode: int = 0) -> xen_domctl_shadow_op:
    arg = xen_domctl_shadow_op(op=op, mode=mode, pages=ls.p2m.size)
    rc = domctl.shadow_op(ls.hv, ls.dom, arg, bitmap)
    if rc:
        raise SaveError(f"log-dirty operation {op} failed ({rc})")
    return arg


def enable_logdirty(ls: LiveSave) -> None:
    """ENABLE_LOGDIRTY; if it fails, OFF and ENABLE again, as Xen does for
    a domain whose log is already on (Xen's VRAM tracking)."""
    arg = xen_domctl_shadow_op(op=XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
    if domctl.shadow_op(ls.hv, ls.dom, arg):
        domctl.shadow_op(ls.hv, ls.dom, xen_domctl_shadow_op(op=XEN_DOMCTL_SHADOW_OP_OFF))
        arg = xen_domctl_shadow_op(op=XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
        rc = domctl.shadow_op(ls.hv, ls.dom, arg)
        if rc:
            raise SaveError(f"failed to enable log-dirty mode ({rc})")
    ls.logdirty = True


def disable_logdirty(ls: LiveSave) -> None:
    """OFF, at the end and on every failure (the save's cleanup)."""
    if ls.logdirty and ls.dom.domid in ls.hv.domains:
        domctl.shadow_op(ls.hv, ls.dom, xen_domctl_shadow_op(op=XEN_DOMCTL_SHADOW_OP_OFF))
    ls.logdirty = False


def clean_dirty_bitmap(ls: LiveSave, final: bool = False) -> np.ndarray:
    """CLEAN: the pfns written since the last one (LOGDIRTY_FINAL in the
    paused round), the log emptied for the next round."""
    bitmap = np.zeros(-(-ls.p2m.size // 8), dtype=np.uint8)
    arg = _shadow_op(ls, XEN_DOMCTL_SHADOW_OP_CLEAN, bitmap,
                     XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL if final else 0)
    if arg.pages != ls.p2m.size:
        raise SaveError(f"failed to retrieve the log-dirty bitmap: {arg.pages} bits for "
                        f"{ls.p2m.size} pfns")
    ls.info.dirty_sync_count += 1
    return np.unpackbits(bitmap, bitorder="little")[:ls.p2m.size].astype(bool)


def check_vm_state(ls: LiveSave) -> None:
    """x86_pv_check_vm_state: the guest's p2m read again; its frames (sent
    once, in X86_PV_P2M_FRAMES) must not have moved, as Xen aborts when the
    p2m generation changes."""
    p2m, frame_pfns = locate_p2m(ls.hv, ls.dom)
    if p2m.size != ls.p2m.size or not np.array_equal(frame_pfns, ls.frame_pfns):
        raise SaveError("the guest's p2m list changed its frames or size during the live "
                        "save: migration aborted")
    ls.p2m = p2m


def write_batch_live(ls: LiveSave, pfns: np.ndarray) -> tuple[int, int]:
    """One PAGE_DATA record of a live or final round (write_batch): the
    types asked now, pagetables normalised now. In a live round a pfn with
    no frame (ballooned) or a table that fails to normalise is deferred:
    sent as XTAB, sent again in the final round; once suspended, either is
    an error. Returns (pages with data, pfns deferred)."""
    hv, dom = ls.hv, ls.dom
    mfns = ls.p2m[pfns]
    m2p = domctl.map_m2p(hv)
    valid = mfns < np.uint64(m2p.size)
    types = np.full(pfns.size, PFINFO_XTAB, dtype=np.uint32)
    types[valid] = domctl.getpageframeinfo3(hv, dom, mfns[valid].astype(np.int64))
    ours = valid & (types != PFINFO_XTAB)
    ours[ours] = m2p[mfns[ours].astype(np.int64)] == pfns[ours].astype(np.uint64)
    stray = np.flatnonzero(valid & ~ours)
    if ls.paused and stray.size:
        i = int(stray[0])
        raise SaveError(f"p2m[{int(pfns[i]):#x}] = {int(mfns[i]):#x}: not a frame of the "
                        "domain's (or the M2P disagrees)")
    defer = ~ours & (not ls.paused)
    types[~ours] = PFINFO_XTAB
    data = np.flatnonzero(ours)
    pages = np.asarray(domctl.map_foreign_bulk(hv, dom, mfns[data].astype(np.int64)))
    levels = pfinfo.level(pfinfo.nibble(types[data]))
    rows = np.flatnonzero(levels)
    if rows.size:
        tables = pages[rows]  # as the guest wrote them: log-dirty's D bits given back
        good = np.ones(rows.size, bool) if ls.paused else \
            in_pseudophysmap(tables, levels[rows], ls.p2m, m2p)
        try:
            pages[rows[good]] = canonicalise(tables[good], levels[rows][good],
                                             pfns[data][rows][good], ls.p2m, m2p)
        except SaveError as e:
            raise SaveError(f"{e} in the final round, with the guest suspended") \
                if ls.paused else e from None
        failed = data[rows[~good]]
        defer[failed] = True
        types[failed] = PFINFO_XTAB
    keep = types[data] != PFINFO_XTAB
    write_page_data(ls.out, pfns, types, pages[keep])
    ls.deferred[pfns[defer]] = True
    return int(keep.sum()), int(defer.sum())


def write_page_data(out: BinaryIO, pfns: np.ndarray, types: np.ndarray,
                    pages: np.ndarray, rtype: int = RecType.PAGE_DATA) -> None:
    """A PAGE_DATA record (or one of its layout: POSTCOPY_PAGE_DATA, or
    POSTCOPY_PFNS with no pages) of these pfns and types, with ``pages``
    for those that have data. A saved file's writer keeps the digests of
    PAGE_DATA's pages (write_pages); a wire has none."""
    entries = (types.astype(np.uint64) << np.uint64(stream.PAGE_DATA_TYPE_SHIFT)) \
        | pfns.astype(np.uint64)
    body_len = stream.PAGE_DATA_HDR.size + 8 * pfns.size + PAGE_SIZE * len(pages)
    out.write(stream.RHDR.pack(rtype, body_len))
    out.write(stream.PAGE_DATA_HDR.pack(pfns.size))
    out.write(entries.tobytes())
    write_pages = getattr(out, "write_pages", out.write)
    write_pages(np.ascontiguousarray(pages).tobytes())


def send_dirty_pages(ls: LiveSave, dirty: np.ndarray, iteration: int) -> Round:
    """The round's pfns in pfn order, MAX_BATCH_SIZE a record; after it the
    guest's state is checked (check_vm_state)."""
    start = ls.out.tell()
    todo = np.flatnonzero(dirty)
    pages = deferred = 0
    for first in range(0, todo.size, stream.MAX_BATCH_SIZE):
        p, d = write_batch_live(ls, todo[first:first + stream.MAX_BATCH_SIZE])
        pages += p
        deferred += d
    octets = ls.out.tell() - start
    r = Round(iteration, pages, int(todo.size), octets, deferred, ls.opts.wire_ns(octets),
              ls.paused)
    ls.info.rounds.append(r)
    ls.info.transferred += octets
    return r


def _reported(ls: LiveSave, r: Round, dirty_next: int) -> None:
    """The counters after a round, to the caller's report."""
    info = ls.info
    info.status = "active"
    info.remaining = max(dirty_next, 0) * PAGE_SIZE
    if r.wire_ns and dirty_next >= 0:
        info.dirty_pages_rate = dirty_next * NS // r.wire_ns
    bw = info.bandwidth()
    if bw and dirty_next >= 0:
        info.expected_downtime_ns = int(dirty_next * PAGE_SIZE * NS / bw)
    info.total_ns = _elapsed(ls)
    ls.reported = len(info.rounds)
    if ls.report is not None:
        ls.report(info)


def _elapsed(ls: LiveSave) -> int:
    """Virtual time since the start: the guest's, while it ran (the rounds
    on the wire, its suspend path), then what was sent with it suspended."""
    return max(domctl.vcpu_clocks(ls.dom), default=0) - ls.start_ns + ls.info.downtime_ns


def send_memory_live(ls: LiveSave) -> Policy:
    """The rounds while the guest runs, as Xen's loop: the first sends every
    pfn; after each the policy is asked with the dirty count unknown (it may
    stop on the iteration), then CLEAN gives the next round's pfns and the
    policy is asked with their count. A round is sent unless the policy
    aborts, even when it says stop: the paused round then has less to do.
    Returns how the rounds stopped: STOP_AND_COPY or POSTCOPY (the policy's,
    or ``ls.switch`` asking for it between rounds)."""
    stats = PrecopyStats(dirty_count=int(ls.p2m.size))
    dirty = np.ones(ls.p2m.size, dtype=bool)
    x = 0
    while True:
        decision = _ask_policy(ls, stats)
        x += 1
        if stats.dirty_count > 0 and decision != Policy.ABORT:
            r = send_dirty_pages(ls, dirty, x - 1)
            check_vm_state(ls)
            ls.callbacks.run_for(r.wire_ns)  # the guest runs while the round is sent
        if decision != Policy.CONTINUE_PRECOPY:
            break
        stats.iteration = x
        stats.total_written += stats.dirty_count
        stats.dirty_count = -1
        decision = _ask_policy(ls, stats)
        if decision != Policy.CONTINUE_PRECOPY:
            break
        dirty = clean_dirty_bitmap(ls)
        stats.dirty_count = int(dirty.sum())
        _reported(ls, ls.info.rounds[-1], stats.dirty_count)
    if decision == Policy.ABORT:
        raise SaveError("the pre-copy policy aborted the live save")
    if ls.info.rounds and ls.reported < len(ls.info.rounds):
        _reported(ls, ls.info.rounds[-1], -1)  # the last live round, not followed by a CLEAN
    return decision


def _ask_policy(ls: LiveSave, stats: PrecopyStats) -> Policy:
    """The policy's answer, made POSTCOPY if the caller asked for the switch
    meanwhile (QEMU's migration_iteration_run, start_postcopy)."""
    decision = precopy_policy(stats, ls.opts, ls.info.bandwidth())
    if decision == Policy.CONTINUE_PRECOPY and ls.switch is not None and ls.switch():
        return Policy.POSTCOPY
    return decision


def suspend_and_send_dirty(ls: LiveSave) -> None:
    """The guest suspended through the save's path, then the final round:
    the pages dirtied since the last CLEAN and every deferred one. Nothing
    may fail to normalise now (Xen would defer and drop it: pvlab refuses)."""
    ls.callbacks.suspend()
    r = send_epoch(ls)
    ls.info.downtime_ns += r.wire_ns
    _reported(ls, r, 0)


def live_config(hv: Hypervisor, dom: Domain, seed: int | None, kind: str = "live save"
                ) -> bytes:
    """The xl header's config of a live save, written before the first round:
    the clocks are not known yet (X86_TSC_INFO carries the time at the end),
    the devices are named by place (their state follows at the end)."""
    places = context_of(hv).domain(dom).devices
    config = json.loads(domain_config(dom, kind, hv.seed if seed is None else seed, []))
    config["pvlab"]["clocks"] = []
    config["pvlab"]["devices"] = places
    return json.dumps(config, sort_keys=True).encode()


def _live_setup(hv: Hypervisor, dom: Domain, out: savefile.CountingWriter,
                callbacks: LiveCallbacks, opts: PrecopyOptions,
                report: Report | None) -> LiveSave:
    """The live save's context (x86_pv_setup's live half): the p2m found
    while the guest runs, nothing deferred yet."""
    if dom.shutdown_reason is not None:
        raise SaveError(f"domain {dom.name} is not running: a live save needs it running")
    ls = LiveSave(hv, dom, out, callbacks, opts, MigrationInfo(), report)
    ls.p2m, ls.frame_pfns = locate_p2m(hv, dom)
    ls.deferred = np.zeros(ls.p2m.size, dtype=bool)
    ls.start_ns = max(domctl.vcpu_clocks(dom), default=0)
    ls.info.total = int(ls.p2m.size) * PAGE_SIZE
    return ls


def write_image_live(hv: Hypervisor, dom: Domain, out: BinaryIO, callbacks: LiveCallbacks,
                     opts: PrecopyOptions, seed: int | None = None,
                     report: Report | None = None, digest: bool = True) -> MigrationInfo:
    """A live save of a running domain into ``out``, in the layers of
    write_image: xl's header and config, libxl's header, LIBXC_CONTEXT, the
    static records and X86_PV_P2M_FRAMES once, the live rounds and the
    final one, the end of the checkpoint (TSC, shared info, the VCPUs), END,
    libxl's records. Log-dirty is off again at the end and on any failure.
    The guest is left suspended on success; the caller decides its fate.
    ``digest`` False: no integrity digest (a stream on the wire, which never
    seeks; a file needs it)."""
    writer = savefile.DigestWriter(out) if digest else savefile.CountingWriter(out)
    ls = _live_setup(hv, dom, writer, callbacks, opts, report)
    try:
        enable_logdirty(ls)
        digest_offset = _write_live_head(ls, seed)
        send_memory_live(ls)
    except BaseException as e:
        _failed(ls, e)
        raise
    return end_live_stream(ls, digest_offset)


def _failed(ls: LiveSave, e: BaseException) -> None:
    disable_logdirty(ls)
    ls.info.status = "failed"
    ls.info.error = str(e)


def end_live_stream(ls: LiveSave, digest_offset: int = 0) -> MigrationInfo:
    """A live stream's stop-and-copy after its rounds: the guest suspended,
    the final round, log-dirty off, the end of the checkpoint and libxl's
    records (and the digest at ``digest_offset`` in a file). Log-dirty is
    off on a failure too."""
    try:
        suspend_and_send_dirty(ls)
        disable_logdirty(ls)
        _write_live_tail(ls, digest_offset)
    except BaseException as e:
        _failed(ls, e)
        raise
    ls.info.status = "completed"
    ls.info.remaining = 0
    ls.info.total_ns = _elapsed(ls)
    if ls.report is not None:
        ls.report(ls.info)
    return ls.info


def start_live_stream(hv: Hypervisor, dom: Domain, out: BinaryIO, callbacks: LiveCallbacks,
                      opts: PrecopyOptions, seed: int | None = None,
                      report: Report | None = None,
                      switch: Callable[[], bool] | None = None) -> LiveSave:
    """The start of a live save on the wire (no digest) for a caller that
    ends it its own way: xl's header, libxl's, LIBXC_CONTEXT, the static
    records, log-dirty on, then the pre-copy rounds unless ``opts`` asks for
    a pure post-copy. ``switch`` is asked between rounds whether to switch
    to post-copy now. ``to_postcopy`` then says how the caller goes on:
    switch_to_postcopy, or end_live_stream. The guest still runs; log-dirty
    is off again on a failure here, and the caller's to turn off after."""
    ls = _live_setup(hv, dom, savefile.CountingWriter(out), callbacks, opts, report)
    ls.switch = switch
    try:
        enable_logdirty(ls)
        _write_live_head(ls, seed)
        ls.to_postcopy = opts.pure_postcopy or send_memory_live(ls) == Policy.POSTCOPY
    except BaseException:
        disable_logdirty(ls)
        raise
    return ls


def live_context(ls: LiveSave, vcpus: list[tuple[int, bytes]] | None = None,
                 devices: list[dict] | None = None) -> SaveContext:
    """The SaveContext the record writers take; a live save has no page
    types or tables of its own (each round asks for them anew)."""
    none = np.zeros(0, np.int64)
    return SaveContext(ls.p2m, ls.frame_pfns, none.astype(np.uint32),
                       np.zeros((0, L1_PAGETABLE_ENTRIES), np.uint64), none, vcpus or [],
                       devices or [])


def _write_live_head(ls: LiveSave, seed: int | None, kind: str = "live save") -> int:
    """xl's header and the config, libxl's header, LIBXC_CONTEXT and the
    libxc stream's static part; returns where the digest goes."""
    digest = isinstance(ls.out, savefile.DigestWriter)
    digest_offset = savefile.write_xl_header(ls.out, live_config(ls.hv, ls.dom, seed, kind),
                                             digest)
    savefile.write_libxl_header(ls.out)
    savefile.write_libxl_record(ls.out, LibxlRecType.LIBXC_CONTEXT)
    write_static_data(ls.hv, ls.dom, ls.out, live_context(ls))
    return digest_offset


def _write_live_tail(ls: LiveSave, digest_offset: int) -> None:
    """The end of the checkpoint and libxl's records, with the guest
    suspended: its time on the wire is downtime too."""
    hv, dom = ls.hv, ls.dom
    sc = live_context(ls, vcpu_records(hv, dom, ls.p2m), devices_state(dom))
    start = ls.out.tell()
    write_end_of_checkpoint(hv, dom, ls.out, sc, checkpoint=False)
    write_libxl_tail(hv, dom, ls.out, sc, checkpoint=False)
    if isinstance(ls.out, savefile.DigestWriter):
        ls.out.finish(digest_offset)
    octets = ls.out.tell() - start
    ls.info.transferred += octets
    ls.info.downtime_ns += ls.opts.wire_ns(octets)


# --- a checkpointed stream (Remus: xg_sr_save.c save()'s loop) -----------------------

def start_checkpointed_stream(hv: Hypervisor, dom: Domain, out: BinaryIO,
                              callbacks: LiveCallbacks, opts: PrecopyOptions,
                              seed: int | None = None, report: Report | None = None
                              ) -> LiveSave:
    """The first epoch of a checkpointed stream up to its end: xl's header
    (no digest: a stream on the wire), libxl's, LIBXC_CONTEXT, the static
    records, the live rounds, the guest suspended and the final round.
    Log-dirty stays on. The caller then closes the epoch (write_epoch_end),
    resumes the guest cancelled (THAW) and repeats: suspend, send_epoch,
    write_epoch_end; end_checkpointed_stream ends it cleanly. On a failure
    here log-dirty is off again and the error raised; once this returns,
    a caller whose stream fails turns it off itself (disable_logdirty).
    The receiver is restore.receive_checkpoints."""
    ls = _live_setup(hv, dom, savefile.CountingWriter(out), callbacks, opts, report)
    try:
        enable_logdirty(ls)
        _write_live_head(ls, seed, savefile.CHECKPOINTED_KIND)
        send_memory_live(ls)
        suspend_and_send_dirty(ls)
    except BaseException:
        disable_logdirty(ls)
        raise
    return ls


def send_epoch(ls: LiveSave) -> Round:
    """An epoch after the first, the guest suspended by the caller: the pfns
    dirtied since the last epoch (CLEAN, LOGDIRTY_FINAL) and any deferred."""
    ls.paused = True
    check_vm_state(ls)
    dirty = clean_dirty_bitmap(ls, final=True) | ls.deferred
    ls.deferred[:] = False
    return send_dirty_pages(ls, dirty, len(ls.info.rounds))


def write_epoch_end(ls: LiveSave) -> None:
    """The end of an epoch, the guest still suspended: end_of_checkpoint
    (TSC, SHARED_INFO, the VCPUs), CHECKPOINT and libxl's records up to
    CHECKPOINT_END (write_checkpoint). The backup commits the epoch when it
    has read them. The caller then resumes the guest cancelled (THAW)."""
    hv, dom = ls.hv, ls.dom
    sc = live_context(ls, vcpu_records(hv, dom, ls.p2m), devices_state(dom))
    start = ls.out.tell()
    end_of_checkpoint(hv, dom, ls.out, sc)
    write_checkpoint(hv, dom, ls.out, sc)
    ls.out.flush()
    octets = ls.out.tell() - start
    ls.info.transferred += octets
    ls.info.downtime_ns += ls.opts.wire_ns(octets)
    ls.paused = False


def end_checkpointed_stream(ls: LiveSave) -> None:
    """A clean end after a closed epoch: libxc's END, libxl's END (the
    backup completes the domain from the last epoch); log-dirty off."""
    stream.write_record(ls.out, RecType.END)
    savefile.write_libxl_record(ls.out, LibxlRecType.END)
    ls.out.flush()
    disable_logdirty(ls)


class CheckpointCallbacks(LiveCallbacks, Protocol):
    """What a checkpointed save's caller does besides a live save's
    (save_callbacks' postcopy and checkpoint, libxl_remus.c): resume the
    guest cancelled once an epoch is on the wire; then, with the epoch's
    CHECKPOINT_END written, commit it (Remus's output commit) and let the
    guest run for the interval. ``checkpoint`` returns False when there is
    to be no next epoch (the guest shut down meanwhile, or the run's time
    is up); a broken connection is an OSError."""

    def postcopy(self) -> None: ...

    def checkpoint(self, epoch: int) -> bool: ...


def write_checkpointed_stream(hv: Hypervisor, dom: Domain, out: BinaryIO,
                              callbacks: CheckpointCallbacks, opts: PrecopyOptions,
                              seed: int | None = None,
                              report: Report | None = None) -> MigrationInfo:
    """xg_sr_save.c's save() for a Remus stream, driving the pieces above:
    epoch 0 a live save's rounds and its final round; each later epoch the
    guest suspended through the save's path, CLEAN(FINAL) and the pages
    dirtied since (send_domain_memory_checkpointed, which is
    suspend_and_send_dirty); each epoch closed by write_epoch_end, then
    ``postcopy`` (the guest resumed cancelled) and ``checkpoint`` (the
    epoch committed, the interval run). When ``checkpoint`` says stop, the
    stream ends cleanly. Log-dirty is off at the end and on any failure;
    the guest is left as the failure found it (running or suspended)."""
    ls = start_checkpointed_stream(hv, dom, out, callbacks, opts, seed, report)
    try:
        epoch = 0
        while True:
            write_epoch_end(ls)
            callbacks.postcopy()
            if not callbacks.checkpoint(epoch):
                break
            epoch += 1
            suspend_and_send_dirty(ls)
        end_checkpointed_stream(ls)
    finally:
        disable_logdirty(ls)
    ls.info.status = "completed"
    return ls.info


def save_live_to_file(hv: Hypervisor, dom: Domain, path: str | os.PathLike[str],
                      callbacks: LiveCallbacks, opts: PrecopyOptions,
                      seed: int | None = None, report: Report | None = None
                      ) -> tuple[MigrationInfo, SaveStats]:
    """write_image_live into a temporary file beside ``path``, flushed and
    renamed into place; on any failure nothing is left at ``path``."""
    def write(f: BinaryIO) -> tuple[MigrationInfo, SaveStats]:
        info = write_image_live(hv, dom, f, callbacks, opts, seed, report)
        return info, SaveStats(pages=sum(r.pages for r in info.rounds), bytes=f.tell())

    (info, stats), total_s = write_in_place(path, write)
    stats.total_s = total_s
    return info, stats


__all__ = ["SaveError", "SaveStats", "save_to_file", "write_image", "canonicalise",
           "locate_p2m", "page_types", "LiveCallbacks", "save_live_to_file",
           "write_image_live", "start_live_stream", "start_checkpointed_stream", "send_epoch",
           "write_epoch_end", "end_checkpointed_stream", "CheckpointCallbacks",
           "write_checkpointed_stream"]
