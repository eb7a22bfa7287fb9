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
every pagetable naming a pfn the image populates. Beyond Xen's checks, what
would otherwise surface only as a hung or panicking guest: a context, marked
online, for every VCPU the config says was up; p2m frames that are distinct
and the ones the guest's own tables map at the p2m's address; pagetables that
nest level by level with no table left unreferenced. Page data is skipped
over (only pagetables and the p2m are read), so a check costs little beside
the restore.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hypervisor import domctl
from hypervisor.public import arch_x86
from hypervisor.public.arch_x86 import (
    _PAGE_PRESENT,
    _PAGE_PSE,
    L1_PAGETABLE_ENTRIES,
    VGCF_online,
    vcpu_guest_context,
)
from hypervisor.public.xen import INVALID_MFN, PAGE_SHIFT, PAGE_SIZE, shared_info
from hypervisor.toolstack import pagedigest, pfinfo, savefile, stream
from hypervisor.toolstack.pagedigest import PageDigests
from hypervisor.toolstack.pfinfo import ABSENT, TYPE_NAMES
from hypervisor.toolstack.savefile import EmulatorId, LibxlRecType
from hypervisor.toolstack.stream import RecType, StreamError

MAX_VCPUS = 32
CONTEXT_SIZE = ctypes.sizeof(vcpu_guest_context)
PTE_FRAME_MASK = np.uint64(arch_x86.PTE_FRAME_MASK)
RESERVED_BITS = np.uint64(0xFF << 52)  # of a PAGE_DATA entry, between the pfn and the type


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
class Epoch:
    """One epoch of a checkpointed stream: its records from ``offset`` to
    its CHECKPOINT (libxl's CHECKPOINT_END follows that)."""

    number: int
    offset: int       # of its first record
    checkpoint: int   # of its CHECKPOINT record
    copies: int       # pfn entries in its PAGE_DATA records


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
    # per pfn: given a frame by some copy (populate_pfns: the first copy of a
    # populating type; never taken back), and sent with data by some copy
    ever_populated: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    ever_data: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    copies: int = 0  # pfn entries in all PAGE_DATA records: more than pfns if resent
    tsc: tuple[int, int, int, int] | None = None
    shared_info: bytes = b""
    vcpus: dict[int, bytes] = field(default_factory=dict)
    domain: dict | None = None  # pvlab's view of xl_config; None: not pvlab's
    xenstore: list[tuple[str, bytes]] = field(default_factory=list)
    devices: list[dict] = field(default_factory=list)
    checkpoint: bool = False
    epochs: list[Epoch] = field(default_factory=list)  # a checkpointed stream's
    size: int = 0
    # per pfn, its last copy with data: file offset (-1: none) and type
    last_offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    last_nibble: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    # a lazy check's: the page digests, checked as the pages are read
    # (None: the whole file was checked)
    page_digests: PageDigests | None = None

    @property
    def nr_pfns(self) -> int:
        return self.max_pfn + 1

    def populated(self) -> np.ndarray:
        """pfns the restore gives a frame: every pfn some copy populated, or
        that a copy of a pagetable names (x86_pv_localise_page populates
        those too). A pfn sent with data and later as XTAB keeps its frame,
        as in Xen: nothing is depopulated."""
        return np.flatnonzero(self.ever_populated)

    def populated_at_end(self) -> np.ndarray:
        """pfns whose last copy has a populating type: the memory the sender
        saw at the end of the stream."""
        seen = self.nibbles != ABSENT
        return np.flatnonzero(seen & pfinfo.populates(self.nibbles))

    def type_counts(self) -> dict[str, int]:
        seen = self.nibbles[self.nibbles != ABSENT]
        values, counts = np.unique(seen, return_counts=True)
        return {TYPE_NAMES[int(v)]: int(c) for v, c in zip(values, counts, strict=True)}

    def context(self, vcpu_id: int) -> vcpu_guest_context:
        return vcpu_guest_context.from_buffer_copy(self.vcpus[vcpu_id])


def _fail(rec: stream.Record | savefile.LibxlRecord | RecordInfo, why: str) -> ImageError:
    # an unknown type's name already says "record": "mandatory record 0xcc"
    name = rec.name if " record " in rec.name else f"{rec.name} record"
    return ImageError(f"{name} at offset {rec.offset}: {why}")


def scan_image(path: str | Path, wire: bool = False, lazy: bool = False) -> ImageInfo:
    """Read and check a whole image; raises ImageError naming what is wrong.
    ``wire``: a stream received from a migration, which has no digest (the
    transport guarded it); a file must have one. ``lazy``: the pages are
    not read now: an image with page digests has its structure checked
    against its digest, and each block of pages when first read
    (info.page_digests; the check's own reads of pagetables and the p2m
    included, their blocks' octets kept there for the restore); one
    without them is checked whole, as without ``lazy``.
    Without ``lazy`` every octet is checked against the digests
    (savefile.check_digest), the page digests included."""
    p = Path(path)
    try:
        # a FIFO or a device would block the open or the reads: never open one
        if not stat.S_ISREG(os.stat(p).st_mode):
            raise ImageError(f"{p}: not a regular file")
        f = open(p, "rb")
    except OSError as e:
        raise ImageError(f"cannot read {p}: {e.strerror or e}") from None
    with f:
        try:
            return _scan(f, str(p), wire, lazy)
        except StreamError as e:
            raise ImageError(f"{p}: {e}") from None


