"""What ``pvlab image show`` and ``pvlab image diff`` print: a saved image's
layers (xl's header and config, libxl's records, libxc's records), page
types, pinned tables, VCPUs, xenstore nodes and devices, and the
differences between two images (pagetables are canonical in both, so two
saves of the same guest compare page by page whatever the machines)."""

from __future__ import annotations

import json
import mmap
from collections import Counter

import numpy as np

from hypervisor.public.arch_x86 import VGCF_in_kernel, VGCF_online
from hypervisor.public.xen import PAGE_SHIFT, PAGE_SIZE
from hypervisor.toolstack import pfinfo, stream
from hypervisor.toolstack.image import TYPE_NAMES, ImageInfo
from hypervisor.toolstack.timeparse import format_duration

REGS = ("rip", "rsp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10",
        "r11", "r12", "r13", "r14", "r15", "rflags")
LIST_MAX = 12


def _ranges(pfns: list[int]) -> str:
    """0x10-0x13, 0x20: runs of pfns."""
    out: list[str] = []
    start = prev = None
    for p in pfns + [None]:  # type: ignore[list-item]
        if start is not None and (p is None or p != prev + 1):
            out.append(f"{start:#x}" if start == prev else f"{start:#x}-{prev:#x}")
            start = None
        if p is not None and start is None:
            start = p
        prev = p
    return ", ".join(out) or "none"


def _vcpu_line(info: ImageInfo, vcpu_id: int) -> str:
    ctx = info.context(vcpu_id)
    r = ctx.user_regs
    mode = "kernel" if ctx.flags & VGCF_in_kernel else "user"
    state = "online" if ctx.flags & VGCF_online else "offline"
    has_user = ctx.ctrlreg[1] & stream.USER_L4_SET
    user = f"pfn {ctx.ctrlreg[1] >> PAGE_SHIFT:#x}" if has_user else "none"
    return (f"vcpu{vcpu_id}: {state}, {mode} mode, rip {r.rip:#x} rsp {r.rsp:#x}, "
            f"cr3 pfn {ctx.ctrlreg[3] >> PAGE_SHIFT:#x}, user L4 {user}")


def _layers(info: ImageInfo, records: bool) -> list[str]:
    """The three layers, outside in; with ``records`` every record of both
    streams in file order."""
    h = info.header
    config = info.xl_config
    lines = [f"{info.path}: xl save file, {info.size / (1 << 20):.1f} MiB",
             f"xl header: stream v2, JSON config of {len(json.dumps(config))} octets "
             f"({', '.join(config) or 'empty'})",
             "libxl stream version 2: " + ", ".join(
                 f"{n} x{c}" for n, c in Counter(r.name for r in info.libxl_records).items()),
             f"libxc migration stream version {info.version} at offset "
             f"{info.libxc_offset}, x86 PV, written by Xen {h.xen_major}.{h.xen_minor} ABI"]
    if records:
        every = sorted(info.libxl_records + info.records, key=lambda r: r.offset)
        lines += [f"  {r.offset:>12}  {r.layer} {r.name:<24} {r.length} octets" for r in every]
    return lines


def describe(info: ImageInfo, records: bool = False) -> str:
    d = info.domain or {}
    lines = _layers(info, records)
    if d:
        kernel = (d.get("kernel") or {}).get("module", "none")
        # a live save's config is written before its end: the time is in X86_TSC_INFO
        clocks = d.get("clocks") or [info.tsc[2] if info.tsc else 0]
        lines.append(f"domain: {d.get('name')}, {d.get('vcpus')} vcpus, {info.nr_pfns} pfns, "
                     f"a {d.get('kind')} at {format_duration(max(clocks))} of virtual time, "
                     f"seed {d.get('seed')}, guest kernel {kernel}")
    else:
        lines.append("domain: no pvlab part in the config (not written by pvlab)")
    if info.checkpoint:
        lines.append(f"checkpointed: {len(info.epochs)} epochs, each closed by libxc's "
                     "CHECKPOINT and libxl's records up to CHECKPOINT_END (a restore "
                     "gives the last)")
        lines += [f"  epoch {e.number}: offsets {e.offset}-{e.checkpoint}, {e.copies} page "
                  "copies" for e in info.epochs[:LIST_MAX]]
        if len(info.epochs) > LIST_MAX:
            lines.append(f"  ... and {len(info.epochs) - LIST_MAX} more")
    counts = Counter(r.name for r in info.records)
    lines.append("libxc records: " + ", ".join(f"{n} x{c}" for n, c in counts.items()))
    lines.append("page types: " + ", ".join(f"{n} {c}" for n, c in info.type_counts().items()))
    pinned = np.flatnonzero(pfinfo.is_pinned_table(info.nibbles))
    lines.append(f"pinned tables ({pinned.size}): " + ", ".join(
        f"{int(p):#x} {TYPE_NAMES[int(info.nibbles[p])].split()[0]}" for p in pinned))
    lines.append(f"p2m frames: pfns {_ranges(info.p2m_frame_pfns.tolist())}")
    lines.append(f"start_info: pfn {info.context(0).user_regs.rdx:#x} (vcpu0's rdx)")
    lines += [_vcpu_line(info, v) for v in sorted(info.vcpus)]
    if info.xenstore:
        lines.append("xenstore (EMULATOR_XENSTORE_DATA): " + ", ".join(
            f"{p} = {v.decode(errors='replace')!r}" for p, v in info.xenstore))
    for i, dev in enumerate(info.devices):
        lines.append(f"device {i} (EMULATOR_CONTEXT): " + ", ".join(
            f"{k} {v:#x}" if k == "base" else f"{k} {v}" for k, v in dev.items()))
    return "\n".join(lines)


