"""The outer layers of a saved image, as ``xl save`` writes them:

    xl header      tools/xl/xl.h's save_file_header: the magic line, the byte
                   order, mandatory and optional flags, the optional data's
                   length; the optional data is u32 config length, then the
                   domain's configuration as NUL-terminated JSON, then
                   pvlab's integrity digest (below)
    libxl stream   16 octets, big-endian: "LibxlFmt", version 2, options
                   (libxl_sr_stream_format.h); then records framed as the
                   libxc ones are (u32 type, u32 length, body, zero padding
                   to 8 octets), up to END

LIBXC_CONTEXT has no body: the libxc stream (stream.py) follows it inline,
up to its own END, and the libxl records go on after it. The emulator
records start with an emulator header (u32 id, u32 index). This module
only frames; what the records hold is the save and restore code's business.

Xen's streams carry no checksum over page data: a flipped octet in a data
page restores silently. pvlab's digests sit where Xen's readers never look:
the image's digest in the optional data after the config (xl and Xen's
verifier skip what they do not know), and a trailer after libxl's END (they
stop at END). The save hashes every octet once, as it writes it
(DigestWriter), into one of two kinds of digest: each block of a PAGE_DATA
record's pages (DIGEST_BLOCK: 64 pages) has its own, and every other octet
(the structure: headers, records, pfn lists, contexts) goes into one. The
trailer holds the block digests in stream order, then the structure's; the
image's digest is the digest of the trailer: the root of a two-level hash
tree ("sha256-tree"), also kept in XL_PAGE_DIGESTS beside where the trailer
is. The values filled in last (the root, XL_PAGE_DIGESTS' values) are read as
zeros by the structure's digest. So a check that reads every octet
(check_digest: the eager restore, ``pvlab image check``) hashes each once and
says which blocks differ, and a lazy restore checks the structure up front
and each block when it is first read (pagedigest.py).

An older pvlab's image ("sha256") has a digest of the whole file instead,
its own octets and XL_PAGE_DIGESTS' values read as zeros, and may have the
same trailer; it is still read (check_digest checks both).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from hypervisor.toolstack.stream import (
    DHDR,
    IHDR,
    PAGE_DATA_HDR,
    REC_ALIGN,
    REC_LENGTH_MAX,
    RHDR,
    RecType,
    StreamError,
    read_exact,
    read_record,
    write_record,
)

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_HDR = struct.Struct("<32sIIII")  # magic, byteorder, mandatory, optional flags, optdata len
XL_BYTEORDER = 0x01020304           # SAVEFILE_BYTEORDER_VALUE, in the saver's order
XL_MANDATORY_FLAG_JSON = 1 << 0     # the config is JSON (libxl_domain_config)
XL_MANDATORY_FLAG_STREAMV2 = 1 << 1  # a libxl stream follows, not a bare libxc one
XL_MANDATORY_FLAG_ALL = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2
XL_CONFIG_LEN = struct.Struct("<I")  # the first item of the optional data
XL_OPTDATA_MAX = 16 << 20

# pvlab's part of the config ("pvlab" in the JSON): 1 was a bare libxc
# stream with pvlab's own records, 2 had no integrity digest; this pvlab
# reads neither
PVLAB_IMAGE_VERSION = 3
# the digest after the config: its name NUL-padded, its value; SHA-256
# because hashlib's is the fastest of its strong digests here
# (bench/saverestore.py prints what it costs). "sha256-tree": the digest of
# the trailer, whose digests cover every octet once (a new image);
# "sha256": of the whole file (an older pvlab's)
XL_DIGEST = struct.Struct("<16s32s")
DIGEST_ALGORITHM = "sha256"
TREE_DIGEST_NAME = "sha256-tree"
DIGEST_CHUNK = 1 << 20
# after the digest: where the trailer of page digests is and its own digest
# (the algorithm's name NUL-padded, trailer offset, digests, digest)
XL_PAGE_DIGESTS = struct.Struct("<16sQQ32s")
PAGE_DIGESTS_NAME = b"sha256-pages"
PAGE_DIGESTS_VALUE = XL_PAGE_DIGESTS.size - 16  # the octets filled in last
# a digest covers at most this much of a PAGE_DATA record's pages (64 pages):
# a read checks no more than it needs (a pagetable, a 2 MiB chunk) while the
# trailer stays small (128 KiB a GiB)
DIGEST_BLOCK = 64 << 12
DIGEST_SIZE = 32
# the config's pvlab.kind of a checkpointed stream (Remus's): written on the
# wire, it has no digest, and a file of it is read without one
CHECKPOINTED_KIND = "checkpointed stream"
DEVICE_CONFIG_KEYS = ("bus", "kind", "base", "port")  # a device's place, in the config

LIBXL_HDR = struct.Struct(">QII")   # ident, version, options
LIBXL_IDENT = 0x4C6962786C466D74    # "LibxlFmt"
LIBXL_VERSION = 2
LIBXL_OPT_BIG_ENDIAN = 1 << 0
LIBXL_OPT_LEGACY = 1 << 1           # converted from a legacy stream
EMULATOR_HDR = struct.Struct("<II")  # emulator id, index


class LibxlRecType(enum.IntEnum):
    END = 0x00
    LIBXC_CONTEXT = 0x01
    EMULATOR_XENSTORE_DATA = 0x02
    EMULATOR_CONTEXT = 0x03
    CHECKPOINT_END = 0x04
    CHECKPOINT_STATE = 0x05
    # Otto's post-copy RFC (libxl_sr_stream_format.h there): the end of the
    # records libxl writes inside the libxc stream at its POSTCOPY_TRANSITION
    POSTCOPY_TRANSITION_END = 0x06


class EmulatorId(enum.IntEnum):
    UNKNOWN = 0          # pvlab's device models: neither of QEMU's
    QEMU_TRADITIONAL = 1
    QEMU_UPSTREAM = 2


def libxl_rec_name(rtype: int) -> str:
    try:
        return LibxlRecType(rtype).name
    except ValueError:
        return f"libxl record {rtype:#x}"


@dataclass(frozen=True)
class XlHeader:
    mandatory_flags: int
    optional_flags: int
    config: bytes        # the JSON, without its NUL
    end: int             # offset of the libxl stream
    digest: bytes | None = None  # pvlab's integrity digest, if there is one
    digest_offset: int = 0       # where its value is in the file
    page_digests: PageDigestIndex | None = None  # where the page digests are, if anywhere
    tree: bool = False           # the digest is the trailer's (not the whole file's)

    def zeroed(self) -> list[tuple[int, int]]:
        """The (offset, length) ranges the digests read as zeros: the values
        filled in after the octets were hashed."""
        out = [(self.digest_offset, DIGEST_SIZE)] if self.digest is not None else []
        if self.page_digests is not None:
            out.append((self.page_digests.value_offset, PAGE_DIGESTS_VALUE))
        return out


@dataclass(frozen=True)
class PageDigestIndex:
    """XL_PAGE_DIGESTS: the trailer of digests after libxl's END (one per
    block of a PAGE_DATA record's pages in stream order, then the
    structure's digest)."""

    trailer: int       # offset of the trailer
    count: int         # page digests in it
    digest: bytes      # of the trailer
    value_offset: int  # where the XL_PAGE_DIGESTS values are in the file

    @property
    def trailer_size(self) -> int:
        return DIGEST_SIZE * (self.count + 1)


