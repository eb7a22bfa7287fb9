"""Page digests checked when the pages are first read: what lets a lazy
restore start without reading the whole image.

A saved file holds, after libxl's END, a digest of each PAGE_DATA record's
pages and one of every other octet (savefile.DigestWriter writes them; the
xl header's XL_BATCHES says where they are and holds the trailer's own
digest). The image check then reads the trailer and the structure up front,
as it reads them anyway, and leaves the pages: a batch is hashed whole the
first time any of its pages is read (by the check's reads of pagetables and
the p2m, by the restore, by the pager), and compared with its digest. A
batch that does not match is refused before the guest exists, and ends the
guest after (its memory can no longer be trusted), as Cloud Hypervisor's
strict on-demand restore does with a changed file.

The unit is the PAGE_DATA record (up to 1024 pages, 4 MiB): 32 octets a
batch keep the trailer small (8 KiB a GiB), and the pager reads a 2 MiB
chunk at a time, within one or two batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from hypervisor.toolstack import savefile
from hypervisor.toolstack.stream import StreamError

# the octets [offset, offset + length) of the image
ReadRange = Callable[[int, int], bytes | memoryview]


class DigestMismatch(StreamError):
    """A batch's pages are not the ones the save wrote."""


class PageDigests:
    """The digest of each PAGE_DATA record's pages, and which of them have
    been checked. ``records``: each record's offset (for the message),
    ``starts`` and ``sizes``: its pages' offset and length in the file."""

    def __init__(self, trailer: bytes, records: np.ndarray, starts: np.ndarray,
                 sizes: np.ndarray) -> None:
        n = records.size
        self.digests = [trailer[i * savefile.DIGEST_SIZE:(i + 1) * savefile.DIGEST_SIZE]
                        for i in range(n)]
        self.records = records
        self.starts = starts
        self.sizes = sizes
        self.checked = np.zeros(n, dtype=bool)
        self.hashed = 0  # octets hashed so far, for the bench

    def batches_of(self, offsets: np.ndarray) -> np.ndarray:
        """The batches that hold the pages at these file offsets."""
        return np.unique(np.searchsorted(self.starts, offsets, side="right") - 1)

    def check(self, offsets: np.ndarray, read: ReadRange) -> None:
        """Check each batch holding one of these pages that is not checked
        yet; raises DigestMismatch naming the first that does not match."""
        todo = self.batches_of(np.asarray(offsets, dtype=np.int64))
        for i in todo[~self.checked[todo]].tolist():
            data = read(int(self.starts[i]), int(self.sizes[i]))
            self.hashed += len(data)
            if hashlib.new(savefile.DIGEST_ALGORITHM, data).digest() != self.digests[i]:
                raise DigestMismatch(f"PAGE_DATA record at offset {int(self.records[i])}: "
                                     "its pages do not match their digest: the image was "
                                     "changed after it was written")
            self.checked[i] = True

    def all_checked(self) -> bool:
        return bool(self.checked.all())


def check_trailer(xl: savefile.XlHeader, trailer: bytes) -> None:
    """The trailer must be the one XL_BATCHES holds the digest of."""
    assert xl.batches is not None
    if hashlib.new(savefile.DIGEST_ALGORITHM, trailer).digest() != xl.batches.digest:
        raise DigestMismatch(f"offset {xl.batches.trailer}: the per-batch digests do not "
                             "match XL_BATCHES' digest of them: the image was changed after "
                             "it was written")


def check_structure(xl: savefile.XlHeader, trailer: bytes, read: ReadRange,
                    pages: list[tuple[int, int]]) -> None:
    """Every octet but the pages, against the trailer's last digest."""
    assert xl.batches is not None
    end = xl.batches.trailer
    if savefile.structure_digest(read, end, pages, xl.zeroed()) != trailer[-savefile.DIGEST_SIZE:]:
        raise DigestMismatch(f"offsets 0-{end}: the records do not match their digest: the "
                             "image was changed after it was written")