def read_head(src: BinaryIO, path: str) -> tuple[savefile.XlHeader, ImageInfo]:
    """xl's header and config, libxl's header: what a receiver knows before
    the first record (enough to create the domain)."""
    head = src.read(12)
    if head == stream.IHDR.pack(stream.IHDR_MARKER, stream.IHDR_ID, 0, 0, 0, 0)[:12]:
        raise StreamError("an image from an older pvlab (a bare libxc stream, no xl header); "
                          "this pvlab reads only xl save files")
    xl = savefile.read_xl_header(_Prefixed(head, src))
    savefile.read_libxl_header(src, xl.end)
    info = ImageInfo(path, 0, stream.DomainHeader(0, 0, 0, 0))
    _config(info, xl.config)
    return xl, info


class _Prefixed:
    """A stream with octets already read put back in front of it."""

    def __init__(self, head: bytes, src: BinaryIO) -> None:
        self.head, self.src = head, src

    def read(self, n: int) -> bytes:
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.src.read(n - len(out)) if n > len(out) else b"")


def _scan(f: BinaryIO, path: str, wire: bool = False, lazy: bool = False) -> ImageInfo:
    """The three layers in file order: xl's header, libxl's records with the
    libxc stream read where LIBXC_CONTEXT stands, then the checks that need
    the whole image, then the digests."""
    xl, info = read_head(f, path)
    parser = RecordParser(info, keep=True)
    while True:
        rec = savefile.read_libxl_record(f)
        parser.libxl(rec)
        if rec.type == LibxlRecType.END:
            break
        if rec.type == LibxlRecType.LIBXC_CONTEXT:
            _scan_libxc(f, parser)
    info.size = f.tell()
    trailer = _read_trailer(f, xl, info)
    read_at: Callable[[np.ndarray], np.ndarray] = functools.partial(_read_pages, f)
    if lazy and trailer is not None:
        info.page_digests = _page_digests(f, xl, info, trailer)
        read_at = _checked_reader(f, info.page_digests)
    where = _page_offsets(info)
    _localise_earlier(info, read_at, parser.earlier_tables(where))
    check_end(info, lambda pfns: read_at(where[pfns]))
    if info.page_digests is None:
        sent = (info.domain or {}).get("kind") == savefile.CHECKPOINTED_KIND
        savefile.check_digest(f, xl, info.domain is not None and not wire and not sent,
                              _page_ranges(info))
    return info


def _read_trailer(f: BinaryIO, xl: savefile.XlHeader, info: ImageInfo) -> bytes | None:
    """What follows libxl's END: nothing, or exactly the page digests
    XL_PAGE_DIGESTS announces (one per block of 64 pages of each PAGE_DATA
    record, then the structure's)."""
    b = xl.page_digests
    rest = f.read(1 if b is None else b.trailer_size + 1)
    if b is None:
        if rest:
            raise ImageError(f"offset {info.size}: data after libxl's END record")
        return None
    if b.trailer != info.size or len(rest) != b.trailer_size:
        raise ImageError(f"offset {info.size}: the page digests are not the "
                         f"{b.trailer_size} octets at offset {b.trailer} that XL_PAGE_DIGESTS "
                         "announces, right after libxl's END, to the end of the file")
    want = _blocks(info)[0].size
    if b.count != want:
        raise ImageError(f"offset {b.trailer}: {b.count} page digests for the {want} blocks "
                         f"of {len(info.batches)} PAGE_DATA records")
    return rest


def _page_ranges(info: ImageInfo) -> list[tuple[int, int]]:
    """Each PAGE_DATA record's pages as (offset, length), in stream order."""
    return [(b.data_offset, PAGE_SIZE * int(b.with_data.sum())) for b in info.batches]