@dataclass(frozen=True)
class LibxlRecord:
    type: int
    body: bytes
    offset: int
    length: int

    @property
    def name(self) -> str:
        return libxl_rec_name(self.type)


def write_xl_header(out: BinaryIO, config: bytes, digest: bool = True) -> int:
    """save_domain_core_writeconfig: the header, then the config's length and
    the config itself, NUL-terminated as xl writes it, then room for pvlab's
    digest and for XL_PAGE_DIGESTS (right after the digest's value). The optional
    data is padded to 8 octets (a reader skips what follows the config) so
    that every record and page of the streams after it is 8-aligned in the
    file. Returns where the digest's value goes.
    A stream on the wire (a migration) has no digest (``digest`` False): it
    cannot be filled in afterwards, and the transport guards the octets.
    The digest's name is the tree's, unless ``out`` is a DigestWriter kept
    to the whole-file rule."""
    config = config + b"\0"
    flags = XL_MANDATORY_FLAG_STREAMV2 | XL_MANDATORY_FLAG_JSON
    optdata = XL_CONFIG_LEN.pack(len(config)) + config
    digest_offset = out.tell() + XL_HDR.size + len(optdata) + XL_DIGEST.size - 32
    if digest:
        name = DIGEST_ALGORITHM if getattr(out, "whole", False) else TREE_DIGEST_NAME
        optdata += XL_DIGEST.pack(name.encode(), bytes(32))
        optdata += XL_PAGE_DIGESTS.pack(PAGE_DIGESTS_NAME, 0, 0, bytes(32))
    optdata += bytes(-len(optdata) % REC_ALIGN)
    out.write(XL_HDR.pack(XL_MAGIC, XL_BYTEORDER, flags, 0, len(optdata)))
    out.write(optdata)
    return digest_offset


