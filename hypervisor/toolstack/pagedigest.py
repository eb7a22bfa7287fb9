"""Page digests checked when the pages are first read: what lets a lazy
restore start without reading the whole image.

A saved file holds, after libxl's END, a digest of each block of a PAGE_DATA
record's pages (savefile.DIGEST_BLOCK: 64 pages) and one of every other
octet (savefile.DigestWriter writes them; the xl header's XL_PAGE_DIGESTS
says where they are and holds the trailer's own digest, which is also the
image's digest: the root of the tree). The lazy image check reads the
trailer and the structure up front, as it reads them anyway, and leaves the
pages: a block is hashed whole the first time any of its pages is read (by
the check's reads of pagetables and the p2m, by the restore, by the pager),
and compared with its digest. The pages are then served from the octets
hashed, never read from the file again: a reader keeps a checked block's
octets until it has taken from them every page it will want (``pages``,
``release``). A block that does not match is refused before the guest
exists, and ends the guest after (its memory can no longer be trusted).

Why blocks of 64 pages: a whole record (1024 pages, 4 MiB) made the restore
hash 8 MiB to read the 1000-odd pages of pagetables and p2m at the start of
a 1 GiB guest's memory, and each fault of the guest up to 4 MiB; a digest a
page would make the trailer 8 MiB a GiB, itself to be hashed first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from hypervisor.public.xen import PAGE_SIZE
from hypervisor.toolstack import savefile
from hypervisor.toolstack.stream import StreamError

# the octets [offset, offset + length) of the image
ReadRange = Callable[[int, int], bytes]


class DigestMismatch(StreamError):
    """A block of pages is not the one the save wrote."""


class PageDigests:
    """The digest of each block of pages, which of them have been checked,
    and the octets of those checked and not yet let go. ``records``: the
    offset of each block's PAGE_DATA record (for the message), ``starts``
    and ``sizes``: the block's offset and length."""

    def __init__(self, trailer: bytes, records: np.ndarray, starts: np.ndarray,
                 sizes: np.ndarray) -> None:
        self.trailer = trailer
        self.records = records
        self.starts = starts
        self.sizes = sizes
        self.checked = np.zeros(records.size, dtype=bool)
        self.kept: dict[int, bytes] = {}  # block -> its octets as hashed

    def block_of(self, offsets: np.ndarray) -> np.ndarray:
        """The block that holds the page at each of these file offsets."""
        return np.searchsorted(self.starts, offsets, side="right") - 1

    def check(self, offsets: np.ndarray, read: ReadRange) -> None:
        """Read and check each block holding one of these pages that is not
        checked yet, keeping its octets; raises DigestMismatch naming the
        first that does not match."""
        todo = np.unique(self.block_of(np.asarray(offsets, dtype=np.int64)))
        for i in todo[~self.checked[todo]].tolist():
            data = read(int(self.starts[i]), int(self.sizes[i]))
            if not savefile.block_matches(data, self.trailer, i):
                start = int(self.starts[i])
                raise DigestMismatch(f"PAGE_DATA record at offset {int(self.records[i])}: "
                                     f"its pages at offsets {start}-{start + len(data)} do "
                                     "not match their digest: the image was changed after "
                                     "it was written")
            self.checked[i] = True
            self.kept[i] = data

    def pages(self, offsets: np.ndarray, read: ReadRange) -> np.ndarray:
        """The pages at these file offsets, as rows of 512 u64, from the
        octets their blocks were checked with (checked now if not yet). A
        block checked and let go is not read again: asking for it is a bug."""
        offsets = np.asarray(offsets, dtype=np.int64)
        self.check(offsets, read)
        out = np.empty((offsets.size, PAGE_SIZE // 8), dtype=np.uint64)
        for k, (i, at) in enumerate(zip(self.block_of(offsets).tolist(), offsets.tolist(),
                                        strict=True)):
            data = self.kept.get(i)
            assert data is not None, f"block {i} wanted again after it was let go"
            out[k] = np.frombuffer(data, dtype=np.uint64, count=PAGE_SIZE // 8,
                                   offset=at - int(self.starts[i]))
        return out

    def release(self) -> dict[int, bytes]:
        """The kept blocks' octets, let go of here: the caller takes from
        them every page it will ever want."""
        kept, self.kept = self.kept, {}
        return kept


def check_trailer(xl: savefile.XlHeader, trailer: bytes) -> None:
    """The trailer must be the one XL_PAGE_DIGESTS holds the digest of (and,
    in a hash tree, the image's digest: the same value)."""
    assert xl.page_digests is not None
    root = hashlib.new(savefile.DIGEST_ALGORITHM, trailer).digest()
    if root != xl.page_digests.digest or (xl.tree and root != xl.digest):
        raise DigestMismatch(f"offset {xl.page_digests.trailer}: the page digests do not "
                             "match XL_PAGE_DIGESTS' digest of them: the image was changed after "
                             "it was written")


def check_structure(xl: savefile.XlHeader, trailer: bytes, read: ReadRange,
                    pages: list[tuple[int, int]]) -> None:
    """Every octet but the pages, against the trailer's last digest."""
    assert xl.page_digests is not None
    end = xl.page_digests.trailer
    if savefile.structure_digest(read, end, pages, xl.zeroed()) != trailer[-savefile.DIGEST_SIZE:]:
        raise DigestMismatch(f"offsets 0-{end}: the records do not match their digest: the "
                             "image was changed after it was written")