def _blocks(info: ImageInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """savefile.digest_blocks over every PAGE_DATA record at once: each
    block's record offset, its offset and its length."""
    ranges = np.array(_page_ranges(info), dtype=np.int64).reshape(-1, 2)
    per = np.maximum(-(-ranges[:, 1] // savefile.DIGEST_BLOCK), 1)
    record = np.repeat(np.arange(ranges.shape[0]), per)
    first = np.cumsum(per) - per  # each record's first block
    at = (np.arange(record.size) - first[record]) * savefile.DIGEST_BLOCK
    sizes = np.minimum(ranges[record, 1] - at, savefile.DIGEST_BLOCK)
    offsets = np.array([b.offset for b in info.batches], dtype=np.int64)
    return offsets[record], ranges[record, 0] + at, sizes


def _page_digests(f: BinaryIO, xl: savefile.XlHeader, info: ImageInfo,
                  trailer: bytes) -> PageDigests:
    """The trailer and the structure checked against their digests; the
    page digests, to check each block when it is first read."""
    pagedigest.check_trailer(xl, trailer)
    pagedigest.check_structure(xl, trailer, _range_reader(f), _page_ranges(info))
    return PageDigests(trailer, *_blocks(info))


def _range_reader(f: BinaryIO) -> pagedigest.ReadRange:
    def read(offset: int, length: int) -> bytes:
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise ImageError(f"truncated at offset {offset}")
        return data
    return read


def _checked_reader(f: BinaryIO, digests: PageDigests) -> Callable[[np.ndarray], np.ndarray]:
    """The pages from the octets their blocks were checked with, each block
    read once; the blocks stay kept for the restore (PageDigests.release)."""
    def read(offsets: np.ndarray) -> np.ndarray:
        return digests.pages(offsets, _range_reader(f))
    return read


def seal(image: bytearray) -> None:
    """savefile.seal: a tool or a test that edits an image on purpose, even
    into a bad one, seals it again so."""
    savefile.seal(image)


def _scan_libxc(f: BinaryIO, parser: RecordParser) -> None:
    """The libxc stream from ``f``'s position to its END, pages skipped;
    after a CHECKPOINT, libxl's records up to CHECKPOINT_END (a checkpointed
    stream interleaves them there)."""
    base = f.tell()
    parser.headers(*stream.read_headers(f, base), base)
    offset = base + stream.IHDR.size + stream.DHDR.size
    while True:
        rec = stream.read_record(f, offset, {RecType.PAGE_DATA: _page_data_head})
        offset += stream.record_size(rec)
        parser.libxc(rec)
        if rec.type == RecType.END:
            return
        if rec.type == RecType.CHECKPOINT:
            while parser.libxl(savefile.read_libxl_record(f)) != LibxlRecType.CHECKPOINT_END:
                pass
            offset = f.tell()


class RecordParser:
    """The checks of xg_sr_restore.c's process_record and its x86 PV
    handlers, one record at a time, into an ImageInfo: the one parser that
    the file scan (scan_image) and the stream receiver (restore.py) drive.
    PAGE_DATA gives its batch back (``libxc``); a checkpointed stream's
    records are checked as they come, epoch by epoch (a VCPU's context once
    an epoch, the emulator records once a checkpoint)."""

    def __init__(self, info: ImageInfo, keep: bool) -> None:
        self.info = info
        self.keep = keep  # a file's: where every record and page is (a stream's go by)
        self.seen_pv_info = self.seen_static_end = False
        self.seen_libxc = False
        self.in_checkpoint = False        # from CHECKPOINT to libxl's CHECKPOINT_END
        self.epoch_vcpus: set[int] = set()
        self.epoch_start = 0              # offset of the epoch's first record
        self.epoch_copies = 0
        self.xenstore_seen = False
        self.devices: list[dict] = []
        self.tables: list[tuple[int, int, int]] = []  # (pfn, level, page's offset)

    def headers(self, version: int, header: stream.DomainHeader, base: int) -> None:
        self.info.version, self.info.header, self.info.libxc_offset = version, header, base
        self.epoch_start = base + stream.IHDR.size + stream.DHDR.size

    def libxc(self, rec: stream.Record) -> PageBatch | None:
        """One libxc record checked; a PAGE_DATA's batch returned."""
        if self.keep:
            self.info.records.append(RecordInfo(rec.type, rec.offset, rec.length))
        if rec.type == RecType.PAGE_DATA:
            if self.info.max_pfn < 0:
                raise _fail(rec, "before X86_PV_P2M_FRAMES")
            batch, tables = _page_data(self.info, rec)
            self.epoch_copies += int(batch.pfns.size)
            if self.keep:
                self.info.batches.append(batch)
                self.tables += tables
            return batch
        _process_record(self, rec)
        return None

    def checkpoint(self, rec: stream.Record) -> None:
        """CHECKPOINT (handle_checkpoint): the epoch is whole once libxl's
        CHECKPOINT_END follows; the next one's VCPUs come again."""
        if rec.body:
            raise _fail(rec, "a CHECKPOINT record has no body")
        if self.info.max_pfn < 0 or 0 not in self.epoch_vcpus:
            raise _fail(rec, "before the epoch's memory and VCPUs (X86_PV_P2M_FRAMES, "
                        "X86_PV_VCPU_BASIC)")
        info = self.info
        info.checkpoint = True
        if self.keep:
            info.epochs.append(Epoch(len(info.epochs), self.epoch_start, rec.offset,
                                     self.epoch_copies))
        self.in_checkpoint = True
        self.epoch_vcpus = set()
        self.epoch_copies = 0

    def libxl(self, rec: savefile.LibxlRecord) -> int:
        """One libxl record checked; returns its type."""
        info = self.info
        if self.keep:
            info.libxl_records.append(RecordInfo(rec.type, rec.offset, rec.length, "libxl"))
        t = rec.type
        if self.in_checkpoint and t in (LibxlRecType.LIBXC_CONTEXT, LibxlRecType.END):
            raise _fail(rec, "inside a checkpoint, before its CHECKPOINT_END (an older "
                        "pvlab's checkpoint put libxl's records after libxc's END: save it "
                        "again)")
        if t == LibxlRecType.LIBXC_CONTEXT:
            if self.seen_libxc or rec.length:
                raise _fail(rec, "a second LIBXC_CONTEXT, or one with a body")
            self.seen_libxc = True
        elif t == LibxlRecType.EMULATOR_XENSTORE_DATA:
            if self.xenstore_seen:
                raise _fail(rec, "a second EMULATOR_XENSTORE_DATA")
            self.xenstore_seen = True
            info.xenstore = _xenstore(rec, _emulator_data(rec, 0))
        elif t == LibxlRecType.EMULATOR_CONTEXT:
            self.devices.append(_device(rec, _emulator_data(rec, len(self.devices))))
        elif t == LibxlRecType.CHECKPOINT_END:
            if rec.body or not self.in_checkpoint:
                raise _fail(rec, "CHECKPOINT_END with a body, or not after libxc's CHECKPOINT")
            self._close_emulators()
            self.in_checkpoint = False
            self.epoch_start = rec.offset + stream.RHDR.size
        elif t == LibxlRecType.END:
            self._end(rec)
        else:
            raise _fail(rec, "a libxl record of a checkpointed (COLO) stream pvlab does "
                        "not restore")
        return t

    def transition_end(self, rec: savefile.LibxlRecord) -> None:
        """libxl's POSTCOPY_TRANSITION_END (post-copy's own check is the
        caller's): the emulator records before it are whole, as at END."""
        self._end(rec)

    def _end(self, rec: savefile.LibxlRecord) -> None:
        if not self.seen_libxc:
            raise StreamError("no LIBXC_CONTEXT record: the libxl stream holds no domain")
        if not self.info.checkpoint:
            self._close_emulators()
        elif self.xenstore_seen or self.devices:
            raise _fail(rec, "emulator records after the last checkpoint's CHECKPOINT_END")

    def _close_emulators(self) -> None:
        """A set of emulator records is whole: its devices must be the
        config's (a checkpoint's set replaces the last one)."""
        info = self.info
        info.devices, self.devices, self.xenstore_seen = self.devices, [], False
        placed = (info.domain or {}).get("devices")
        if placed is not None:
            have = [{k: d[k] for k in savefile.DEVICE_CONFIG_KEYS} for d in info.devices]
            if placed != have:
                raise ImageError(f"the config's devices {placed} are not the ones whose "
                                 f"state the EMULATOR_CONTEXT records hold ({have})")

    def end_of_libxc(self, rec: stream.Record) -> None:
        """libxc's END: in a checkpointed stream, right after a CHECKPOINT_END
        (Xen's receiver would drop an unfinished epoch's records silently)."""
        if self.info.checkpoint and self.epoch_copies + len(self.epoch_vcpus):
            raise _fail(rec, "after records of an epoch with no CHECKPOINT")

    def earlier_tables(self, where: np.ndarray) -> list[tuple[int, int, int]]:
        """The copies of pagetables that a later copy of their pfn overwrote
        (the rounds of a live save): the file's, by their offsets."""
        return [t for t in self.tables if where[t[0]] != t[2] or not
                pfinfo.level(self.info.nibbles[t[0]])]


def _process_record(p: RecordParser, rec: stream.Record) -> None:
    # a branch per record type as xg_sr_restore.c's process_record and
    # x86_pv_process_record have: longer than most, read as a table
    info, t = p.info, rec.type
    if t == RecType.END:
        p.end_of_libxc(rec)
    elif t == RecType.X86_PV_INFO:
        if p.seen_pv_info:
            raise _fail(rec, "a second X86_PV_INFO")
        if len(rec.body) != stream.X86_PV_INFO.size:
            raise _fail(rec, f"length {len(rec.body)}, expected {stream.X86_PV_INFO.size}")
        width, levels = stream.X86_PV_INFO.unpack(rec.body)
        if (width, levels) != (stream.GUEST_WIDTH_X86_64, stream.PT_LEVELS_X86_64):
            raise _fail(rec, f"guest width {width}, {levels} pagetable levels: only "
                        "64-bit guests with 4 levels are restored")
        p.seen_pv_info = True
    elif t == RecType.STATIC_DATA_END:
        if info.version < 3:
            raise _fail(rec, f"in a version {info.version} stream: the record is new in "
                        "version 3")
        if p.seen_static_end:
            raise _fail(rec, "a second STATIC_DATA_END")
        if not p.seen_pv_info:
            raise _fail(rec, "before X86_PV_INFO")
        p.seen_static_end = True
    elif t == RecType.X86_PV_P2M_FRAMES:
        if not p.seen_pv_info:
            raise _fail(rec, "before X86_PV_INFO")
        if not p.seen_static_end:
            if info.version >= 3:
                raise _fail(rec, "before STATIC_DATA_END (mandatory in version 3)")
            p.seen_static_end = True  # a v2 stream: STATIC_DATA_END is implied here
        if info.max_pfn >= 0:
            raise _fail(rec, "a second X86_PV_P2M_FRAMES")
        _p2m_frames(info, rec)
    elif t == RecType.X86_TSC_INFO:
        if len(rec.body) != stream.X86_TSC_INFO.size:
            raise _fail(rec, f"length {len(rec.body)}, expected {stream.X86_TSC_INFO.size}")
        info.tsc = stream.X86_TSC_INFO.unpack(rec.body)
    elif t == RecType.SHARED_INFO:
        if not p.seen_pv_info:
            raise _fail(rec, "before X86_PV_INFO")
        if len(rec.body) != PAGE_SIZE:
            raise _fail(rec, f"length {len(rec.body)}, expected {PAGE_SIZE}")
        info.shared_info = rec.body
    elif t == RecType.X86_PV_VCPU_BASIC:
        _vcpu_basic(info, rec, p.epoch_vcpus)
    elif t == RecType.CHECKPOINT:
        p.checkpoint(rec)
    elif t in (RecType.X86_PV_VCPU_EXTENDED, RecType.X86_PV_VCPU_XSAVE,
               RecType.X86_PV_VCPU_MSRS, RecType.X86_CPUID_POLICY, RecType.X86_MSR_POLICY):
        pass  # state pvlab's VCPUs do not have: read and dropped
    elif not t & stream.REC_TYPE_OPTIONAL:
        raise _fail(rec, "a mandatory record type this restorer does not know")


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
    info.ever_populated = np.zeros(end + 1, dtype=bool)
    info.ever_data = np.zeros(end + 1, dtype=bool)


def _page_data(info: ImageInfo, rec: stream.Record
               ) -> tuple[PageBatch, list[tuple[int, int, int]]]:
    """handle_page_data's checks; the batch, and its pagetables' (pfn,
    level, offset of the page)."""
    length = rec.length
    if length < stream.PAGE_DATA_HDR.size:
        raise _fail(rec, f"length {length}, less than its 8-octet header")
    (count,) = stream.PAGE_DATA_HDR.unpack_from(rec.body)
    if count < 1:
        raise _fail(rec, "expected at least 1 pfn")
    if count > stream.MAX_BATCH_SIZE:
        raise _fail(rec, f"{count} pfns, more than a batch's {stream.MAX_BATCH_SIZE}")
    if len(rec.body) < 8 + 8 * count:
        raise _fail(rec, f"length {length} is too short for {count} pfns")
    entries = np.frombuffer(rec.body, dtype=np.uint64, count=count, offset=8)
    pfns = (entries & np.uint64(stream.PAGE_DATA_PFN_MASK)).astype(np.int64)
    nib = (entries >> np.uint64(60)).astype(np.uint8)
    # the common case told by the count of each type and a few passes over
    # the batch; the first fault, if any, found and named entry by entry
    # (_bad_entry)
    kinds = np.bincount(nib, minlength=16)
    if int(pfns.max()) > info.max_pfn or (entries & RESERVED_BITS).any() \
            or kinds[~pfinfo.KNOWN_NIBBLES].any():
        _bad_entry(info, rec, entries, pfns, nib)
    ordered = np.sort(pfns)
    twice = ordered[1:][ordered[1:] == ordered[:-1]]
    if twice.size:
        pfn = int(twice[0])
        i, j = np.flatnonzero(pfns == pfn)[:2].tolist()
        raise _fail(rec, f"pfn {pfn:#x} twice in one batch (index {i} and {j})")
    pages = int(kinds[pfinfo.DATA_NIBBLES].sum())
    want = 8 + 8 * count + PAGE_SIZE * pages
    if length != want:
        raise _fail(rec, f"wrong size: length {length}, expected {want} for {count} pfns "
                    f"with {pages} pages of data")
    every = pages == count
    with_data = np.ones(count, dtype=bool) if every else pfinfo.has_data(nib)
    data_offset = rec.offset + stream.RHDR.size + 8 + 8 * count
    batch = PageBatch(rec.offset, data_offset, pfns, nib, with_data)
    # a pfn may come many times (the rounds of a live save): the last copy's
    # type wins, and a frame once given stays (process_page_data)
    info.nibbles[pfns] = nib
    populating = int(kinds[pfinfo.POPULATING_NIBBLES].sum())
    info.ever_populated[pfns if populating == count else pfns[pfinfo.populates(nib)]] = True
    data_pfns = pfns if every else pfns[with_data]
    info.ever_data[data_pfns] = True
    info.copies += count
    if not kinds[pfinfo.TABLE_NIBBLES].any():
        return batch, []
    level = pfinfo.levels(nib if every else nib[with_data])
    k = np.flatnonzero(level)  # the tables' places among the pages
    return batch, list(zip(data_pfns[k].tolist(), level[k].tolist(),
                           (data_offset + PAGE_SIZE * k).tolist(), strict=True))


def _bad_entry(info: ImageInfo, rec: stream.Record, entries: np.ndarray, pfns: np.ndarray,
               nib: np.ndarray) -> None:
    """The first entry of a batch beyond the domain's maximum, of an unknown
    type or with reserved bits set, named."""
    known = pfinfo.is_known(nib)
    bad = np.flatnonzero((pfns > info.max_pfn) | ~known | ((entries & RESERVED_BITS) != 0))
    i = int(bad[0])
    pfn = int(pfns[i])
    if pfn > info.max_pfn:
        raise _fail(rec, f"pfn {pfn:#x} (index {i}) outside the domain's maximum "
                    f"{info.max_pfn:#x}")
    if not known[i]:
        raise _fail(rec, f"pfn {pfn:#x} (index {i}): unknown type {int(nib[i]):#x}")
    raise _fail(rec, f"pfn {pfn:#x} (index {i}): reserved bits set")


def _vcpu_basic(info: ImageInfo, rec: stream.Record, epoch: set[int]) -> None:
    """A VCPU's context, once an epoch (the last one wins)."""
    want = stream.VCPU_HDR.size + CONTEXT_SIZE
    if len(rec.body) != want:
        raise _fail(rec, f"length {len(rec.body)}, expected {want} (8 + a 64-bit "
                    "vcpu_guest_context)")
    (vcpu_id,) = stream.VCPU_HDR.unpack_from(rec.body)
    if vcpu_id >= MAX_VCPUS:
        raise _fail(rec, f"vcpu {vcpu_id}: at most {MAX_VCPUS} are supported")
    if vcpu_id in epoch:
        raise _fail(rec, f"a second context for vcpu {vcpu_id}")
    epoch.add(vcpu_id)
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


# the last copy of each of these pfns' pages, as rows of 512 entries: read
# from the file, or from what a receiver kept or wrote
PageReader = Callable[[np.ndarray], np.ndarray]


def check_end(info: ImageInfo, read: PageReader) -> None:
    """The checks that need the whole stream, on what arrived: a file's
    after its last octet, a stream's at its END (the tables then in guest
    memory; pinning validates them again through the hypervisor)."""
    _check_whole(info)
    _check_vcpus(info)
    _check_tables(info, read)
    _check_p2m(info, read)


def _check_whole(info: ImageInfo) -> None:
    """What only the whole stream can tell (x86_pv_stream_complete's checks)."""
    if info.max_pfn < 0:
        raise ImageError("no X86_PV_P2M_FRAMES record")
    if 0 not in info.vcpus:
        raise ImageError("the sender didn't send vcpu0's basic state (no X86_PV_VCPU_BASIC "
                         "for vcpu 0)")
    if not info.shared_info:
        raise ImageError("no SHARED_INFO record")
    nib = info.nibbles
    frames = info.p2m_frame_pfns
    for i, pfn in enumerate(frames.tolist()):
        if nib[pfn] != 0:
            raise ImageError(f"p2m frame {i} is pfn {pfn:#x}, which is not a NOTAB page of "
                             "the image")
    twice = np.flatnonzero(np.bincount(frames, minlength=info.nr_pfns) > 1)
    if twice.size:
        raise ImageError(f"pfn {int(twice[0]):#x} is in the p2m frame list twice")
    for vcpu_id, raw in info.vcpus.items():
        _check_vcpu_frames(info, vcpu_id, vcpu_guest_context.from_buffer_copy(raw))


def _check_vcpu_frames(info: ImageInfo, vcpu_id: int, ctx: vcpu_guest_context) -> None:
    """CR3 must name a pinned L4: only pinned tables are validated by the
    restore before the VCPU runs on them (pin_pagetables)."""
    nib = info.nibbles
    cr3 = ctx.ctrlreg[3] >> PAGE_SHIFT
    if cr3 > info.max_pfn or not (pfinfo.level(nib[cr3]) == pfinfo.L4
                                  and pfinfo.is_pinned_table(nib[cr3])):
        what = pfinfo.type_name(nib[cr3]) if cr3 <= info.max_pfn else "absent"
        raise ImageError(f"vcpu{vcpu_id}'s cr3 (pfn {cr3:#x}) has type {what}, expected "
                         "L4 pinned")
    if ctx.ctrlreg[1] & stream.USER_L4_SET:
        user = ctx.ctrlreg[1] >> PAGE_SHIFT
        if user > info.max_pfn or pfinfo.level(nib[user]) != pfinfo.L4:
            raise ImageError(f"vcpu{vcpu_id}'s user L4 (pfn {user:#x}) is no L4 of the image")
    if vcpu_id == 0:
        si = ctx.user_regs.rdx
        if si > info.max_pfn or nib[si] != pfinfo.NOTAB:
            raise ImageError(f"start info pfn {si:#x} (vcpu0's rdx) has a bad type")


def vcpus_up(info: ImageInfo) -> list[int]:
    """The VCPUs that were up at the save: libxl's b_info.avail_vcpus when the
    config has it, else all max_vcpus of them (a pvlab guest brings every VCPU
    up at boot and never takes one down)."""
    b_info = info.xl_config.get("b_info", {})
    avail = b_info.get("avail_vcpus")
    if isinstance(avail, list) and all(isinstance(v, int) for v in avail):
        return sorted(avail)
    return list(range(int(b_info.get("max_vcpus", len(info.vcpus)))))


def _check_vcpus(info: ImageInfo) -> None:
    """One context, marked online, for every VCPU that was up. Xen's save
    skips an offline VCPU, and its restore leaves a VCPU it has no context for
    down: a guest that had it up would wait for it for ever."""
    if info.domain is None:
        return  # an image of Xen's: no pvlab guest to wait for its VCPUs
    up = vcpus_up(info)
    nr = int(info.domain["vcpus"])
    for vcpu_id in sorted(info.vcpus):
        if vcpu_id >= nr:
            raise ImageError(f"a context for vcpu {vcpu_id}, but the domain has {nr} vcpus")
        if not vcpu_guest_context.from_buffer_copy(info.vcpus[vcpu_id]).flags & VGCF_online:
            raise ImageError(f"vcpu{vcpu_id}'s context is not marked online (VGCF_online): "
                             "the save writes only the contexts of VCPUs that are up")
    missing = [v for v in up if v not in info.vcpus]
    if missing:
        raise ImageError(f"no context (X86_PV_VCPU_BASIC) for vcpu {missing[0]}, which was up "
                         f"at the save: {len(info.vcpus)} contexts for {len(up)} VCPUs up")
    extra = sorted(set(info.vcpus) - set(up))
    if extra:
        raise ImageError(f"a context for vcpu {extra[0]}, which the config says was down")


def _page_offsets(info: ImageInfo) -> np.ndarray:
    """Where each pfn's last page of data is in the file (-1: none), and its
    type then, kept in info.last_offset and info.last_nibble; returns the
    offsets. A batch names a pfn once, so the later batch's copy wins."""
    where = np.full(info.nr_pfns, -1, dtype=np.int64)
    nibbles = np.full(info.nr_pfns, ABSENT, dtype=np.uint8)
    for b in info.batches:
        pfns = b.pfns[b.with_data]
        where[pfns] = b.data_offset + PAGE_SIZE * np.arange(pfns.size, dtype=np.int64)
        nibbles[pfns] = b.nibbles[b.with_data]
    info.last_offset, info.last_nibble = where, nibbles
    return where


def _read_pages(f: BinaryIO, offsets: np.ndarray) -> np.ndarray:
    """The pages at these file offsets, as rows of 512 entries."""
    out = np.empty((offsets.size, L1_PAGETABLE_ENTRIES), dtype=np.uint64)
    fd = f.fileno()
    for k, offset in enumerate(offsets.tolist()):
        page = os.pread(fd, PAGE_SIZE, offset)  # one call a page, no seek
        if len(page) != PAGE_SIZE:
            raise ImageError(f"truncated at offset {offset}")
        out[k] = np.frombuffer(page, dtype=np.uint64)
    return out


def _check_tables(info: ImageInfo, read: PageReader) -> None:
    """The last copy of every pagetable must name in its present entries only
    pfns the image populates at its end (what localising would find out half
    way through a restore); an L4, L3 or L2 entry must name a table one level
    down (what pinning validates, and what the guest walks), and every L1..L3
    must be named by a table one level up: Xen keeps a table's type only
    while something references it, so an unreferenced one is a table whose
    parent the image retyped. Earlier copies are not validated (Xen's
    restore does not validate during the rounds); they are localised when
    they arrive, so a pfn they name gets a frame (_localise_earlier)."""
    n = info.nr_pfns
    # per pfn, one more for any pfn beyond the maximum (populated by nothing,
    # of no level), so that every entry's target can be looked up
    populated = np.zeros(n + 1, dtype=bool)
    populated[:n] = (info.nibbles != ABSENT) & pfinfo.populates(info.nibbles)
    levels = np.zeros(n + 1, dtype=np.uint8)
    levels[:n] = pfinfo.levels(info.nibbles)
    final = np.flatnonzero(levels)
    pages = read(final)
    present = (pages & np.uint64(_PAGE_PRESENT)).astype(bool)
    targets = np.minimum((pages & PTE_FRAME_MASK) >> np.uint64(PAGE_SHIFT),
                         np.uint64(n)).astype(np.intp)
    # all the tables at once; the first one with a fault is checked again
    # alone (_check_table), which says what it is. The level rule is only
    # the upper tables' (a few among the L1s)
    wrong = present & ~populated[targets]
    up = np.flatnonzero(levels[final] > 1)
    up_present = present[up]
    wrong[up] |= up_present & ((levels[targets[up]] != (levels[final[up]] - 1)[:, None])
                               | ((pages[up] & np.uint64(_PAGE_PSE)) != 0))
    faulty = np.flatnonzero(wrong.any(axis=1))
    if faulty.size:
        k = int(faulty[0])
        _check_table(info, populated[:n], int(final[k]), int(levels[final[k]]), pages[k])
        raise AssertionError(f"pagetable pfn {int(final[k]):#x}: the checks disagree")
    named = np.zeros(n + 1, dtype=bool)
    named[targets[up][up_present]] = True
    orphans = np.flatnonzero((levels >= 1) & (levels < pfinfo.L4) & ~named)
    if orphans.size:
        pfn = int(orphans[0])
        raise ImageError(f"pagetable pfn {pfn:#x} (L{int(levels[pfn])}) is named by no table "
                         f"of level L{int(levels[pfn]) + 1}: the image retyped its parent")


def _check_table(info: ImageInfo, populated: np.ndarray, pfn: int, level: int,
                 page: np.ndarray) -> None:
    """One pagetable's present entries: pfns the image populates, and for an
    L4, L3 or L2 tables one level down (_check_level)."""
    present = np.flatnonzero(page & np.uint64(_PAGE_PRESENT))
    targets = (page[present] & PTE_FRAME_MASK) >> np.uint64(PAGE_SHIFT)
    bad = targets > np.uint64(info.max_pfn)
    if not bad.any():
        bad = ~populated[targets.astype(np.int64)]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ImageError(f"pagetable pfn {pfn:#x} (L{level}) slot {int(present[i])} names "
                         f"pfn {int(targets[i]):#x}, which the image does not populate")
    if level > 1:
        _check_level(info, pfn, level, page[present], present, targets.astype(np.int64))


def _localise_earlier(info: ImageInfo, read_at: Callable[[np.ndarray], np.ndarray],
                      earlier: list[tuple[int, int, int]]) -> None:
    """A pfn that an earlier copy of a pagetable names gets a frame, as
    x86_pv_localise_page populates the pfns a table names before it has
    them; a pfn beyond the domain's maximum cannot (Xen: "Bad mfn")."""
    for (pfn, level, _), page in zip(earlier, read_at(
            np.array([t[2] for t in earlier], dtype=np.int64)), strict=True):
        info.ever_populated[table_targets(info, pfn, level, page)] = True


def table_targets(info: ImageInfo, pfn: int, level: int, page: np.ndarray) -> np.ndarray:
    """The pfns a copy of a pagetable names, which x86_pv_localise_page
    populates as it goes; a pfn beyond the domain's maximum cannot be
    (Xen: "Bad mfn")."""
    present = np.flatnonzero(page & np.uint64(_PAGE_PRESENT))
    targets = (page[present] & PTE_FRAME_MASK) >> np.uint64(PAGE_SHIFT)
    beyond = np.flatnonzero(targets > np.uint64(info.max_pfn))
    if beyond.size:
        i = int(beyond[0])
        raise ImageError(f"a copy of pagetable pfn {pfn:#x} (L{level}) slot "
                         f"{int(present[i])} names pfn {int(targets[i]):#x}, beyond the "
                         f"domain's maximum {info.max_pfn:#x}")
    return targets.astype(np.int64)


def _check_level(info: ImageInfo, pfn: int, level: int, entries: np.ndarray,
                 slots: np.ndarray, targets: np.ndarray) -> None:
    """An L4, L3 or L2's entries name tables one level down; no superpages,
    which the save never writes."""
    below = pfinfo.level(info.nibbles[targets])
    bad = np.flatnonzero((below != level - 1) | ((entries & np.uint64(_PAGE_PSE)) != 0))
    if bad.size:
        i = int(bad[0])
        t = int(targets[i])
        raise ImageError(f"pagetable pfn {pfn:#x} (L{level}) slot {int(slots[i])} names pfn "
                         f"{t:#x} of type {pfinfo.type_name(info.nibbles[t])}, expected "
                         f"L{level - 1}")


def _check_p2m(info: ImageInfo, read: PageReader) -> None:
    """The p2m frame list must be the frames of the p2m the guest published:
    the ones its own tables map at shared_info's p2m_vaddr from p2m_cr3, and
    the p2m they hold must give a frame to exactly the pfns the image
    populates. Restore writes the new p2m into these frames: a wrong one
    would overwrite a page of the guest's and leave its p2m stale."""
    frames = info.p2m_frame_pfns
    p2m = read(frames).reshape(-1)[:info.nr_pfns]
    have = p2m != np.uint64(INVALID_MFN)
    populated = np.zeros(info.nr_pfns, dtype=bool)
    populated[info.populated_at_end()] = True
    differ = np.flatnonzero(have != populated)
    if differ.size:
        pfn = int(differ[0])
        raise ImageError(f"the p2m in the frames of X86_PV_P2M_FRAMES gives pfn {pfn:#x} "
                         f"{'a frame' if have[pfn] else 'no frame'}, but the image "
                         f"{'does not populate it' if have[pfn] else 'populates it'}")
    arch = shared_info.from_buffer_copy(info.shared_info).arch
    if info.domain is None and not arch.p2m_cr3:
        return  # a Xen guest publishing its p2m as a frame tree: nothing to walk
    owner = np.flatnonzero(have & (p2m == np.uint64(int(arch.p2m_cr3) >> PAGE_SHIFT)))
    if owner.size != 1 or pfinfo.level(info.nibbles[int(owner[0])]) != pfinfo.L4:
        raise ImageError(f"shared_info's p2m_cr3 {int(arch.p2m_cr3):#x} is no L4 of the p2m "
                         "in the frames of X86_PV_P2M_FRAMES")
    va = np.uint64(arch.p2m_vaddr) + np.uint64(PAGE_SIZE) * np.arange(frames.size,
                                                                       dtype=np.uint64)
    mapped = _walk(info, read, int(owner[0]), va)
    wrong = np.flatnonzero(mapped != frames)
    if wrong.size:
        i = int(wrong[0])
        raise ImageError(f"p2m frame {i} of X86_PV_P2M_FRAMES is pfn {int(frames[i]):#x}, but "
                         f"the guest's tables map pfn {int(mapped[i]):#x} there (p2m_vaddr + "
                         f"{i * PAGE_SIZE:#x})")


def _walk(info: ImageInfo, read: PageReader, l4: int, vas: np.ndarray) -> np.ndarray:
    """The pfn a canonical pagetable tree maps at each of ``vas``; -1 where
    none. The walks go down together, each table read once."""
    tables = np.full(vas.size, l4, dtype=np.int64)
    for level in range(pfinfo.L4, 0, -1):
        slots = ((vas >> np.uint64(PAGE_SHIFT + 9 * (level - 1)))
                 & np.uint64(L1_PAGETABLE_ENTRIES - 1)).astype(np.intp)
        ok = tables >= 0
        distinct, which = np.unique(tables[ok], return_inverse=True)
        entries = np.zeros(vas.size, dtype=np.uint64)
        entries[ok] = read(distinct)[which, slots[ok]]
        nxt = ((entries & PTE_FRAME_MASK) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        inside = nxt <= info.max_pfn
        ok &= ((entries & np.uint64(_PAGE_PRESENT)) != 0) & inside
        ok[ok] = info.ever_data[nxt[ok]]
        tables = np.where(ok, nxt, -1)
    return tables


__all__ = ["ImageError", "ImageInfo", "PageBatch", "Epoch", "RecordParser", "check_end",
           "read_head", "scan_image", "vcpus_up", "TYPE_NAMES"]
