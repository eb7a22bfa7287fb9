"""The guest's split virtqueue (guestos/drivers/virtio_ring.py) on its own,
over a fake cpu whose memory is a dict of pages: a queue is broken from
vring_new until DRIVER_OK (Linux under CONFIG_VIRTIO_HARDEN_NOTIFICATION),
and a used id that is no head in flight marks the queue bad (Linux's
BAD_RING) instead of corrupting the free list or raising in the kernel."""

from __future__ import annotations

import pytest

from guestos.drivers import virtio_ring
from guestos.mm import PAGE_SIZE, va
from hypervisor.public.io.virtio import VRING_IDX_OFF, VRING_RING_OFF, VRING_USED_ELEM
from tests.fakecpu import FakeCpu


@pytest.fixture
def ring(monkeypatch):
    cpu = FakeCpu()
    monkeypatch.setattr(virtio_ring, "alloc_pages", cpu.alloc_page)
    monkeypatch.setattr(virtio_ring, "printk", lambda c, msg: cpu.printed.append(msg))
    vq = virtio_ring.VQ.at(cpu, cpu.kva(cpu.alloc_page()))
    virtio_ring.vring_new(cpu, vq, 2, 8, 0)
    return cpu, vq


def use(cpu: FakeCpu, vq, head: int, length: int = 0) -> None:
    """The device puts ``head`` in the used ring."""
    idx = int.from_bytes(cpu.read(va(vq.used) + VRING_IDX_OFF, 2), "little")
    cpu.write(va(vq.used) + VRING_RING_OFF + VRING_USED_ELEM.size * (idx % vq.num),
              VRING_USED_ELEM.pack(head, length))
    cpu.write(va(vq.used) + VRING_IDX_OFF, ((idx + 1) & 0xFFFF).to_bytes(2, "little"))


def test_a_new_queue_is_broken_until_driver_ok(ring):
    cpu, vq = ring
    assert vq.broken == 1 and vq.bad == 0


def test_a_used_buffer_in_flight_comes_back_once(ring):
    cpu, vq = ring
    head = virtio_ring.add_buf(cpu, vq, 0x1000, 64, writable=True)
    use(cpu, vq, head, 64)
    assert virtio_ring.get_buf(cpu, vq) == (head, 64)
    assert vq.num_free == 8 and vq.bad == 0
    use(cpu, vq, head, 64)            # the same id again: no longer in flight
    assert virtio_ring.get_buf(cpu, vq) is None
    assert vq.bad == 1 and vq.broken == 1 and vq.num_free == 8
    assert cpu.printed == [f"virtio: queue 2 is broken: the device used id {head}, which is "
                           "not a buffer in flight"]


def test_a_used_id_that_is_no_head_leaves_the_free_list_alone(ring):
    cpu, vq = ring
    head = virtio_ring.add_sgs(cpu, vq, [(0x1000, 16)], [(0x2000, 1)])
    free_head, num_free = vq.free_head, vq.num_free
    use(cpu, vq, head + 1)            # the chain's second descriptor: not a head
    assert virtio_ring.get_buf(cpu, vq) is None
    assert (vq.free_head, vq.num_free, vq.bad) == (free_head, num_free, 1)
    assert not virtio_ring.more_used(cpu, vq)   # the driver sees no more buffers


def test_a_used_id_beyond_the_queue_breaks_it_instead_of_the_kernel(ring):
    cpu, vq = ring
    virtio_ring.add_buf(cpu, vq, 0x1000, 64, writable=False)
    use(cpu, vq, 300)
    assert virtio_ring.get_buf(cpu, vq) is None
    assert vq.bad == 1
    assert cpu.printed == ["virtio: queue 2 is broken: the device used id 300, beyond the "
                           "queue's 8"]


def test_the_in_flight_bitmap_fits_beside_the_largest_available_ring():
    assert virtio_ring.INFLIGHT_OFF + virtio_ring.MAX_QUEUE_SIZE // 8 <= PAGE_SIZE
