"""The block device's model: a raw disk image on the host, its config
space, the features it offers, and what each request does to the image
(Firecracker's block/virtio/device.rs; QEMU's hw/block/virtio-blk.c).

The image is a plain file: sector n is its bytes 512n .. 512n+511, and the
capacity is the file's size in whole sectors. The device opens it when it
is made and closes it in ``close`` (the domain is destroyed). Reads and
writes are ``pread``/``pwrite`` on it; FLUSH is an ``fsync``; a save
flushes too (persist.py).

Requests are served synchronously, inside the driver's QueueNotify: when
the notify returns, every request it made available is complete and in the
used ring. QEMU submits them asynchronously, which is why it must drain
them before a save or a reset (blk_drain); here nothing is ever left in
flight on the host side, and a save finds no half-done request.

Features: VERSION_1, SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, and RO for a
read-only disk. One request queue of 256 entries, or of ``queue_size``
(QEMU's queue-size property: a power of two, 4 to 256); seg_max = 126
(QEMU's before seg-max-adjust), or the queue size less 2 when that is less
(QEMU's seg-max-adjust: a request of seg_max segments fits an empty queue);
size_max = 64 KiB.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import tempfile

from hypervisor.devices.blk.event_handler import (
    QUEUE_SIZE,
    QUEUE_SIZE_MIN,
    SEG_MAX,
    SIZE_MAX,
    BlockEventHandler,
)
from hypervisor.devices.blk.metrics import BlockMetrics
from hypervisor.devices.virtio.mmio import VirtioDevice
from hypervisor.public.io.virtio import VIRTIO_F_VERSION_1
from hypervisor.public.io.virtio_blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_CONFIG,
    VIRTIO_BLK_CONFIG_SIZE,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_ID_BLOCK,
)

log = logging.getLogger(__name__)

_FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


class BlockError(Exception):
    """The disk cannot be used as asked (no such file, resized since the
    save, ...); the message says why and what to do."""


def image_capacity(path: str) -> int:
    """The image's capacity in 512-byte sectors (BlockError: no such file)."""
    try:
        return os.stat(path).st_size // SECTOR_SIZE
    except FileNotFoundError:
        raise BlockError(f"disk image {path!r} does not exist") from None
    except OSError as e:
        raise BlockError(f"disk image {path!r}: {e.strerror}") from None


def check_queue_size(size: int) -> str | None:
    """Why ``size`` cannot be the request queue's size, or None."""
    if not QUEUE_SIZE_MIN <= size <= QUEUE_SIZE or size & (size - 1):
        return (f"queue size {size}: a power of two from {QUEUE_SIZE_MIN} to {QUEUE_SIZE} "
                "(QEMU's queue-size)")
    return None


def default_serial(path: str) -> str:
    """A serial for GET_ID when the configuration gives none: the image's
    name, cut to 20 bytes."""
    return os.path.basename(path)[:VIRTIO_BLK_ID_BYTES]


def lock_image(fd: int, read_only: bool) -> None:
    """An open file description lock on the whole image, shared for a
    read-only disk, exclusive for a writable one (QEMU's raw_apply_lock_bytes,
    simplified): two domains, or two processes, never write one image, nor
    read one another writes. Held until the fd is closed; BlockError if taken."""
    kind = fcntl.F_RDLCK if read_only else fcntl.F_WRLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            what = "a shared" if read_only else "the write"
            raise BlockError(f"failed to get {what} lock: another domain or process uses "
                             "the image") from None
        raise BlockError(f"cannot lock it: {e.strerror}") from None


class Block(BlockEventHandler, VirtioDevice):
    """virtio-blk, the host's side. Its queue notification is handled in
    event_handler.py, its saved state in persist.py."""

    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"

    def __init__(self, path: str, read_only: bool = False, serial: str = "",
                 capacity: int = -1, queue_size: int = QUEUE_SIZE) -> None:
        """Open the image at ``path``; ``capacity`` (sectors) is what a saved
        image expects it to be (-1: whatever it is, a new disk)."""
        if len(serial.encode()) > VIRTIO_BLK_ID_BYTES or not serial.isascii():
            raise BlockError(f"serial {serial!r}: at most {VIRTIO_BLK_ID_BYTES} ASCII bytes")
        if (why := check_queue_size(queue_size)) is not None:
            raise BlockError(why)
        have = image_capacity(path)
        if capacity >= 0 and have != capacity:
            raise BlockError(f"disk image {path!r} has {have} sectors, the saved domain's "
                             f"disk had {capacity}: it was resized or replaced since the "
                             "save; give the restore the image it was saved with")
        if have == 0:
            raise BlockError(f"disk image {path!r} is smaller than one 512-byte sector")
        try:
            self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as e:
            raise BlockError(f"disk image {path!r}: cannot open it "
                             f"{'read-only' if read_only else 'read-write'}: "
                             f"{e.strerror}") from None
        try:
            lock_image(self.fd, read_only)
        except BlockError as e:
            os.close(self.fd)
            raise BlockError(f"disk image {path!r}: {e}") from None
        self.path = path
        self.read_only = read_only
        self.serial = serial or default_serial(path)
        self.capacity = have
        self.queue_size = queue_size
        self.seg_max = min(SEG_MAX, queue_size - 2)  # QEMU's seg-max-adjust
        self.metrics = BlockMetrics()

    # --- what the transport asks --------------------------------------------------

    def features(self) -> int:
        return (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_SIZE_MAX
                | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
                | 1 << VIRTIO_BLK_F_FLUSH | int(self.read_only) << VIRTIO_BLK_F_RO)

    def queue_sizes(self) -> list[int]:
        return [self.queue_size]

    def config_bytes(self) -> bytes:
        """capacity, size_max, seg_max, no geometry, blk_size 512."""
        return VIRTIO_BLK_CONFIG.pack(self.capacity, SIZE_MAX, self.seg_max, 0, 0, 0,
                                      SECTOR_SIZE)

    def config_read(self, offset: int, size: int) -> int:
        if offset + size > VIRTIO_BLK_CONFIG_SIZE:
            self.transport.bad_access(f"blk config read at {offset:#x}, beyond its "
                                      f"{VIRTIO_BLK_CONFIG_SIZE} bytes")
            return 0
        return int.from_bytes(self.config_bytes()[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        # writeback (CONFIG_WCE) is not offered: the whole config is read-only
        self.transport.bad_access(f"blk config write at {offset:#x}: the config is read-only")

    # --- the image ------------------------------------------------------------------

    def flush(self) -> None:
        """The image's writes to stable storage (FLUSH, and a save)."""
        if not self.read_only:
            os.fsync(self.fd)

    def private_copy(self) -> None:
        """Go on with a copy of the disk as it is now, of this process's own:
        the explorer's runs, forked from one, each write their own disk, and
        the image file keeps what it had (``path`` still names it)."""
        fd, tmp = tempfile.mkstemp(prefix="pvlab-disk-")
        os.unlink(tmp)  # gone when closed
        pos, size = 0, os.fstat(self.fd).st_size
        while pos < size:
            chunk = os.pread(self.fd, min(1 << 20, size - pos), pos)
            os.pwrite(fd, chunk, pos)
            pos += len(chunk)
        os.close(self.fd)
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