def page_index(info: ImageInfo) -> np.ndarray:
    """Per pfn, the file offset of its page (-1: none in the image); a later
    page of the same pfn wins, as a restore writes it last."""
    off = np.full(info.nr_pfns, -1, dtype=np.int64)
    for b in info.batches:
        pfns = b.pfns[b.with_data]
        off[pfns] = b.data_offset + PAGE_SIZE * np.arange(pfns.size)
    return off


def diff(a: ImageInfo, b: ImageInfo) -> list[str]:
    """What differs between two images, one line a difference (empty: none)."""
    out: list[str] = []
    da, db = a.domain or {}, b.domain or {}
    for key in ("name", "vcpus", "max_pages", "kernel"):
        if da.get(key) != db.get(key):
            out.append(f"domain {key}: {da.get(key)!r} -> {db.get(key)!r}")
    if a.nr_pfns != b.nr_pfns:
        out.append(f"pfns: {a.nr_pfns} -> {b.nr_pfns}")
    n = min(a.nr_pfns, b.nr_pfns)
    typed = np.flatnonzero(a.nibbles[:n] != b.nibbles[:n])
    if typed.size:
        out.append(f"page types differ at {typed.size} pfns: " + ", ".join(
            f"{int(p):#x} {pfinfo.type_name(a.nibbles[p])} -> "
            f"{pfinfo.type_name(b.nibbles[p])}" for p in typed[:LIST_MAX]))
    ia, ib = page_index(a), page_index(b)
    changed: list[int] = []
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        ma = mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ)
        mb = mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for pfn in np.flatnonzero((ia[:n] >= 0) & (ib[:n] >= 0)).tolist():
                oa, ob = int(ia[pfn]), int(ib[pfn])
                if ma[oa:oa + PAGE_SIZE] != mb[ob:ob + PAGE_SIZE]:
                    changed.append(pfn)
        finally:
            ma.close()
            mb.close()
    if changed:
        out.append(f"page contents differ at {len(changed)} pfns: {_ranges(changed[:200])}")
    for v in sorted(set(a.vcpus) | set(b.vcpus)):
        if v not in a.vcpus or v not in b.vcpus:
            out.append(f"vcpu{v}: only in {'the first' if v in a.vcpus else 'the second'}")
            continue
        ra, rb = a.context(v), b.context(v)
        regs = [f"{r} {getattr(ra.user_regs, r):#x} -> {getattr(rb.user_regs, r):#x}"
                for r in REGS if getattr(ra.user_regs, r) != getattr(rb.user_regs, r)]
        if ra.ctrlreg[3] != rb.ctrlreg[3]:
            regs.append(f"cr3 pfn {ra.ctrlreg[3] >> PAGE_SHIFT:#x} -> "
                        f"{rb.ctrlreg[3] >> PAGE_SHIFT:#x}")
        if regs:
            out.append(f"vcpu{v}: " + ", ".join(regs))
    xa, xb = dict(a.xenstore), dict(b.xenstore)
    for path in sorted(set(xa) | set(xb)):
        if xa.get(path) != xb.get(path):
            out.append(f"xenstore {path}: {xa.get(path)!r} -> {xb.get(path)!r}")
    return out
