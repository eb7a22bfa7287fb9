"""Split virtqueues, the driver's side (Linux's drivers/virtio/virtio_ring.c,
cut to what the drivers need: single buffers (``add_buf``) and chains of
device-readable then device-writable buffers (``add_sgs``, for a block
request's header, data and status); no indirect descriptors, no event index).
The queue's interrupt, vring_interrupt, is the core's (virtio.py).

Each area gets a page of its own: the descriptor table (16 bytes an entry,
so at most 256 entries in a page), the available ring and the used ring. A
PV guest's pfns are not machine-contiguous, and virtio 1.x lets the three
areas lie anywhere; the device is given their machine addresses. The queue's
own bookkeeping (free descriptors, the shadow of avail->idx, how far the
used ring has been read) is a VQ struct in the driver's state page.
"""

from __future__ import annotations

import struct

from guestos.layout import Layout, Ref
from guestos.mm import PAGE_SIZE, alloc_pages, free_page, pfn_to_mfn, va
from guestos.printk import printk
from hypervisor.public.io.virtio import (
    VRING_DESC,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_IDX_OFF,
    VRING_RING_OFF,
    VRING_USED_ELEM,
)
from hypervisor.public.native import NativeCpu

VQ = Layout("virtqueue", [
    ("present", "u64"),    # 1 while the queue exists (find_vqs .. del_vqs)
    ("index", "u64"),
    ("num", "u64"),
    ("desc", "u64"),       # pfns of the three areas
    ("avail", "u64"),
    ("used", "u64"),
    ("free_head", "u64"),  # descriptors not in use, chained through next
    ("num_free", "u64"),
    ("avail_idx", "u64"),  # the driver's avail->idx (free-running u16)
    ("last_used", "u64"),  # the used entries read so far (free-running u16)
    ("callback", "u64"),   # symbol number of callback(cpu, dev, vq) (0: none)
    ("broken", "u64"),     # no callback (virtio.py): from vring_new until DRIVER_OK, and
                           #   from the reset on
    ("bad", "u64"),        # the device broke the ring's rules (BAD_RING): no more buffers
])
MAX_QUEUE_SIZE = PAGE_SIZE // VRING_DESC.size  # the descriptor table in one page
_U16 = struct.Struct("<H")
# The heads in flight, a bit each, in the second half of the available ring's
# page (the ring itself takes at most 6 + 2 * 256 bytes): Linux's desc_state,
# which tells a used id the driver made available from one it never did.
INFLIGHT_OFF = PAGE_SIZE // 2
assert VRING_RING_OFF + 2 * MAX_QUEUE_SIZE + 2 <= INFLIGHT_OFF


def vring_new(cpu: NativeCpu, vq: Ref, index: int, num: int, callback: int) -> None:
    """Zeroed areas for a queue of ``num`` entries, every descriptor free;
    ``callback`` is a symbol number (0: none). The queue is broken until
    virtio_device_ready, as in Linux under CONFIG_VIRTIO_HARDEN_NOTIFICATION
    (__vring_new_virtqueue): an interrupt before DRIVER_OK calls no callback."""
    vq.index, vq.num, vq.callback, vq.broken, vq.bad = index, num, callback, 1, 0
    vq.desc, vq.avail, vq.used = alloc_pages(cpu), alloc_pages(cpu), alloc_pages(cpu)
    table = bytearray(PAGE_SIZE)
    for i in range(num):
        VRING_DESC.pack_into(table, VRING_DESC.size * i, 0, 0, 0, (i + 1) % num)
    cpu.write(va(vq.desc), bytes(table))
    vq.free_head, vq.num_free = 0, num
    vq.avail_idx = vq.last_used = 0
    vq.present = 1


def vring_del(cpu: NativeCpu, vq: Ref) -> None:
    """Free the areas: only once the device can no longer touch them (reset)."""
    if not vq.present:
        return
    vq.present = 0
    for pfn in (vq.desc, vq.avail, vq.used):
        free_page(cpu, pfn)


def bus_addr(cpu: NativeCpu, pfn: int, offset: int = 0) -> int:
    """A page's address for the device: its machine address (PV DMA)."""
    return (pfn_to_mfn(cpu, pfn) << 12) + offset


def area_addrs(cpu: NativeCpu, vq: Ref) -> tuple[int, int, int]:
    return bus_addr(cpu, vq.desc), bus_addr(cpu, vq.avail), bus_addr(cpu, vq.used)


def add_buf(cpu: NativeCpu, vq: Ref, addr: int, length: int, writable: bool) -> int:
    """Make one buffer available (virtqueue_add_outbuf/inbuf); returns its
    descriptor, or -1 if the queue is full or deleted. The caller kicks."""
    if not vq.present:
        late_add(cpu, vq)
        return -1
    if vq.num_free == 0:
        return -1
    head = vq.free_head
    slot = va(vq.desc) + VRING_DESC.size * head
    nxt = VRING_DESC.unpack(cpu.read(slot, VRING_DESC.size))[3]
    cpu.write(slot, VRING_DESC.pack(addr, length, VRING_DESC_F_WRITE if writable else 0, nxt))
    vq.free_head, vq.num_free = nxt, vq.num_free - 1
    _set_inflight(cpu, vq, head, True)
    idx = vq.avail_idx
    cpu.write(va(vq.avail) + VRING_RING_OFF + 2 * (idx % vq.num), _U16.pack(head))
    # the entry before the index: the device must not see one without the other
    vq.avail_idx = (idx + 1) & 0xFFFF
    cpu.write(va(vq.avail) + VRING_IDX_OFF, _U16.pack(vq.avail_idx))
    return head


