"""The virtio block driver (Linux's drivers/block/virtio_blk.c, for a Xen PV
guest), with its disk as a device file: ``vda``, ``vdb``, ... in probe order.

A request is one of a fixed table of request slots (Linux's blk-mq tags),
kept with the driver's state (``dev.priv``). Each slot has a page of its own
holding the 16-byte header (virtio_blk_outhdr) and the status byte, and up
to DATA_PAGES pages for the data: one segment each, since a PV guest's
pages are not machine-contiguous. ``virtblk_add_req`` chains them (header,
data, status: ``virtqueue_add_sgs``) and kicks; several slots may be in
flight at once, one per task reading or writing. The queue's callback
(``virtblk_done``) takes every used chain, records its status in its slot
and wakes the tasks waiting on the node.

Dispatch is blk-mq's (block/blk-mq.c, one hardware queue, no scheduler). A
request a task makes enters the software queue (its slot REQ_QUEUED, in
order of entry) and the task's call runs the hardware queue at once
(blk_mq_run_hw_queue, sync): the queued requests go onto the ring in order
(virtio_queue_rq) until one does not fit. That one goes back to wait
(BLK_STS_DEV_RESOURCE: a requeue) and the hardware queue stops
(blk_mq_stop_hw_queue). The next completion starts it again the way
virtblk_done does, asynchronously (blk_mq_start_stopped_hw_queues(q, true)):
the run goes to kblockd, a workqueue the freezer does not stop (here
system_wq: it runs on the cpu that queued it, after that cpu's next upcall
yield). A later task's call also runs the queue, in its own context.

The file: read(2) and write(2) at the file's position, in whole 512-byte
sectors, at most DATA_PAGES pages a call (a shorter count is returned, as
for any file). The first call takes a slot (copying a write's data in),
submits it and waits (returns None: the task blocks on the node); the call
is made again when the node is woken, finds its slot done, copies a read's
data out, frees the slot, moves the position and returns the count, or
-EIO. Everything of a request in flight is in guest memory (the slot, the
file's ``private`` naming it, the task's registers), so a save in between
loses nothing. ioctl BLKGETSIZE64 gives the size in bytes; BLKFLSBUF sends
a FLUSH (the host fsyncs the image).

PM, today's Linux (virtblk_freeze_priv). The freeze first detaches the
block layer (virtblk_detach): blk_mq_freeze_queue waits for every request
that entered to complete, which the synchronous device makes exact here
(the freeze dispatches what waits in the software queue and reaps it),
then blk_mq_quiesce_queue: no dispatch, by a task or by kblockd, until the
restore. Then it reaps the used ring: a request the device served whose
callback (an irq thread) has not run yet is marked done, so that its task
finds it done after the restore: neither lost nor sent again. A request the
device left unused (it broke) ends with IOERR: sending it again could apply
a write twice. Then the reset and the queue's deletion. The restore makes
the queue again, sets DRIVER_OK, unquiesces (the queue's run goes to
kblockd) and wakes the waiting tasks.

``virtio.nodetach=1`` skips the detach. A request left in the software
queue at the freeze is then dispatched by kblockd, which the freezer does
not stop: a run queued on another cpu just before the freeze goes after
the freeze deleted the ring (the ring's FAILURE line, and the request ends
with IOERR).
"""

from __future__ import annotations

import struct

from guestos.fs import device_create, file_operations, wake_up_node
from guestos.kdata import driver_data, set_driver_data
from guestos.layout import Layout, Ref
from guestos.mm import PAGE_SIZE, alloc_pages, va
from guestos.printk import printk
from guestos.symbols import export
from guestos.usercopy import copy_from_user, copy_to_user
from guestos.workqueue import queue_work
from hypervisor.public.errno import EAGAIN, EBUSY, EFAULT, EINVAL, EIO, ENOSPC, EROFS
from hypervisor.public.io.virtio_blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_CFG_BLK_SIZE,
    VIRTIO_BLK_CFG_CAPACITY,
    VIRTIO_BLK_CFG_SEG_MAX,
    VIRTIO_BLK_CFG_SIZE_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_OUTHDR,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_ID_BLOCK,
)
from hypervisor.public.native import NativeCpu

