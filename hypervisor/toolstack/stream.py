"""The framing of Xen's libxc migration stream (docs/specs/libxc-migration-stream
.pandoc in xen.git, revision 3; tools/libs/guest/xg_sr_stream_format.h):

    image header   24 octets, big-endian: marker ~0, "XENF", version, options
    domain header  16 octets: type (1 = x86 PV), page_shift, Xen's version
    records        u32 type, u32 length, the body, zero padding to 8 octets

Version 3 is written; 2 and 3 are read (a v2 stream has no STATIC_DATA_END:
a reader infers it at the first X86_PV_P2M_FRAMES). Record types with bit 31
set are optional: a reader skips the ones it does not know, and fails on an
unknown mandatory one (Xen's own verifier fails on both). pvlab writes only
Xen's types, except in two streams: a Remus stream's one type of its own,
optional (REMUS_OUTPUT), carries the primary's output channel beside the
epochs; a post-copy migration's seven (PostcopyType, Joshua Otto's RFC
renumbered), mandatory, switch the stream to post-copy and carry its pages
and the destination's requests, and pvlab's three beside them resume it on a
new connection after a drop, or refuse it before the transition.
In a saved image this stream sits inside libxl's, which sits inside xl's
save file (savefile.py). This module only frames; what the records hold is
the save and restore code's business.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

IHDR = struct.Struct(">QIIHHI")
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_OPT_BIG_ENDIAN = 1
DHDR = struct.Struct("<IHHII")
DHDR_TYPE_X86_PV = 1
RHDR = struct.Struct("<II")
REC_ALIGN = 8
REC_LENGTH_MAX = 128 << 20
REC_TYPE_OPTIONAL = 0x80000000
# pvlab's own record, optional (a restorer that does not know it skips it):
# a Remus primary's held output and its releases (remus.OutputBuffer)
REMUS_OUTPUT = REC_TYPE_OPTIONAL | 0x0100
VERSION = 3
READABLE_VERSIONS = (2, 3)


class RecType(enum.IntEnum):
    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12


class PostcopyType(enum.IntEnum):
    """pvlab's post-copy records: Joshua Otto's seven (his xen RFC's
    libxc-migration-stream spec, 0x10-0x16 there, which Xen has since given
    to STATIC_DATA_END and the CPU policies), beside REMUS_OUTPUT. Mandatory
    (bit 31 clear): a reader that does not know them must refuse the stream.
    FAULT and COMPLETE go the other way, destination to source, and so does
    REFUSED: a destination that cannot take post-copy says so at
    POSTCOPY_BEGIN, before the guest could run there, so that the source may
    resume its copy (Otto's stream has no refusal: QEMU's sides agree on the
    capability before the migration starts). RESUME, RECV_BITMAP and REFUSED
    are pvlab's own; the first two are the handshake of a recovered
    post-copy (QEMU's MIG_CMD_RECV_BITMAP and RESUME_ACK play the part
    there)."""

    POSTCOPY_BEGIN = 0x0110       # empty; the CPU context records follow at once
    POSTCOPY_PFNS_BEGIN = 0x0111  # empty; the cue to set up paging
    POSTCOPY_PFNS = 0x0112        # PAGE_DATA's layout without pages: pfns still to come
    POSTCOPY_TRANSITION = 0x0113  # empty; libxl's records, then the domain runs
    POSTCOPY_PAGE_DATA = 0x0114   # PAGE_DATA's layout: pages of POSTCOPY_PFNS' pfns
    POSTCOPY_FAULT = 0x0115       # count, pfns without type bits: pages wanted now
    POSTCOPY_COMPLETE = 0x0116    # empty; every page is in
    POSTCOPY_RESUME = 0x0117      # the domain's name: go on with its post-copy (recovery)
    POSTCOPY_RECV_BITMAP = 0x0118  # nr_pfns, a bit per pfn: the pages still lacked
    POSTCOPY_REFUSED = 0x0119     # why, in UTF-8: the guest never ran there


# record bodies (xg_sr_stream_format.h), little-endian
X86_PV_INFO = struct.Struct("<BB6x")              # guest_width, pt_levels
P2M_FRAMES_HDR = struct.Struct("<II")              # start_pfn, end_pfn; then u64 pfns
PAGE_DATA_HDR = struct.Struct("<I4x")              # count; then u64 pfn|type, pages
RECV_BITMAP_HDR = struct.Struct("<Q")              # nr_pfns; then a bit per pfn, LSB first
X86_TSC_INFO = struct.Struct("<IIQI4x")            # mode, khz, nsec, incarnation
VCPU_HDR = struct.Struct("<I4x")                   # vcpu_id; then the context
# the context's ctrlreg[1] (the user L4, as a pfn) has bit 0 set when there is
# one, so that pfn 0 still names a table (pvlab's; Xen's 64-bit PV contexts
# keep the user L4 elsewhere)
USER_L4_SET = 1
PAGE_DATA_PFN_MASK = 0x000FFFFFFFFFFFFF
PAGE_DATA_TYPE_SHIFT = 32                          # pfn entry = type << 32 | pfn
MAX_BATCH_SIZE = 1024                              # pfns per PAGE_DATA record
MAX_POSTCOPY_BATCH_SIZE = 64                       # pages per POSTCOPY_PAGE_DATA
MAX_PFN_BATCH_SIZE = (4 << 20) // 8                # pfns per POSTCOPY_PFNS / FAULT
GUEST_WIDTH_X86_64, PT_LEVELS_X86_64 = 8, 4


def rec_name(rtype: int) -> str:
    for kind in (RecType, PostcopyType):
        if rtype in kind._value2member_map_:
            return kind(rtype).name
    return f"{'optional' if rtype & REC_TYPE_OPTIONAL else 'mandatory'} record {rtype:#x}"


class StreamError(Exception):
    """A stream that cannot be read: the message names the record and offset."""


class Truncated(StreamError):
    """The stream ended before the octets its framing promises: a file cut
    short, or a sender gone (a migration's or a checkpointed stream's)."""


@dataclass(frozen=True)
class DomainHeader:
    type: int
    page_shift: int
    xen_major: int
    xen_minor: int


@dataclass(frozen=True)
class Record:
    type: int
    body: bytes    # the whole body, or what a partial reader took of it
    offset: int    # where its header starts in the stream
    length: int    # of the body in the stream

    @property
    def name(self) -> str:
        return rec_name(self.type)


# reads the part of a record's body its caller needs, given (src, length); the
# framer then seeks past the rest (PAGE_DATA's pages, say, when only checking)
PartialReader = Callable[[BinaryIO, int], bytes]


def write_headers(out: BinaryIO, xen_major: int, xen_minor: int) -> None:
    out.write(IHDR.pack(IHDR_MARKER, IHDR_ID, VERSION, 0, 0, 0))
    out.write(DHDR.pack(DHDR_TYPE_X86_PV, 12, 0, xen_major, xen_minor))


def write_record(out: BinaryIO, rtype: int, body: bytes = b"",
                 name: Callable[[int], str] = rec_name) -> None:
    """One record: type, length, body, padding to 8 octets. libxl's stream
    frames its records the same way (``name`` gives its record names)."""
    if len(body) > REC_LENGTH_MAX:
        raise StreamError(f"{name(rtype)}: {len(body)} octets is over the "
                          f"{REC_LENGTH_MAX} limit")
    out.write(RHDR.pack(rtype, len(body)))
    out.write(body)
    out.write(bytes(-len(body) % REC_ALIGN))


class CountingReader:
    """A stream being read, which counts its octets: ``tell`` works on a pipe
    or a socket too (a migration's wire). It never seeks."""

    def __init__(self, src: BinaryIO) -> None:
        self.src = src
        self.offset = 0

    def read(self, n: int) -> bytes:
        parts, want = [], n
        while want > 0:
            data = self.src.read(want)
            if not data:
                break
            parts.append(data)
            want -= len(data)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def tell(self) -> int:
        return self.offset


def read_exact(src: BinaryIO, n: int, what: str, offset: int) -> bytes:
    """``n`` octets of ``what`` at ``offset``, or a refusal saying how many were left."""
    data = src.read(n)
    if len(data) != n:
        raise Truncated(f"truncated at offset {offset}: {what} needs {n} octets, "
                          f"{len(data)} left")
    return data


def read_headers(src: BinaryIO, base: int = 0) -> tuple[int, DomainHeader]:
    """Check the image and domain headers (the stream starting at offset
    ``base`` of its file); returns (version, domain header)."""
    marker, ident, version, options, _, _ = IHDR.unpack(read_exact(src, IHDR.size, "image header",
                                                              base))
    if marker != IHDR_MARKER or ident != IHDR_ID:
        raise StreamError(f"offset {base}: not a Xen migration stream (no 'XENF' image "
                          "header)")
    if version not in READABLE_VERSIONS:
        raise StreamError(f"offset {base + 12}: stream version {version}; this reads "
                          f"versions {READABLE_VERSIONS[0]} to {READABLE_VERSIONS[-1]}")
    if options & IHDR_OPT_BIG_ENDIAN:
        raise StreamError(f"offset {base + 16}: a big-endian stream; only little-endian ones "
                          "are read")
    dtype, shift, _, major, minor = DHDR.unpack(read_exact(src, DHDR.size, "domain header",
                                                      base + IHDR.size))
    if dtype != DHDR_TYPE_X86_PV:
        raise StreamError(f"offset {base + IHDR.size}: domain type {dtype}; only x86 PV (1) "
                          "is read")
    if shift != 12:
        raise StreamError(f"offset {base + IHDR.size + 4}: page shift {shift}; x86 PV "
                          "needs 12")
    return version, DomainHeader(dtype, shift, major, minor)


def read_record(src: BinaryIO, offset: int,
                partial: Mapping[int, PartialReader] | None = None) -> Record:
    """One record at ``offset``, framing checked (read_record in
    xg_sr_common.c). A record whose type is in ``partial`` is read by that
    function, the rest of it skipped (``src`` must then be seekable)."""
    rtype, length = RHDR.unpack(read_exact(src, RHDR.size, "a record header", offset))
    if length > REC_LENGTH_MAX:
        raise StreamError(f"offset {offset}: {rec_name(rtype)} claims {length} octets, "
                          f"over the {REC_LENGTH_MAX} limit")
    padded = length + (-length % REC_ALIGN)
    reader = partial.get(rtype) if partial else None
    if reader is None:
        body = read_exact(src, padded, rec_name(rtype), offset + RHDR.size)[:length]
    else:
        here = src.tell()
        end = src.seek(0, 2)
        if here + padded > end:
            raise Truncated(f"truncated at offset {end}: {rec_name(rtype)} needs "
                              f"{padded} octets, {end - here} left")
        src.seek(here)
        body = reader(src, length)
        src.seek(here + padded)
    return Record(rtype, body, offset, length)


def record_size(rec: Record) -> int:
    """The octets a record takes in the stream, header and padding included."""
    return RHDR.size + rec.length + (-rec.length % REC_ALIGN)


def read_records(src: BinaryIO, start: int = IHDR.size + DHDR.size,
                 partial: Mapping[int, PartialReader] | None = None) -> Iterator[Record]:
    """Every record up to and including END, framing checked (read_record)."""
    offset = start
    while True:
        rec = read_record(src, offset, partial)
        offset += record_size(rec)
        yield rec
        if rec.type == RecType.END:
            return