def add_sgs(cpu: NativeCpu, vq: Ref, out: list[tuple[int, int]],
            in_: list[tuple[int, int]]) -> int:
    """Make one chain available (virtqueue_add_sgs): the ``out`` buffers
    (address, length), device-readable, then the ``in_`` ones,
    device-writable, linked through NEXT. Returns the head descriptor, or
    -1 if the queue has too few free descriptors or is deleted. The caller
    kicks."""
    n = len(out) + len(in_)
    if not vq.present:
        late_add(cpu, vq)
        return -1
    if n == 0 or vq.num_free < n:
        return -1
    table = va(vq.desc)
    head = i = vq.free_head
    for k, (addr, length) in enumerate([*out, *in_]):
        slot = table + VRING_DESC.size * i
        nxt = VRING_DESC.unpack(cpu.read(slot, VRING_DESC.size))[3]  # the free list's next
        flags = (VRING_DESC_F_WRITE if k >= len(out) else 0) | \
            (VRING_DESC_F_NEXT if k + 1 < n else 0)
        cpu.write(slot, VRING_DESC.pack(addr, length, flags, nxt))
        i = nxt
    vq.free_head, vq.num_free = i, vq.num_free - n
    _set_inflight(cpu, vq, head, True)
    idx = vq.avail_idx
    cpu.write(va(vq.avail) + VRING_RING_OFF + 2 * (idx % vq.num), _U16.pack(head))
    vq.avail_idx = (idx + 1) & 0xFFFF  # the entry before the index, as add_buf
    cpu.write(va(vq.avail) + VRING_IDX_OFF, _U16.pack(vq.avail_idx))
    return head


def late_add(cpu: NativeCpu, vq: Ref) -> None:
    """A driver's user added a buffer to a queue its freeze deleted: the
    race the driver's detach (stopping its users before the reset) closes."""
    printk(cpu, f"virtio: FAILURE: a buffer added to queue {vq.index} after the freeze "
                "deleted it (option virtio.nodetach: the driver's users were not stopped)")


def _inflight(cpu: NativeCpu, vq: Ref, head: int) -> bool:
    return bool(cpu.read(va(vq.avail) + INFLIGHT_OFF + head // 8, 1)[0] >> (head % 8) & 1)


def _set_inflight(cpu: NativeCpu, vq: Ref, head: int, on: bool) -> None:
    addr = va(vq.avail) + INFLIGHT_OFF + head // 8
    byte = cpu.read(addr, 1)[0]
    bit = 1 << (head % 8)
    cpu.write(addr, bytes([byte | bit if on else byte & ~bit]))


def bad_ring(cpu: NativeCpu, vq: Ref, why: str) -> None:
    """Linux's BAD_RING: the device broke the ring's rules; the queue is
    broken for good (until it is made again) and the driver gets no more
    buffers from it, rather than a corrupt free list or a crashed kernel."""
    vq.bad = vq.broken = 1
    printk(cpu, f"virtio: queue {vq.index} is broken: {why}")


def more_used(cpu: NativeCpu, vq: Ref) -> bool:
    """Whether the device used a buffer the driver has not taken yet."""
    return bool(vq.present) and not vq.bad and _U16.unpack(
        cpu.read(va(vq.used) + VRING_IDX_OFF, 2))[0] != vq.last_used


def get_buf(cpu: NativeCpu, vq: Ref) -> tuple[int, int] | None:
    """The next used buffer (its head descriptor, length written), its
    descriptors freed, the whole chain (detach_buf); None if the device has
    used nothing new, or if the queue is bad (a used id that is no head in
    flight: virtqueue_get_buf_ctx_split's checks)."""
    if not vq.present or vq.bad:
        return None
    used_idx = _U16.unpack(cpu.read(va(vq.used) + VRING_IDX_OFF, 2))[0]
    last = vq.last_used
    if used_idx == last:
        return None
    elem = va(vq.used) + VRING_RING_OFF + VRING_USED_ELEM.size * (last % vq.num)
    head, length = VRING_USED_ELEM.unpack(cpu.read(elem, VRING_USED_ELEM.size))
    if head >= vq.num:
        bad_ring(cpu, vq, f"the device used id {head}, beyond the queue's {vq.num}")
        return None
    if not _inflight(cpu, vq, head):
        bad_ring(cpu, vq, f"the device used id {head}, which is not a buffer in flight")
        return None
    _set_inflight(cpu, vq, head, False)
    i, freed = head, 0
    while True:  # the chain's descriptors back on the free list, head first
        slot = va(vq.desc) + VRING_DESC.size * i
        _addr, _len, flags, nxt = VRING_DESC.unpack(cpu.read(slot, VRING_DESC.size))
        freed += 1
        if not flags & VRING_DESC_F_NEXT or freed >= vq.num:
            cpu.write(slot, VRING_DESC.pack(0, 0, 0, vq.free_head))
            break
        cpu.write(slot, VRING_DESC.pack(0, 0, 0, nxt))
        i = nxt
    vq.free_head, vq.num_free = head, vq.num_free + freed
    vq.last_used = (last + 1) & 0xFFFF
    return head, length
