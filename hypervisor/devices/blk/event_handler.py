"""The block device's queue notification: each request taken, checked and
served against the image (QEMU's virtio_blk_handle_request, Firecracker's
block/virtio/request.rs). This class is mixed into Block, as Firecracker's
event_handler.rs is a second ``impl`` block of the device.

A request is read the way QEMU reads one, whatever its framing (virtio 1.x
lets the driver split or merge the parts across descriptors): the first 16
device-readable bytes are the header, the last device-writable byte is the
status, and what is left between is the data, each descriptor's part of it
one segment. Then it is checked, and a request that breaks a rule is
completed with a status, counted, and never acted on:

* no device-writable byte at the end: nowhere to put a status; used length
  0 and nothing written (Firecracker);
* fewer than 16 device-readable bytes: IOERR;
* a type the device does not do (or FLUSH not negotiated): UNSUPP;
* IN and OUT: data the wrong way (IN's device-readable, OUT's
  device-writable), none, or not whole 512-byte sectors, more segments than
  seg_max or one longer than size_max, sectors beyond the capacity: IOERR;
  OUT on a read-only disk: IOERR, nothing written (virtio 1.2, 5.2.6.2);
* FLUSH with data or a sector other than 0; GET_ID with other than 20
  device-writable bytes of data: IOERR.

The used length is the bytes written into the chain, the status included.
A ring rule broken (a loop, a buffer outside the domain) is the queue's
RingError, which the transport turns into DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from hypervisor.devices.blk.metrics import BlockMetrics
from hypervisor.devices.virtio.mmio import VirtioMmio
from hypervisor.devices.virtio.queue import Buffer, Chain, SplitQueue
from hypervisor.public.io.virtio_blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_OUTHDR,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

Segment = tuple[int, int]  # bus address, length
T = TypeVar("T")

QUEUE_SIZE = 256             # a descriptor table fills one page (the default)
QUEUE_SIZE_MIN = 4           # QEMU's queue-size: a power of two, more than 2
SEG_MAX = 126                # QEMU's before seg-max-adjust: a queue of 128 less the
                             # header and status (a smaller one than the queue allows,
                             # so that a driver must honour it)
SIZE_MAX = 64 * 1024         # the largest data segment


def _segments(buffers: Sequence[Buffer], front: int, back: int) -> list[Segment]:
    """The buffers' bytes less ``front`` at the start and ``back`` at the
    end, as one (address, length) per buffer that keeps any."""
    out: list[Segment] = []
    total = sum(b.length for b in buffers)
    pos = 0
    for b in buffers:
        lo, hi = max(pos, front), min(pos + b.length, total - back)
        if hi > lo:
            out.append((b.addr + lo - pos, hi - lo))
        pos += b.length
    return out


class Refused(Exception):
    """A request broke a rule: its status, and the counter that says why."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status, self.why = status, why