from . import virtio_mmio as vm
from . import virtio_ring
from .virtio import (
    PRIV_OFFSET,
    dev_at,
    has_feature,
    register_virtio_driver,
    virtio_device_ready,
    virtio_driver,
    virtio_reset_device,
    vq_at,
)

KNOWN_FEATURES = (1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX
                  | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_RO)
NR_SLOTS = 8                 # requests in flight at most (blk-mq's queue depth)
DATA_PAGES = 8               # data pages of a slot: 32 KiB a request at most
MAX_DISKS = 26               # vda .. vdz
STATUS_OFF = VIRTIO_BLK_OUTHDR.size   # in the slot's page, after the header
DATA_OFF = 64                # in the slot's page: the pfns of its data pages
REQ_FREE, REQ_INFLIGHT, REQ_DONE, REQ_QUEUED = range(4)  # QUEUED: in the software queue

# Linux's ioctl numbers (include/uapi/linux/fs.h)
BLKGETSIZE64 = 0x80081272    # *(u64 *)arg = the size in bytes
BLKFLSBUF = 0x1261           # a FLUSH: the host's cache to stable storage

VBLK = Layout("virtio_blk", [
    ("capacity", "u64"),     # sectors of 512 bytes (config)
    ("seg_max", "u64"),      # data segments a request may have (config, or 1)
    ("seg_bytes", "u64"),    # the largest segment the driver sends
    ("blk_size", "u64"),
    ("read_only", "u64"),    # VIRTIO_BLK_F_RO
    ("index", "u64"),        # 0: vda
    ("node", "u64"),         # its device node
    ("quiesced", "u64"),     # frozen: nothing is dispatched (blk_mq_quiesce_queue)
    ("in_flight", "u64"),
    ("submitted", "u64"),
    ("completed", "u64"),
    ("errors", "u64"),       # completed with a status other than OK
    ("slot_waits", "u64"),   # a read or write waited for a free slot
    ("slot_waiting", "u64"),  # ... and is not woken yet
    ("quiesce_waits", "u64"),  # ... for the restore
    ("reaped_at_freeze", "u64"),  # completions the freeze took from the used ring
    ("failed_at_freeze", "u64"),  # requests the device left unused at the freeze
    # blk-mq's dispatch
    ("stopped", "u64"),      # the ring was full: no dispatch until a completion (STOPPED)
    ("run_pending", "u64"),  # kblockd has a run of the queue to do (hctx->run_work)
    ("next_seq", "u64"),     # the software queue's order of entry
    ("queued", "u64"),       # requests in the software queue, not on the ring yet
    ("ring_full", "u64"),    # dispatches the full ring sent back (BLK_STS_DEV_RESOURCE)
    ("kblockd_runs", "u64"),
    ("kblockd_dispatched", "u64"),  # requests kblockd put on the ring
    ("drained_at_freeze", "u64"),   # requests the freeze dispatched from the software queue
])
SLOT = Layout("virtblk_req", [
    ("state", "u64"),        # REQ_*
    ("head", "u64"),         # its chain's head descriptor
    ("type", "u64"),
    ("sector", "u64"),
    ("nbytes", "u64"),
    ("status", "u64"),       # the device's, once done
    ("file", "u64"),         # the open file waiting for it (a VA; 0: nobody)
    ("page", "u64"),         # pfn of its header/status page
    ("seq", "u64"),          # its place in the software queue
])
SLOTS_OFFSET = 256           # in the driver's state
assert VBLK.size <= SLOTS_OFFSET
assert SLOTS_OFFSET + NR_SLOTS * SLOT.size <= 4096 - PRIV_OFFSET
assert DATA_OFF + 8 * DATA_PAGES <= PAGE_SIZE


def _vb(cpu: NativeCpu, dev: Ref) -> Ref:
    return VBLK.at(cpu, dev.priv)


def _slot(cpu: NativeCpu, dev: Ref, i: int) -> Ref:
    return SLOT.at(cpu, dev.priv + SLOTS_OFFSET + i * SLOT.size)


def _data_pfns(cpu: NativeCpu, slot: Ref) -> list[int]:
    return list(struct.unpack(f"<{DATA_PAGES}Q", cpu.read(va(slot.page) + DATA_OFF,
                                                          8 * DATA_PAGES)))


def _vq(cpu: NativeCpu, dev: Ref) -> Ref:
    return vq_at(cpu, dev, 0)


