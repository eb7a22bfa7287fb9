"""Reading and checking a saved image without applying it: what a restore
does first, so that a bad image is refused before anything is created, and
what ``pvlab image show`` prints. The image is an xl save file: xl's header
and the domain's JSON config, libxl's stream, and in its LIBXC_CONTEXT the
libxc migration stream (savefile.py, stream.py).

Every check of xg_sr_restore.c and xg_sr_restore_x86_pv.c that applies to a
non-live x86-64 PV stream is made here, with the record and its offset in
the message: headers, record order and lengths, PAGE_DATA's counts, pfns and
types, P2M_FRAMES' size, one context per VCPU of the right size, vcpu0 there,
its start_info pfn and every CR3 of the right type, and every present entry of
every pagetable naming a pfn the image populates. Page data is skipped over
(only pagetables are read), so a check costs little beside the restore.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hypervisor import domctl
from hypervisor.public import arch_x86
from hypervisor.public.arch_x86 import _PAGE_PRESENT, L1_PAGETABLE_ENTRIES, vcpu_guest_context
from hypervisor.public.xen import PAGE_SHIFT, PAGE_SIZE
from hypervisor.toolstack import pfinfo, savefile, stream
from hypervisor.toolstack.pfinfo import ABSENT, KNOWN, NO_DATA, NOT_POPULATED, TYPE_NAMES
from hypervisor.toolstack.savefile import EmulatorId, LibxlRecType
from hypervisor.toolstack.stream import RecType, StreamError

MAX_VCPUS = 32
CONTEXT_SIZE = ctypes.sizeof(vcpu_guest_context)
PTE_FRAME_MASK = np.uint64(arch_x86.PTE_FRAME_MASK)


class ImageError(StreamError):
    """An image that cannot be restored: the message names record and offset."""


@dataclass
class PageBatch:
    """One PAGE_DATA record: its pfns, their type nibbles, where its pages are."""

    offset: int            # of the record
    data_offset: int       # of its first page
    pfns: np.ndarray       # int64
    nibbles: np.ndarray    # uint8
    with_data: np.ndarray  # bool per pfn entry


@dataclass
class RecordInfo:
    type: int
    offset: int
    length: int
    layer: str = "libxc"  # or "libxl"

    @property
    def name(self) -> str:
        if self.layer == "libxl":
            return savefile.libxl_rec_name(self.type)
        return stream.rec_name(self.type)


@dataclass
class ImageInfo:
    path: str
    version: int
    header: stream.DomainHeader
    records: list[RecordInfo] = field(default_factory=list)          # libxc's
    libxl_records: list[RecordInfo] = field(default_factory=list)
    libxc_offset: int = 0      # where the libxc stream starts in the file
    xl_config: dict = field(default_factory=dict)  # the xl header's JSON config
    max_pfn: int = -1
    p2m_frame_pfns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    batches: list[PageBatch] = field(default_factory=list)
    nibbles: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # per pfn
    tsc: tuple[int, int, int, int] | None = None
    shared_info: bytes = b""
    vcpus: dict[int, bytes] = field(default_factory=dict)
    domain: dict | None = None  # pvlab's view of xl_config; None: not pvlab's
    xenstore: list[tuple[str, bytes]] = field(default_factory=list)
    devices: list[dict] = field(default_factory=list)
    checkpoint: bool = False
    size: int = 0

    @property
    def nr_pfns(self) -> int:
        return self.max_pfn + 1

    def populated(self) -> np.ndarray:
        """pfns the image gives a frame."""
        seen = self.nibbles != ABSENT
        return np.flatnonzero(seen & ~np.isin(self.nibbles, list(NOT_POPULATED)))

    def type_counts(self) -> dict[str, int]:
        seen = self.nibbles[self.nibbles != ABSENT]
        values, counts = np.unique(seen, return_counts=True)
        return {TYPE_NAMES[int(v)]: int(c) for v, c in zip(values, counts, strict=True)}

    def context(self, vcpu_id: int) -> vcpu_guest_context:
        return vcpu_guest_context.from_buffer_copy(self.vcpus[vcpu_id])


def _fail(rec: stream.Record | savefile.LibxlRecord | RecordInfo, why: str) -> ImageError:
    return ImageError(f"{rec.name} record at offset {rec.offset}: {why}")


def scan_image(path: str | Path) -> ImageInfo:
    """Read and check a whole image; raises ImageError naming what is wrong."""
    p = Path(path)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise ImageError(f"cannot read {p}: {e.strerror or e}") from None
    with f:
        try:
            return _scan(f, str(p))
        except StreamError as e:
            raise ImageError(f"{p}: {e}") from None


def _scan(f: BinaryIO, path: str) -> ImageInfo:
    """The three layers in file order: xl's header, libxl's records with the
    libxc stream read where LIBXC_CONTEXT stands, then the checks that need
    the whole image."""
    head = f.read(12)
    if head == stream.IHDR.pack(stream.IHDR_MARKER, stream.IHDR_ID, 0, 0, 0, 0)[:12]:
        raise StreamError("an image from an older pvlab (a bare libxc stream, no xl header); "
                          "this pvlab reads only xl save files")
    f.seek(0)
    xl = savefile.read_xl_header(f)
    savefile.read_libxl_header(f, xl.end)
    info: ImageInfo | None = None
    libxl: list[RecordInfo] = []
    tail: list[savefile.LibxlRecord] = []
    for rec in savefile.read_libxl_records(f):
        libxl.append(RecordInfo(rec.type, rec.offset, rec.length, "libxl"))
        if rec.type != LibxlRecType.LIBXC_CONTEXT:
            tail.append(rec)
            continue
        if info is not None or rec.length:
            raise _fail(libxl[-1], "a second LIBXC_CONTEXT, or one with a body")
        info, tables, last = _scan_libxc(f, path, f.tell())
    if info is None:
        raise StreamError("no LIBXC_CONTEXT record: the libxl stream holds no domain")
    info.libxl_records = libxl
    info.size = f.tell()
    if f.read(1):
        raise ImageError(f"offset {info.size}: data after libxl's END record")
    _config(info, xl.config)
    _libxl_tail(info, tail)
    _check_whole(info, last)
    _check_tables(info, f, tables)
    savefile.check_digest(f, xl, required=info.domain is not None)
    return info


def _scan_libxc(f: BinaryIO, path: str, base: int
                ) -> tuple[ImageInfo, list[tuple[int, int, int]], stream.Record]:
    # one pass over the records in stream order, a branch per record type as
    # xg_sr_restore.c's process_record has: longer than most, read as a table
    version, dhdr = stream.read_headers(f, base)
    info = ImageInfo(path, version, dhdr, libxc_offset=base)
    seen_pv_info = seen_static_end = False
    tables: list[tuple[int, int, int]] = []  # (pfn, level, offset of its page)
    last = None
    start = base + stream.IHDR.size + stream.DHDR.size
    for rec in stream.read_records(f, start, partial={RecType.PAGE_DATA: _page_data_head}):
        info.records.append(RecordInfo(rec.type, rec.offset, rec.length))
        last = rec
        t = rec.type
        if t == RecType.END:
            break
        if t == RecType.X86_PV_INFO:
            if seen_pv_info:
                raise _fail(rec, "a second X86_PV_INFO")
            if len(rec.body) != stream.X86_PV_INFO.size:
                raise _fail(rec, f"length {len(rec.body)}, expected {stream.X86_PV_INFO.size}")
            width, levels = stream.X86_PV_INFO.unpack(rec.body)
            if (width, levels) != (stream.GUEST_WIDTH_X86_64, stream.PT_LEVELS_X86_64):
                raise _fail(rec, f"guest width {width}, {levels} pagetable levels: only "
                            "64-bit guests with 4 levels are restored")
            seen_pv_info = True
        elif t == RecType.STATIC_DATA_END:
            if seen_static_end:
                raise _fail(rec, "a second STATIC_DATA_END")
            if not seen_pv_info:
                raise _fail(rec, "before X86_PV_INFO")
            seen_static_end = True
        elif t == RecType.X86_PV_P2M_FRAMES:
            if not seen_pv_info:
                raise _fail(rec, "before X86_PV_INFO")
            if not seen_static_end:
                if version >= 3:
                    raise _fail(rec, "before STATIC_DATA_END (mandatory in version 3)")
                seen_static_end = True  # a v2 stream: STATIC_DATA_END is implied here
            if info.max_pfn >= 0:
                raise _fail(rec, "a second X86_PV_P2M_FRAMES")
            _p2m_frames(info, rec)
        elif t == RecType.PAGE_DATA:
            if info.max_pfn < 0:
                raise _fail(rec, "before X86_PV_P2M_FRAMES")
            tables += _page_data(info, rec)
        elif t == RecType.X86_TSC_INFO:
            if len(rec.body) != stream.X86_TSC_INFO.size:
                raise _fail(rec, f"length {len(rec.body)}, expected {stream.X86_TSC_INFO.size}")
            info.tsc = stream.X86_TSC_INFO.unpack(rec.body)
        elif t == RecType.SHARED_INFO:
            if not seen_pv_info:
                raise _fail(rec, "before X86_PV_INFO")
            if len(rec.body) != PAGE_SIZE:
                raise _fail(rec, f"length {len(rec.body)}, expected {PAGE_SIZE}")
            info.shared_info = rec.body
        elif t == RecType.X86_PV_VCPU_BASIC:
            _vcpu_basic(info, rec)
        elif t == RecType.CHECKPOINT:
            if rec.body:
                raise _fail(rec, "a CHECKPOINT record has no body")
            info.checkpoint = True
        elif t in (RecType.X86_PV_VCPU_EXTENDED, RecType.X86_PV_VCPU_XSAVE,
                   RecType.X86_PV_VCPU_MSRS, RecType.X86_CPUID_POLICY, RecType.X86_MSR_POLICY):
            pass  # state pvlab's VCPUs do not have: read and dropped
        elif not t & stream.REC_TYPE_OPTIONAL:
            raise _fail(rec, "a mandatory record type this restorer does not know")
    assert last is not None
    return info, tables, last


# the config's keys pvlab needs, with their JSON types: (where, key, type)
CONFIG_KEYS = (("c_info", "name", str), ("b_info", "max_vcpus", int),
               ("b_info", "max_memkb", int), ("pvlab", "image", int), ("pvlab", "kind", str),
               ("pvlab", "kernel", dict), ("pvlab", "clocks", list),
               ("pvlab", "devices", list))
KERNEL_KEYS = (("module", str), ("text", int), ("size", int))


def _config(info: ImageInfo, raw: bytes) -> None:
    """The xl header's JSON config; info.domain is pvlab's view of it, None
    when it has no "pvlab" part (an image Xen's xl wrote)."""
    def bad(why: str) -> ImageError:
        return ImageError(f"the xl header's config: {why}")
    try:
        config = json.loads(raw) if raw else {}
    except ValueError as e:
        raise bad(f"not JSON: {e}") from None
    if not isinstance(config, dict):
        raise bad("not a JSON object")
    info.xl_config = config
    if "pvlab" not in config:
        return
    for where, key, want in CONFIG_KEYS:
        part = config.get(where)
        value = part.get(key) if isinstance(part, dict) else None
        if not isinstance(value, want) or isinstance(value, bool):
            raise bad(f"{where}.{key} is missing or not {want.__name__}")
    p = config["pvlab"]
    for key, want in KERNEL_KEYS:
        if not isinstance(p["kernel"].get(key), want):
            raise bad(f"pvlab.kernel.{key} is missing or not {want.__name__}")
    if not all(isinstance(c, int) for c in p["clocks"]):
        raise bad("pvlab.clocks holds something that is not a clock")
    info.domain = {"pvlab_image": p["image"], "kind": p["kind"], "seed": p.get("seed"),
                   "name": config["c_info"]["name"], "vcpus": config["b_info"]["max_vcpus"],
                   "max_pages": config["b_info"]["max_memkb"] * 1024 // PAGE_SIZE,
                   "kernel": p["kernel"], "clocks": p["clocks"], "devices": p["devices"]}


def _libxl_tail(info: ImageInfo, recs: list[savefile.LibxlRecord]) -> None:
    """libxl's records besides LIBXC_CONTEXT: the xenstore nodes, a device
    model's state per EMULATOR_CONTEXT (in index order), CHECKPOINT_END."""
    xenstore_seen = False
    for rec in recs:
        if rec.type == LibxlRecType.EMULATOR_XENSTORE_DATA:
            if xenstore_seen:
                raise _fail(rec, "a second EMULATOR_XENSTORE_DATA")
            xenstore_seen = True
            info.xenstore = _xenstore(rec, _emulator_data(rec, 0))
        elif rec.type == LibxlRecType.EMULATOR_CONTEXT:
            info.devices.append(_device(rec, _emulator_data(rec, len(info.devices))))
        elif rec.type == LibxlRecType.CHECKPOINT_END:
            if rec.body or not info.checkpoint:
                raise _fail(rec, "CHECKPOINT_END with a body, or in a stream with no "
                            "CHECKPOINT")
        elif rec.type != LibxlRecType.END:
            raise _fail(rec, "a libxl record of a checkpointed (COLO) stream pvlab does "
                        "not restore")
    placed = (info.domain or {}).get("devices")
    if placed is not None:
        have = [{k: d[k] for k in savefile.DEVICE_CONFIG_KEYS} for d in info.devices]
        if placed != have:
            raise ImageError(f"the config's devices {placed} are not the ones whose state "
                             f"the EMULATOR_CONTEXT records hold ({have})")


def _emulator_data(rec: savefile.LibxlRecord, index: int) -> bytes:
    """An EMULATOR_* record's data, its header checked: pvlab's device models
    are emulator UNKNOWN, numbered from 0 in stream order."""
    if rec.length < savefile.EMULATOR_HDR.size:
        raise _fail(rec, f"length {rec.length}, less than its emulator header")
    emu, idx = savefile.EMULATOR_HDR.unpack_from(rec.body)
    if emu != EmulatorId.UNKNOWN or idx != index:
        raise _fail(rec, f"emulator {emu} index {idx}; expected emulator 0 index {index}")
    return rec.body[savefile.EMULATOR_HDR.size:]


def _device(rec: savefile.LibxlRecord, data: bytes) -> dict:
    try:
        state = json.loads(data)
    except ValueError as e:
        raise _fail(rec, f"not JSON: {e}") from None
    why = domctl.check_device_state(state)
    if why:
        raise _fail(rec, why)
    return state


def _page_data_head(f: BinaryIO, length: int) -> bytes:
    """PAGE_DATA's header and pfn list; its pages are not read when checking."""
    head = f.read(min(length, stream.PAGE_DATA_HDR.size))
    if len(head) < stream.PAGE_DATA_HDR.size:
        return head
    (count,) = stream.PAGE_DATA_HDR.unpack(head)
    return head + f.read(min(8 * count, length - len(head)))


def _p2m_frames(info: ImageInfo, rec: stream.Record) -> None:
    body = rec.body
    if len(body) < stream.P2M_FRAMES_HDR.size:
        raise _fail(rec, f"length {len(body)}, less than its {stream.P2M_FRAMES_HDR.size}-octet "
                    "header")
    start, end = stream.P2M_FRAMES_HDR.unpack_from(body)
    fpp = PAGE_SIZE // 8
    if start > end:
        raise _fail(rec, f"start_pfn {start:#x} is after end_pfn {end:#x}")
    if start != 0:
        raise _fail(rec, f"start_pfn {start:#x}: a p2m from pfn 0 is expected")
    want = stream.P2M_FRAMES_HDR.size + 8 * ((end // fpp + 1) - start // fpp)
    if len(body) != want:
        raise _fail(rec, f"length {len(body)}, expected {want} for pfns {start:#x}-{end:#x}")
    info.max_pfn = end
    frames = np.frombuffer(body, dtype=np.uint64, offset=stream.P2M_FRAMES_HDR.size)
    outside = np.flatnonzero(frames > np.uint64(end))
    if outside.size:
        raise _fail(rec, f"p2m frame {int(outside[0])} is pfn {int(frames[outside[0]]):#x}, "
                    f"outside the domain's maximum {end:#x}")
    info.p2m_frame_pfns = frames.astype(np.int64)
    info.nibbles = np.full(end + 1, ABSENT, dtype=np.uint8)


def _page_data(info: ImageInfo, rec: stream.Record) -> list[tuple[int, int, int]]:
    length = rec.length
    if length < stream.PAGE_DATA_HDR.size:
        raise _fail(rec, f"length {length}, less than its 8-octet header")
    (count,) = stream.PAGE_DATA_HDR.unpack_from(rec.body)
    if count < 1:
        raise _fail(rec, "expected at least 1 pfn")
    if count > stream.MAX_BATCH_SIZE:
        raise _fail(rec, f"{count} pfns, more than a batch's {stream.MAX_BATCH_SIZE}")
    if len(rec.body) != 8 + 8 * count:
        raise _fail(rec, f"length {length} is too short for {count} pfns")
    entries = np.frombuffer(rec.body, dtype=np.uint64, offset=8)
    pfns = (entries & np.uint64(stream.PAGE_DATA_PFN_MASK)).astype(np.int64)
    nib = (entries >> np.uint64(60)).astype(np.uint8)
    reserved = (entries >> np.uint64(52)) & np.uint64(0xFF)
    known = np.isin(nib, list(KNOWN))
    bad = np.flatnonzero((pfns > info.max_pfn) | ~known | (reserved != 0))
    if bad.size:
        i = int(bad[0])
        pfn = int(pfns[i])
        if pfn > info.max_pfn:
            raise _fail(rec, f"pfn {pfn:#x} (index {i}) outside the domain's maximum "
                        f"{info.max_pfn:#x}")
        if not known[i]:
            raise _fail(rec, f"pfn {pfn:#x} (index {i}): unknown type {int(nib[i]):#x}")
        raise _fail(rec, f"pfn {pfn:#x} (index {i}): reserved bits set")
    with_data = ~np.isin(nib, list(NO_DATA))
    want = 8 + 8 * count + PAGE_SIZE * int(with_data.sum())
    if length != want:
        raise _fail(rec, f"wrong size: length {length}, expected {want} for {count} pfns "
                    f"with {int(with_data.sum())} pages of data")
    data_offset = rec.offset + stream.RHDR.size + 8 + 8 * count
    info.batches.append(PageBatch(rec.offset, data_offset, pfns, nib, with_data))
    info.nibbles[pfns] = nib
    tables = []
    level = pfinfo.level(nib)
    for k, i in enumerate(np.flatnonzero(with_data)):
        if level[i]:
            tables.append((int(pfns[i]), int(level[i]), data_offset + PAGE_SIZE * k))
    return tables


def _vcpu_basic(info: ImageInfo, rec: stream.Record) -> None:
    want = stream.VCPU_HDR.size + CONTEXT_SIZE
    if len(rec.body) != want:
        raise _fail(rec, f"length {len(rec.body)}, expected {want} (8 + a 64-bit "
                    "vcpu_guest_context)")
    (vcpu_id,) = stream.VCPU_HDR.unpack_from(rec.body)
    if vcpu_id >= MAX_VCPUS:
        raise _fail(rec, f"vcpu {vcpu_id}: at most {MAX_VCPUS} are supported")
    if vcpu_id in info.vcpus:
        raise _fail(rec, f"a second context for vcpu {vcpu_id}")
    info.vcpus[vcpu_id] = rec.body[stream.VCPU_HDR.size:]


def _xenstore(rec: savefile.LibxlRecord, data: bytes) -> list[tuple[str, bytes]]:
    parts = data.split(b"\0")
    if data and (not data.endswith(b"\0") or len(parts) % 2 != 1):
        raise _fail(rec, "not NUL-terminated path and value pairs")
    out = []
    for path, value in zip(parts[0:-1:2], parts[1:-1:2], strict=True):
        name = path.decode(errors="replace")
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise _fail(rec, f"path {name!r} is not relative to the domain's home")
        out.append((name, value))
    return out


def _check_whole(info: ImageInfo, end: stream.Record) -> None:
    """What only the whole stream can tell (x86_pv_stream_complete's checks)."""
    def bad(why: str) -> ImageError:
        return ImageError(f"{info.path}: {why}")
    if info.max_pfn < 0:
        raise bad("no X86_PV_P2M_FRAMES record")
    if 0 not in info.vcpus:
        raise bad("the sender didn't send vcpu0's basic state (no X86_PV_VCPU_BASIC for "
                  "vcpu 0)")
    if not info.shared_info:
        raise bad("no SHARED_INFO record")
    nib = info.nibbles
    for i, pfn in enumerate(info.p2m_frame_pfns.tolist()):
        if nib[pfn] != 0:
            raise bad(f"p2m frame {i} is pfn {pfn:#x}, which is not a NOTAB page of the image")
    for vcpu_id, raw in info.vcpus.items():
        ctx = vcpu_guest_context.from_buffer_copy(raw)
        cr3 = ctx.ctrlreg[3] >> PAGE_SHIFT
        if cr3 > info.max_pfn or pfinfo.level(nib[cr3]) != pfinfo.L4:
            what = pfinfo.type_name(nib[cr3]) if cr3 <= info.max_pfn else "absent"
            raise bad(f"vcpu{vcpu_id}'s cr3 (pfn {cr3:#x}) has type {what}, expected L4")
        if ctx.ctrlreg[1] & stream.USER_L4_SET:
            user = ctx.ctrlreg[1] >> PAGE_SHIFT
            if user > info.max_pfn or pfinfo.level(nib[user]) != pfinfo.L4:
                raise bad(f"vcpu{vcpu_id}'s user L4 (pfn {user:#x}) is no L4 of the image")
        if vcpu_id == 0:
            si = ctx.user_regs.rdx
            if si > info.max_pfn or nib[si] != pfinfo.NOTAB:
                raise bad(f"start info pfn {si:#x} (vcpu0's rdx) has a bad type")


def _check_tables(info: ImageInfo, f: BinaryIO, tables: list[tuple[int, int, int]]) -> None:
    """Every present entry of every pagetable must name a pfn the image populates
    (what localising would find out half way through a restore)."""
    populated = np.zeros(info.nr_pfns, dtype=bool)
    populated[info.populated()] = True
    for pfn, level, offset in tables:
        f.seek(offset)
        page = np.frombuffer(f.read(PAGE_SIZE), dtype=np.uint64)
        if page.size != L1_PAGETABLE_ENTRIES:
            raise ImageError(f"{info.path}: truncated at offset {offset}")
        present = np.flatnonzero(page & np.uint64(_PAGE_PRESENT))
        targets = (page[present] & PTE_FRAME_MASK) >> np.uint64(PAGE_SHIFT)
        bad = targets > np.uint64(info.max_pfn)
        if not bad.any():
            bad = ~populated[targets.astype(np.int64)]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ImageError(f"{info.path}: pagetable pfn {pfn:#x} (L{level}) slot "
                             f"{int(present[i])} names pfn {int(targets[i]):#x}, which the "
                             "image does not populate")


__all__ = ["ImageError", "ImageInfo", "PageBatch", "scan_image", "TYPE_NAMES"]