class BlockEventHandler:
    """The request queue's notification (mixed into Block)."""

    transport: VirtioMmio
    metrics: BlockMetrics
    fd: int
    capacity: int
    read_only: bool
    serial: str
    seg_max: int

    def flush(self) -> None: ...

    def handle_queue(self, q: SplitQueue) -> None:
        """Serve every request made available, then one interrupt."""
        mem = self.transport.mem
        done = 0
        while (chain := q.pop(mem)) is not None:
            self.metrics.requests += 1
            q.push(mem, chain.head, self.process_request(chain))
            done += 1
        if done:
            self.transport.used_notify(q)

    def process_request(self, chain: Chain) -> int:
        """Check and serve one request; returns the bytes written into it."""
        mem = self.transport.mem
        readable = chain.readable()
        writable = [b for b in chain.buffers if b.writable]
        if not writable or writable[-1].length == 0:
            self.metrics.no_status += 1
            return 0
        last = writable[-1]
        try:
            nread = sum(b.length for b in readable)
            if nread < VIRTIO_BLK_OUTHDR.size:
                raise Refused(VIRTIO_BLK_S_IOERR, "bad_header")
            head = _segments(readable, 0, nread - VIRTIO_BLK_OUTHDR.size)
            raw = b"".join(mem.read(a, n, "blk request header") for a, n in head)
            rtype, _reserved, sector = VIRTIO_BLK_OUTHDR.unpack(raw)
            written = self._serve(rtype, sector, _segments(readable, VIRTIO_BLK_OUTHDR.size, 0),
                                  _segments(writable, 0, 1))
            status = VIRTIO_BLK_S_OK
            self.metrics.ok += 1
        except Refused as e:
            status, written = e.status, 0
            if e.why:
                setattr(self.metrics, e.why, getattr(self.metrics, e.why) + 1)
            if status == VIRTIO_BLK_S_UNSUPP:
                self.metrics.unsupp += 1
            else:
                self.metrics.ioerr += 1
        mem.write(last.addr + last.length - 1, bytes([status]), "blk request status")
        return written + 1

    def _serve(self, rtype: int, sector: int, out_data: list[Segment],
               in_data: list[Segment]) -> int:
        """One request of type ``rtype`` with its data checked and done;
        returns the data bytes written into the chain (Refused: a rule broken)."""
        if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            return self._read_write(rtype, sector, out_data, in_data)
        if rtype == VIRTIO_BLK_T_FLUSH:
            if not self.transport.negotiated(VIRTIO_BLK_F_FLUSH):
                raise Refused(VIRTIO_BLK_S_UNSUPP, "")
            if in_data or out_data:
                raise Refused(VIRTIO_BLK_S_IOERR, "bad_direction")
            if sector:
                raise Refused(VIRTIO_BLK_S_IOERR, "out_of_range")
            self._host(self.flush)
            self.metrics.flushes += 1
            return 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            if out_data or sum(n for _, n in in_data) != VIRTIO_BLK_ID_BYTES:
                raise Refused(VIRTIO_BLK_S_IOERR, "bad_direction")
            self._scatter(self.serial.encode().ljust(VIRTIO_BLK_ID_BYTES, b"\0"), in_data)
            self.metrics.get_ids += 1
            return VIRTIO_BLK_ID_BYTES
        raise Refused(VIRTIO_BLK_S_UNSUPP, "")

    def _read_write(self, rtype: int, sector: int, out_data: list[Segment],
                    in_data: list[Segment]) -> int:
        """IN or OUT: the data's direction, length, segments and range checked."""
        data, wrong = (in_data, out_data) if rtype == VIRTIO_BLK_T_IN else (out_data, in_data)
        if wrong:
            raise Refused(VIRTIO_BLK_S_IOERR, "bad_direction")
        length = sum(n for _, n in data)
        if length == 0 or length % SECTOR_SIZE:
            raise Refused(VIRTIO_BLK_S_IOERR, "bad_length")
        if len(data) > self.seg_max:
            raise Refused(VIRTIO_BLK_S_IOERR, "too_many_segments")
        if any(n > SIZE_MAX for _, n in data):
            raise Refused(VIRTIO_BLK_S_IOERR, "segment_too_big")
        if sector + length // SECTOR_SIZE > self.capacity:
            raise Refused(VIRTIO_BLK_S_IOERR, "out_of_range")
        if rtype == VIRTIO_BLK_T_IN:
            return self._read(sector, data)
        if self.read_only:
            raise Refused(VIRTIO_BLK_S_IOERR, "read_only")
        self._write(sector, data)
        return 0

    # --- the image, through the host's file ------------------------------------------

    def _host(self, fn: Callable[..., T], *args: Any) -> T:
        """A call on the image; its OSError is the request's IOERR."""
        try:
            return fn(*args)
        except OSError as e:
            raise Refused(VIRTIO_BLK_S_IOERR, "host_errors") from e

    def _scatter(self, data: bytes, segs: list[Segment]) -> None:
        mem, pos = self.transport.mem, 0
        for addr, n in segs:
            mem.write(addr, data[pos:pos + n], "blk request data")
            pos += n

    def _read(self, sector: int, segs: list[Segment]) -> int:
        length = sum(n for _, n in segs)
        data = self._host(os.pread, self.fd, length, sector * SECTOR_SIZE)
        if len(data) != length:  # the image shrank under us
            raise Refused(VIRTIO_BLK_S_IOERR, "host_errors")
        self._scatter(data, segs)
        self.metrics.reads += 1
        self.metrics.read_bytes += length
        return length

    def _write(self, sector: int, segs: list[Segment]) -> None:
        mem = self.transport.mem
        data = b"".join(mem.read(a, n, "blk request data") for a, n in segs)
        done = self._host(os.pwrite, self.fd, data, sector * SECTOR_SIZE)
        if done != len(data):
            raise Refused(VIRTIO_BLK_S_IOERR, "host_errors")
        self.metrics.writes += 1
        self.metrics.write_bytes += len(data)