class CountingWriter:
    """A stream being written, which counts its octets: ``tell`` works on a
    pipe or a socket too (a migration's wire)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.written = 0

    def write(self, data: bytes) -> int:
        n = self.out.write(data)
        self.written += len(data)
        return n

    def write_pages(self, data: bytes) -> int:
        """A PAGE_DATA record's pages (a digested file keeps their digest)."""
        return self.write(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        self.out.flush()


class DigestWriter(CountingWriter):
    """A file being saved, hashed as it is written, each octet once: the
    digest costs no second pass over the image. Each block of a PAGE_DATA
    record's pages (``write_pages``) gets a digest of its own, every other
    octet goes into the structure's. ``finish`` writes the trailer of those,
    and its digest (the image's) into its places. ``whole``: the older
    rule, a digest of the whole file besides (every page hashed twice),
    kept for the bench's comparison and for tests of older images."""

    def __init__(self, out: BinaryIO, whole: bool = False) -> None:
        super().__init__(out)
        self.written = out.tell()
        self.whole = whole
        self.hash = hashlib.new(DIGEST_ALGORITHM) if whole else None
        self.structure = hashlib.new(DIGEST_ALGORITHM)
        self.blocks: list[bytes] = []
        self.seconds = 0.0  # spent hashing, for the bench

    def write(self, data: bytes) -> int:
        t = time.perf_counter()
        if self.hash is not None:
            self.hash.update(data)
        self.structure.update(data)
        self.seconds += time.perf_counter() - t
        return CountingWriter.write(self, data)

    def write_pages(self, data: bytes) -> int:
        t = time.perf_counter()
        if self.hash is not None:
            self.hash.update(data)
        view = memoryview(data)
        self.blocks += [hashlib.new(DIGEST_ALGORITHM, view[o:o + n]).digest()
                         for o, n in digest_blocks([(0, len(data))])]
        self.seconds += time.perf_counter() - t
        return CountingWriter.write(self, data)

    def finish(self, digest_offset: int) -> None:
        """After libxl's END: the trailer, then XL_PAGE_DIGESTS' values and the
        image's digest in the header (the zeros they replace were hashed)."""
        trailer_at = self.out.tell()
        trailer = b"".join(self.blocks) + self.structure.digest()
        root = hashlib.new(DIGEST_ALGORITHM, trailer).digest()
        CountingWriter.write(self, trailer)
        end = self.out.tell()
        self.out.seek(digest_offset + DIGEST_SIZE + 16)
        self.out.write(XL_PAGE_DIGESTS.pack(PAGE_DIGESTS_NAME, trailer_at, len(self.blocks),
                                            root)[16:])
        self.out.seek(digest_offset)
        if self.hash is not None:
            self.hash.update(trailer)
            root = self.hash.digest()
        self.out.write(root)
        self.out.seek(end)


def seal(image: bytearray) -> None:
    """Write the digests of an image held in memory into it, by the rule its
    header names: what a tool that rewrites an image on purpose (a stream
    converter, a test, even into a bad image) must do last. An image with
    page digests gets its trailer anew after libxl's END, each PAGE_DATA
    record found by the framing alone (page_ranges)."""
    xl = read_xl_header(io.BytesIO(image))
    if xl.digest is None:
        raise StreamError("no room for an integrity digest in the xl header")
    for at, n in xl.zeroed():
        image[at:at + n] = bytes(n)
    b = xl.page_digests
    value = b""
    if b is not None:
        pages, end = page_ranges(io.BytesIO(image), xl)
        del image[end:]
        trailer = b"".join(hashlib.new(DIGEST_ALGORITHM, image[o:o + n]).digest()
                           for o, n in digest_blocks(pages))
        trailer += structure_digest(lambda o, n: image[o:o + n], end, pages)
        image += trailer
        value = XL_PAGE_DIGESTS.pack(PAGE_DIGESTS_NAME, end, len(trailer) // DIGEST_SIZE - 1,
                                     hashlib.new(DIGEST_ALGORITHM, trailer).digest())[16:]
    elif xl.tree:
        raise StreamError("a hash tree's digest with no page digests to be its leaves")
    root = value[-DIGEST_SIZE:] if xl.tree else hashlib.new(DIGEST_ALGORITHM, image).digest()
    if b is not None:
        image[b.value_offset:b.value_offset + PAGE_DIGESTS_VALUE] = value
    image[xl.digest_offset:xl.digest_offset + DIGEST_SIZE] = root


def page_ranges(src: BinaryIO, xl: XlHeader) -> tuple[list[tuple[int, int]], int]:
    """Each PAGE_DATA record's pages as (offset, length), in stream order,
    found by the records' framing alone (libxl's records after a CHECKPOINT
    included), and where libxl's END ends: what the page digests cover."""
    src.seek(xl.end)
    read_libxl_header(src, xl.end)
    pages: list[tuple[int, int]] = []
    while (rec := read_libxl_record(src)).type != LibxlRecType.END:
        if rec.type == LibxlRecType.LIBXC_CONTEXT:
            pages += _libxc_pages(src)
    return pages, src.tell()


def _libxc_pages(src: BinaryIO) -> list[tuple[int, int]]:
    """page_ranges' part in the libxc stream, from ``src``'s position to its END."""
    src.seek(IHDR.size + DHDR.size, io.SEEK_CUR)
    out = []
    while (rec := read_record(src, src.tell(), {RecType.PAGE_DATA: _pfn_count})
           ).type != RecType.END:
        if rec.type == RecType.PAGE_DATA:
            (count,) = PAGE_DATA_HDR.unpack_from(rec.body.ljust(PAGE_DATA_HDR.size, b"\0"))
            head = PAGE_DATA_HDR.size + 8 * count
            out.append((rec.offset + RHDR.size + head, max(rec.length - head, 0)))
        if rec.type == RecType.CHECKPOINT:
            while read_libxl_record(src).type != LibxlRecType.CHECKPOINT_END:
                pass
    return out


def _pfn_count(src: BinaryIO, length: int) -> bytes:
    return src.read(min(length, PAGE_DATA_HDR.size))


def digest_blocks(pages: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """What each page digest covers, in order: each PAGE_DATA record's
    pages, given as (offset, length), cut in DIGEST_BLOCK pieces (a record
    with no pages has one empty piece)."""
    return [(o + at, min(DIGEST_BLOCK, n - at)) for o, n in pages
            for at in range(0, max(n, 1), DIGEST_BLOCK)]


def structure_digest(read: Callable[[int, int], bytes | bytearray | memoryview], end: int,
                     pages: list[tuple[int, int]],
                     zeroed: list[tuple[int, int]] | None = None) -> bytes:
    """The digest of every octet before ``end`` but the pages (``read(offset,
    length)`` gives them), the ``zeroed`` ranges (inside the xl header,
    before any page) read as zeros."""
    h = hashlib.new(DIGEST_ALGORITHM)
    pos = 0
    for offset, n in [*pages, (end, 0)]:
        piece = read(pos, offset - pos)
        if pos == 0 and zeroed:
            piece = bytearray(piece)
            for at, k in zeroed:
                piece[at:at + k] = bytes(k)
        h.update(piece)
        pos = offset + n
    return h.digest()


def check_digest(src: BinaryIO, xl: XlHeader, required: bool,
                 pages: list[tuple[int, int]] | None = None) -> None:
    """Every octet of the file against the image's digests, each hashed
    once: for a hash tree (a new image) the trailer against the root, the
    structure and every block of pages against the trailer; for an older
    image, the whole file (its digest's own octets as zeros) and then the
    blocks, if it has page digests. ``pages``: each PAGE_DATA record's
    pages, if the caller knows them (else found by the framing). A block
    that differs is named by its offsets; the whole file's digest cannot say
    where the change is."""
    if xl.digest is None:
        if required:
            raise StreamError("no integrity digest in the xl header's optional data: an "
                              "image from an older pvlab, which this pvlab does not read")
        return
    if not xl.tree:
        _check_whole(src, xl)
    if xl.page_digests is None:
        if xl.tree:
            raise StreamError("a hash tree's digest with no page digests to be its leaves")
        return
    trailer = read_trailer(src, xl)
    if xl.tree and hashlib.new(DIGEST_ALGORITHM, trailer).digest() != xl.digest:
        raise StreamError(f"offset {xl.page_digests.trailer}: the integrity digest does not "
                          "match the page digests there: the image was changed after it was "
                          "written")
    if pages is None:
        pages = page_ranges(src, xl)[0]
    blocks = digest_blocks(pages)
    if len(blocks) != xl.page_digests.count:
        raise StreamError(f"offset {xl.page_digests.trailer}: {xl.page_digests.count} page "
                          f"digests for {len(blocks)} blocks of pages")
    if xl.tree:
        read = _reader(src)
        if structure_digest(read, xl.page_digests.trailer, pages, xl.zeroed()) \
                != trailer[-DIGEST_SIZE:]:
            raise StreamError(f"offsets 0-{xl.page_digests.trailer}, but the pages: the "
                              "integrity digest does not match: the image was changed after "
                              "it was written")
    check_blocks(src, pages, trailer)


def read_trailer(src: BinaryIO, xl: XlHeader) -> bytes:
    """The trailer XL_PAGE_DIGESTS announces, which must end the file."""
    b = xl.page_digests
    assert b is not None
    src.seek(b.trailer)
    trailer = src.read(b.trailer_size + 1)
    if len(trailer) != b.trailer_size:
        raise StreamError(f"offset {b.trailer}: the page digests are not the "
                          f"{b.trailer_size} octets XL_PAGE_DIGESTS announces there, to the "
                          "end of the file")
    return trailer


def block_matches(data: bytes | memoryview, trailer: bytes, i: int) -> bool:
    """Whether block ``i``'s octets match its digest in the trailer."""
    return hashlib.new(DIGEST_ALGORITHM, data).digest() == \
        trailer[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]


def check_blocks(src: BinaryIO, pages: list[tuple[int, int]], trailer: bytes) -> None:
    """Every block of pages against its digest in the trailer."""
    for i, (offset, n) in enumerate(digest_blocks(pages)):
        src.seek(offset)
        if not block_matches(src.read(n), trailer, i):
            raise StreamError(f"offsets {offset}-{offset + n}, pages of a PAGE_DATA record: "
                              "the integrity digest does not match: the image was changed "
                              "after it was written")


def _reader(src: BinaryIO) -> Callable[[int, int], bytes]:
    def read(offset: int, length: int) -> bytes:
        src.seek(offset)
        return read_exact(src, length, "the image", offset)
    return read


def _check_whole(src: BinaryIO, xl: XlHeader) -> None:
    """An older image's digest: the whole file, the zeroed ranges as zeros."""
    h = hashlib.new(DIGEST_ALGORITHM)
    src.seek(0)
    pos = 0
    zeroed = xl.zeroed()
    while chunk := src.read(DIGEST_CHUNK):
        for at, n in zeroed:
            lo, hi = at - pos, at + n - pos
            if lo < len(chunk) and hi > 0:
                chunk = bytearray(chunk)
                chunk[max(lo, 0):min(hi, len(chunk))] = bytes(min(hi, len(chunk)) - max(lo, 0))
        h.update(chunk)
        pos += len(chunk)
    if h.digest() != xl.digest:
        raise StreamError(f"offsets 0-{pos}: the integrity digest does not match: the image "
                          "was changed after it was written")


def write_libxl_header(out: BinaryIO) -> None:
    out.write(LIBXL_HDR.pack(LIBXL_IDENT, LIBXL_VERSION, 0))


def write_libxl_record(out: BinaryIO, rtype: int, body: bytes = b"") -> None:
    write_record(out, rtype, body, libxl_rec_name)


def emulator_record(index: int, data: bytes) -> bytes:
    """An EMULATOR_* record's body: the emulator header, then its data."""
    return EMULATOR_HDR.pack(EmulatorId.UNKNOWN, index) + data


def read_xl_header(src: BinaryIO) -> XlHeader:
    """The xl header and its config (xl's restore_domain checks)."""
    magic, order, mflags, oflags, optlen = XL_HDR.unpack(read_exact(src, XL_HDR.size,
                                                               "the xl header", 0))
    if magic != XL_MAGIC:
        raise StreamError("offset 0: not an xl save file (no 'Xen saved domain, xl format' "
                          "line)")
    if order != XL_BYTEORDER:
        raise StreamError(f"offset 32: byte order mark {order:#010x}: only a little-endian "
                          "saver's file is read")
    if mflags & ~XL_MANDATORY_FLAG_ALL:
        raise StreamError(f"offset 36: unknown mandatory flags {mflags:#x}")
    if not mflags & XL_MANDATORY_FLAG_STREAMV2:
        raise StreamError("offset 36: a legacy xl save file (no stream v2 flag); only "
                          "libxl streams are read")
    if oflags:
        raise StreamError(f"offset 40: unknown optional flags {oflags:#x}")
    if optlen > XL_OPTDATA_MAX:
        raise StreamError(f"offset 44: {optlen} octets of optional data, over the "
                          f"{XL_OPTDATA_MAX} limit")
    optdata = read_exact(src, optlen, "the xl header's optional data", XL_HDR.size)
    config = _config(optdata, mflags)
    digest, at, tree = _digest(optdata)
    pages = _page_digests(optdata, at + DIGEST_SIZE) if digest is not None else None
    if pages is not None:
        pages = dataclasses.replace(pages, value_offset=XL_HDR.size + pages.value_offset)
    return XlHeader(mflags, oflags, config, XL_HDR.size + optlen, digest, XL_HDR.size + at,
                    pages, tree)


def _digest(optdata: bytes) -> tuple[bytes | None, int, bool]:
    """pvlab's digest after the config, if there is one, where its value
    starts in the optional data, and whether it is a hash tree's root."""
    if len(optdata) < XL_CONFIG_LEN.size:
        return None, 0, False
    at = XL_CONFIG_LEN.size + XL_CONFIG_LEN.unpack_from(optdata)[0]
    if len(optdata) - at < XL_DIGEST.size:
        return None, 0, False
    name, value = XL_DIGEST.unpack_from(optdata, at)
    name = name.rstrip(b"\0")
    if name not in (DIGEST_ALGORITHM.encode(), TREE_DIGEST_NAME.encode()):
        return None, 0, False
    return value, at + XL_DIGEST.size - len(value), name == TREE_DIGEST_NAME.encode()


def _page_digests(optdata: bytes, at: int) -> PageDigestIndex | None:
    """XL_PAGE_DIGESTS right after the digest's value, if it is there (an image
    written before per-batch digests has padding or nothing)."""
    if len(optdata) - at < XL_PAGE_DIGESTS.size:
        return None
    name, trailer, count, digest = XL_PAGE_DIGESTS.unpack_from(optdata, at)
    if name.rstrip(b"\0") != PAGE_DIGESTS_NAME:
        return None
    return PageDigestIndex(trailer, count, digest, at + 16)


def _config(optdata: bytes, mflags: int) -> bytes:
    """The config from the optional data; what follows it is for others."""
    if len(optdata) < XL_CONFIG_LEN.size:
        return b""
    (n,) = XL_CONFIG_LEN.unpack_from(optdata)
    config = optdata[XL_CONFIG_LEN.size:XL_CONFIG_LEN.size + n]
    if len(config) != n:
        raise StreamError(f"offset {XL_HDR.size}: a config of {n} octets in "
                          f"{len(optdata) - XL_CONFIG_LEN.size} of optional data")
    if n and not mflags & XL_MANDATORY_FLAG_JSON:
        raise StreamError("offset 36: a config that is not JSON (no JSON flag)")
    return config.rstrip(b"\0")


def read_libxl_header(src: BinaryIO, offset: int) -> None:
    ident, version, options = LIBXL_HDR.unpack(read_exact(src, LIBXL_HDR.size,
                                                      "the libxl header", offset))
    if ident != LIBXL_IDENT:
        raise StreamError(f"offset {offset}: no libxl stream ('LibxlFmt') after the xl header")
    if version != LIBXL_VERSION:
        raise StreamError(f"offset {offset + 8}: libxl stream version {version}; this reads "
                          f"version {LIBXL_VERSION}")
    if options & LIBXL_OPT_BIG_ENDIAN:
        raise StreamError(f"offset {offset + 12}: a big-endian libxl stream; only "
                          "little-endian ones are read")


def read_libxl_record(src: BinaryIO) -> LibxlRecord:
    """One libxl record at ``src``'s position, framing and type checked."""
    offset = src.tell()
    rtype, length = RHDR.unpack(read_exact(src, RHDR.size, "a libxl record header", offset))
    if rtype not in LibxlRecType._value2member_map_:
        raise StreamError(f"offset {offset}: {libxl_rec_name(rtype)}: a libxl record "
                          "type this reader does not know")
    if length > REC_LENGTH_MAX:
        raise StreamError(f"offset {offset}: {libxl_rec_name(rtype)} claims {length} "
                          f"octets, over the {REC_LENGTH_MAX} limit")
    padded = length + (-length % REC_ALIGN)
    body = read_exact(src, padded, libxl_rec_name(rtype), offset + RHDR.size)[:length]
    return LibxlRecord(rtype, body, offset, length)


def read_libxl_records(src: BinaryIO) -> Iterator[LibxlRecord]:
    """Every libxl record up to and including END. After LIBXC_CONTEXT the
    caller reads the libxc stream from ``src`` before asking for the next."""
    while True:
        rec = read_libxl_record(src)
        yield rec
        if rec.type == LibxlRecType.END:
            return