def max_bytes(cpu: NativeCpu, dev: Ref) -> int:
    """The most one request carries: its data pages, as many segments as
    seg_max allows, each at most seg_bytes."""
    vb = _vb(cpu, dev)
    return min(DATA_PAGES, vb.seg_max) * vb.seg_bytes


# --- probe ----------------------------------------------------------------------------

def virtblk_probe(cpu: NativeCpu, dev: Ref) -> int:
    """Read the config, make the slots and the queue, DRIVER_OK, ask the
    serial (GET_ID), make the node."""
    index = driver_data(cpu, virtio_blk_driver)
    if index >= MAX_DISKS:
        printk(cpu, f"virtio-mmio at {dev.base:#x}: more than {MAX_DISKS} disks; ignored")
        return -EBUSY
    dev.priv = dev.va + PRIV_OFFSET
    vb = _vb(cpu, dev)
    vb.index = index
    vb.capacity = vm.config_read(cpu, dev, VIRTIO_BLK_CFG_CAPACITY) | \
        vm.config_read(cpu, dev, VIRTIO_BLK_CFG_CAPACITY + 4) << 32
    vb.seg_max = (vm.config_read(cpu, dev, VIRTIO_BLK_CFG_SEG_MAX)
                  if has_feature(dev, VIRTIO_BLK_F_SEG_MAX) else 1) or 1
    size_max = (vm.config_read(cpu, dev, VIRTIO_BLK_CFG_SIZE_MAX)
                if has_feature(dev, VIRTIO_BLK_F_SIZE_MAX) else PAGE_SIZE)
    vb.seg_bytes = max(SECTOR_SIZE, min(PAGE_SIZE, size_max) // SECTOR_SIZE * SECTOR_SIZE)
    vb.blk_size = (vm.config_read(cpu, dev, VIRTIO_BLK_CFG_BLK_SIZE)
                   if has_feature(dev, VIRTIO_BLK_F_BLK_SIZE) else SECTOR_SIZE)
    vb.read_only = 1 if has_feature(dev, VIRTIO_BLK_F_RO) else 0
    # the node first: a disk that cannot have its name takes nothing (no
    # slot pages, no queue), and the next disk keeps its own name
    set_driver_data(cpu, virtio_blk_driver, index + 1)
    name = f"vd{chr(ord('a') + index)}"
    node = device_create(cpu, name, virtio_blk_fops, dev.va)
    if node < 0:
        printk(cpu, f"virtio_blk: no node {name}: error {node}")
        return node
    vb.node = node
    for i in range(NR_SLOTS):
        slot = _slot(cpu, dev, i)
        slot.page, slot.state, slot.file = alloc_pages(cpu), REQ_FREE, 0
        pfns = [alloc_pages(cpu) for _ in range(DATA_PAGES)]
        cpu.write(va(slot.page) + DATA_OFF, struct.pack(f"<{DATA_PAGES}Q", *pfns))
    init_vq(cpu, dev)
    virtio_device_ready(cpu, dev)
    serial = get_id(cpu, dev)
    printk(cpu, f"virtio_blk: {name}: {vb.capacity} sectors ({vb.capacity // 2} KiB), "
           f"serial {serial!r}, {'read-only' if vb.read_only else 'read-write'}, "
           f"features {dev.features:#x}, device at {dev.base:#x}")
    return 0


def init_vq(cpu: NativeCpu, dev: Ref) -> None:
    vm.find_vqs(cpu, dev, [virtblk_done])


# --- requests -------------------------------------------------------------------------

def virtblk_add_req(cpu: NativeCpu, dev: Ref, i: int, rtype: int, sector: int,
                    nbytes: int) -> int:
    """Slot ``i``'s request on the ring (header, data, status) and kicked:
    0, -ENOSPC if the ring has too few free descriptors, -EIO if the ring is
    deleted."""
    slot = _slot(cpu, dev, i)
    slot.type, slot.sector, slot.nbytes = rtype, sector, nbytes
    page = slot.page
    cpu.write(va(page), VIRTIO_BLK_OUTHDR.pack(rtype, 0, sector) + b"\xff")
    seg, left = _vb(cpu, dev).seg_bytes, nbytes
    data: list[tuple[int, int]] = []  # one segment a page (or a size_max of it)
    for pfn in _data_pfns(cpu, slot):
        for off in range(0, PAGE_SIZE, seg):
            if left > 0:
                data.append((virtio_ring.bus_addr(cpu, pfn, off), min(seg, left)))
                left -= seg
    hdr = [(virtio_ring.bus_addr(cpu, page), VIRTIO_BLK_OUTHDR.size)]
    status = [(virtio_ring.bus_addr(cpu, page, STATUS_OFF), 1)]
    out, in_ = (hdr + data, status) if rtype == VIRTIO_BLK_T_OUT else (hdr, data + status)
    vq = _vq(cpu, dev)
    head = virtio_ring.add_sgs(cpu, vq, out, in_)
    if head < 0:
        return -ENOSPC if vq.present else -EIO
    slot.head = head
    slot.state = REQ_INFLIGHT
    vb = _vb(cpu, dev)
    vb.in_flight, vb.submitted = vb.in_flight + 1, vb.submitted + 1
    vm.notify(cpu, dev, vq)
    return 0


def _complete(cpu: NativeCpu, dev: Ref, i: int, status: int) -> None:
    slot, vb = _slot(cpu, dev, i), _vb(cpu, dev)
    slot.status, slot.state = status, REQ_DONE
    vb.in_flight, vb.completed = vb.in_flight - 1, vb.completed + 1
    if status != VIRTIO_BLK_S_OK:
        vb.errors = vb.errors + 1
    if not slot.file:  # its file was closed meanwhile: nobody takes it
        slot.state = REQ_FREE


def virtblk_reap(cpu: NativeCpu, dev: Ref) -> int:
    """Every chain the device used: its slot done with its status. Returns
    how many; the node's waiters are woken if any, and a stopped queue is
    started again, asynchronously, as virtblk_done does
    (blk_mq_start_stopped_hw_queues(q, true))."""
    vq, n = _vq(cpu, dev), 0
    while (got := virtio_ring.get_buf(cpu, vq)) is not None:
        for i in range(NR_SLOTS):
            slot = _slot(cpu, dev, i)
            if slot.state == REQ_INFLIGHT and slot.head == got[0]:
                _complete(cpu, dev, i, cpu.read(va(slot.page) + STATUS_OFF, 1)[0])
                n += 1
                break
        else:
            printk(cpu, f"virtio_blk: the device used descriptor {got[0]}, no request's")
    if n:
        vb = _vb(cpu, dev)
        wake_up_node(cpu, vb.node)
        if vb.stopped:
            vb.stopped = 0
            blk_mq_run_hw_queue_async(cpu, dev)
    return n


@export
def virtblk_done(cpu: NativeCpu, dev: Ref, vq: Ref) -> None:
    """The queue's callback (virtblk_done): requests completed."""
    virtblk_reap(cpu, dev)


# --- blk-mq's dispatch -------------------------------------------------------------------

def blk_mq_insert(cpu: NativeCpu, dev: Ref, i: int, rtype: int, sector: int,
                  nbytes: int) -> None:
    """Slot ``i``'s request into the software queue, last."""
    slot, vb = _slot(cpu, dev, i), _vb(cpu, dev)
    slot.type, slot.sector, slot.nbytes = rtype, sector, nbytes
    slot.seq, vb.next_seq = vb.next_seq, vb.next_seq + 1
    slot.state, vb.queued = REQ_QUEUED, vb.queued + 1


def _first_queued(cpu: NativeCpu, dev: Ref) -> int:
    """The slot that entered the software queue first (-1: none)."""
    best, seq = -1, 0
    for i in range(NR_SLOTS):
        slot = _slot(cpu, dev, i)
        if slot.state == REQ_QUEUED and (best < 0 or slot.seq < seq):
            best, seq = i, slot.seq
    return best


def virtio_queue_rq(cpu: NativeCpu, dev: Ref, i: int) -> int:
    """A queued request onto the ring (virtio_queue_rq): 0; -ENOSPC, the
    ring full, the request still queued; -EIO, the ring deleted, the request
    ended with IOERR (blk_mq_end_request)."""
    slot, vb = _slot(cpu, dev, i), _vb(cpu, dev)
    rc = virtblk_add_req(cpu, dev, i, slot.type, slot.sector, slot.nbytes)
    if rc == -ENOSPC:
        slot.state = REQ_QUEUED
        return rc
    vb.queued = vb.queued - 1
    if rc:
        slot.state, vb.in_flight = REQ_INFLIGHT, vb.in_flight + 1  # _complete takes it off
        _complete(cpu, dev, i, VIRTIO_BLK_S_IOERR)
        wake_up_node(cpu, vb.node)
    return rc


def blk_mq_dispatch(cpu: NativeCpu, dev: Ref) -> int:
    """One run of the hardware queue (__blk_mq_run_hw_queue): the queued
    requests onto the ring in order of entry, until the ring is full (the
    queue then stops: the next completion starts it). Nothing while the
    queue is quiesced or stopped. Returns how many went."""
    vb, n = _vb(cpu, dev), 0
    if vb.quiesced or vb.stopped:
        return 0
    while (i := _first_queued(cpu, dev)) >= 0:
        if virtio_queue_rq(cpu, dev, i) == -ENOSPC:
            vb.stopped, vb.ring_full = 1, vb.ring_full + 1  # blk_mq_stop_hw_queue
            break
        n += 1
    return n


def blk_mq_run_hw_queue_async(cpu: NativeCpu, dev: Ref) -> None:
    """blk_mq_run_hw_queue(hctx, true): the run to kblockd (system_wq here:
    the freezer does not stop it), on this cpu."""
    _vb(cpu, dev).run_pending = 1
    queue_work(cpu, blk_mq_run_work_fn, freezable=False)


@export
def blk_mq_run_work_fn(cpu: NativeCpu, t_now: int) -> None:
    """kblockd's work (blk_mq_run_work_fn): run each disk's hardware queue
    that asked for it."""
    for dev in vm.virtio_mmio_devices(cpu):
        if dev.device_id != VIRTIO_ID_BLOCK or not dev.priv:
            continue
        vb = _vb(cpu, dev)
        if vb.run_pending:
            vb.run_pending, vb.kblockd_runs = 0, vb.kblockd_runs + 1
            vb.kblockd_dispatched = vb.kblockd_dispatched + blk_mq_dispatch(cpu, dev)


def _free_slot(cpu: NativeCpu, dev: Ref) -> int:
    for i in range(NR_SLOTS):
        if _slot(cpu, dev, i).state == REQ_FREE:
            return i
    return -1


def get_id(cpu: NativeCpu, dev: Ref) -> str:
    """The disk's serial (GET_ID), at probe: the device serves it inside the
    notify, so it is in the used ring when the notify returns."""
    i = _free_slot(cpu, dev)
    slot = _slot(cpu, dev, i)
    slot.file = 1  # held by probe, not freed by the reap
    rc = virtblk_add_req(cpu, dev, i, VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES)
    virtblk_reap(cpu, dev)
    ok = rc == 0 and slot.state == REQ_DONE and slot.status == VIRTIO_BLK_S_OK
    raw = cpu.read(va(_data_pfns(cpu, slot)[0]), VIRTIO_BLK_ID_BYTES) if ok else b""
    slot.state, slot.file = REQ_FREE, 0
    return raw.split(b"\0")[0].decode(errors="replace")


# --- the device file --------------------------------------------------------------------

def _file_dev(cpu: NativeCpu, file: Ref) -> Ref:
    return dev_at(cpu, file.minor)  # the node's minor is the device's VA


def blk_open(cpu: NativeCpu, file: Ref) -> int:
    file.private = 0  # slot + 1 of its request in flight
    return 0


def blk_read(cpu: NativeCpu, file: Ref, ubuf: int, size: int) -> int | None:
    return _rw(cpu, file, ubuf, size, write=False)


def blk_write(cpu: NativeCpu, file: Ref, ubuf: int, size: int) -> int | None:
    return _rw(cpu, file, ubuf, size, write=True)


def _rw(cpu: NativeCpu, file: Ref, ubuf: int, size: int, write: bool) -> int | None:
    """A read or a write: start it (None: wait), or finish the one started."""
    dev = _file_dev(cpu, file)
    vb = _vb(cpu, dev)
    if file.private:
        slot = _slot(cpu, dev, file.private - 1)
        if slot.state in (REQ_QUEUED, REQ_INFLIGHT):
            return None
        return _finish(cpu, file, slot, ubuf, write)
    if write and vb.read_only:
        return -EROFS
    if file.pos % SECTOR_SIZE:
        return -EINVAL
    end = vb.capacity * SECTOR_SIZE
    if file.pos >= end:
        return -ENOSPC if write else 0
    nbytes = min(size, end - file.pos, max_bytes(cpu, dev)) // SECTOR_SIZE * SECTOR_SIZE
    if nbytes == 0:
        return -EINVAL  # less than a sector
    if vb.quiesced:  # frozen: it starts after the restore
        vb.quiesce_waits = vb.quiesce_waits + 1
        return None
    i = _free_slot(cpu, dev)
    if i < 0:
        vb.slot_waits, vb.slot_waiting = vb.slot_waits + 1, 1
        return None
    slot = _slot(cpu, dev, i)
    if write:
        data = copy_from_user(cpu, ubuf, nbytes)
        if data is None:
            return -EFAULT
        for k, pfn in enumerate(_data_pfns(cpu, slot)):
            if k * PAGE_SIZE < nbytes:
                cpu.write(va(pfn), data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE])
    slot.file = file.va
    rtype = VIRTIO_BLK_T_OUT if write else VIRTIO_BLK_T_IN
    blk_mq_insert(cpu, dev, i, rtype, file.pos // SECTOR_SIZE, nbytes)
    file.private = i + 1
    blk_mq_dispatch(cpu, dev)  # blk_mq_run_hw_queue(hctx, false): in this task's call
    if slot.state == REQ_DONE:  # failed at once (the ring deleted): no wake-up will come
        return _finish(cpu, file, slot, ubuf, write)
    return None


def _finish(cpu: NativeCpu, file: Ref, slot: Ref, ubuf: int, write: bool) -> int:
    """The file's request is done: its result, the slot free again."""
    nbytes, status = slot.nbytes, slot.status
    data = b""
    if status == VIRTIO_BLK_S_OK and not write:
        data = b"".join(cpu.read(va(pfn), PAGE_SIZE) for pfn in
                        _data_pfns(cpu, slot)[:-(-nbytes // PAGE_SIZE)])[:nbytes]
    slot.state, slot.file = REQ_FREE, 0
    file.private = 0
    vb = _vb(cpu, _file_dev(cpu, file))
    if vb.slot_waiting:  # a task waits for a slot: this one is free now
        vb.slot_waiting = 0
        wake_up_node(cpu, vb.node)
    if status != VIRTIO_BLK_S_OK:
        return -EIO
    if data and not copy_to_user(cpu, ubuf, data):
        return -EFAULT
    file.pos = file.pos + nbytes
    return nbytes


def blk_release(cpu: NativeCpu, file: Ref) -> None:
    """Closed with a request in flight: the reap frees its slot."""
    if not file.private:
        return
    slot = _slot(cpu, _file_dev(cpu, file), file.private - 1)
    if slot.state == REQ_DONE:
        slot.state = REQ_FREE
    slot.file = 0
    file.private = 0


def blk_ioctl(cpu: NativeCpu, file: Ref, cmd: int, arg: int) -> int:
    dev = _file_dev(cpu, file)
    vb = _vb(cpu, dev)
    if cmd == BLKGETSIZE64:
        size = struct.pack("<Q", vb.capacity * SECTOR_SIZE)
        return 0 if copy_to_user(cpu, arg, size) else -EFAULT
    if cmd == BLKFLSBUF:
        return blk_flush(cpu, dev)
    return -EINVAL


def blk_flush(cpu: NativeCpu, dev: Ref) -> int:
    """A FLUSH, waited for the way GET_ID is (an ioctl cannot block): 0,
    -EAGAIN (no free slot, the ring full, or frozen: try again), -EIO. It
    covers the writes completed, so it need not wait its turn behind the
    software queue."""
    vb = _vb(cpu, dev)
    if not has_feature(dev, VIRTIO_BLK_F_FLUSH):
        return 0  # no write cache to flush: every completed write is stable
    i = _free_slot(cpu, dev)
    if i < 0 or vb.quiesced:
        return -EAGAIN
    virtblk_reap(cpu, dev)  # the device used what it was given: room on the ring
    slot = _slot(cpu, dev, i)
    slot.file = 1  # held here, not freed by the reap
    rc = virtblk_add_req(cpu, dev, i, VIRTIO_BLK_T_FLUSH, 0, 0)
    if rc == -ENOSPC:
        slot.file = 0
        return -EAGAIN
    virtblk_reap(cpu, dev)
    ok = rc == 0 and slot.state == REQ_DONE and slot.status == VIRTIO_BLK_S_OK
    if rc == 0 and slot.state == REQ_INFLIGHT:
        vb.in_flight = vb.in_flight - 1
    slot.state, slot.file = REQ_FREE, 0
    return 0 if ok else -EIO


virtio_blk_fops = export(file_operations(blk_open, blk_read, blk_write, blk_release,
                                         blk_ioctl), "guestos.drivers.virtio_blk.virtio_blk_fops")


# --- PM -----------------------------------------------------------------------------------

def virtblk_detach(cpu: NativeCpu, dev: Ref) -> int:
    """Stop the disk's users before the reset (virtblk_freeze_priv's
    blk_mq_freeze_queue, then blk_mq_quiesce_queue): every request that
    entered completes (the device serves what it is given in the notify, so
    the freeze dispatches what waits in the software queue and reaps it),
    then no dispatch, by a task or by kblockd, until the restore. Returns the
    requests it dispatched. Option virtio.nodetach skips it: kblockd may then
    dispatch after the queue is deleted."""
    vb = _vb(cpu, dev)
    if dev.nodetach:
        printk(cpu, f"virtio_blk: option virtio.nodetach: the freeze leaves {vb.queued} "
               "requests in the software queue and kblockd running")
        return 0
    drained = 0
    while True:
        vb.reaped_at_freeze = vb.reaped_at_freeze + virtblk_reap(cpu, dev)
        vb.stopped = 0  # the ring is empty again: the device used all it was given
        sent = blk_mq_dispatch(cpu, dev)
        if not sent:  # the software queue is empty (or the device uses nothing)
            break
        drained += sent
    vb.drained_at_freeze = vb.drained_at_freeze + drained
    vb.quiesced = 1
    return drained


def virtblk_freeze(cpu: NativeCpu, dev: Ref) -> int:
    """virtblk_freeze_priv: the users stopped (virtblk_detach: every request
    completed, dispatch quiesced), what the device used reaped, the device
    reset, the queue deleted."""
    vb = _vb(cpu, dev)
    before = vb.reaped_at_freeze
    drained = virtblk_detach(cpu, dev)
    vb.reaped_at_freeze = vb.reaped_at_freeze + virtblk_reap(cpu, dev)
    reaped = vb.reaped_at_freeze - before
    failed = 0
    for i in range(NR_SLOTS):  # never used by the device: it broke; IOERR, not resent
        if _slot(cpu, dev, i).state == REQ_INFLIGHT:
            _complete(cpu, dev, i, VIRTIO_BLK_S_IOERR)
            failed += 1
    vb.failed_at_freeze = vb.failed_at_freeze + failed
    if failed:
        wake_up_node(cpu, vb.node)
    virtio_reset_device(cpu, dev)
    vm.del_vqs(cpu, dev)
    printk(cpu, f"virtio_blk: vd{chr(ord('a') + vb.index)} frozen: {reaped} requests "
           f"reaped, {failed} failed ({drained} sent from the software queue), device reset, "
           "queue deleted")
    return 0


def virtblk_restore(cpu: NativeCpu, dev: Ref) -> int:
    """virtblk_restore_priv: the queue again, DRIVER_OK, dispatch may go on
    (blk_mq_unquiesce_queue, which runs the queue through kblockd); the
    tasks that waited try again."""
    vb = _vb(cpu, dev)
    init_vq(cpu, dev)
    virtio_device_ready(cpu, dev)
    vb.quiesced = vb.stopped = 0  # a new ring, empty
    if vb.queued:
        blk_mq_run_hw_queue_async(cpu, dev)
    wake_up_node(cpu, vb.node)
    printk(cpu, f"virtio_blk: vd{chr(ord('a') + vb.index)} restored: {vb.capacity} sectors")
    return 0


virtio_blk_driver = register_virtio_driver(export(virtio_driver(
    "virtio_blk", VIRTIO_ID_BLOCK, KNOWN_FEATURES, probe=virtblk_probe,
    freeze=virtblk_freeze, restore=virtblk_restore),
    "guestos.drivers.virtio_blk.virtio_blk_driver"))
