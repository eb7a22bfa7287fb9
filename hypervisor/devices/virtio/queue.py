"""Split virtqueues, the device's side (the virtio 1.2 specification, section
2.7; QEMU's hw/virtio/virtio.c virtqueue_pop/virtqueue_push, Firecracker's
queue.rs).

The rings live in guest memory at bus addresses, which in this machine are
machine addresses. The guest may write anything there, so every access is
checked, on every use (the guest may give a ring page away at any time):

* a ring or buffer lies wholly in frames the domain owns, none of them a
  hypervisor page; the device writes only into frames that are no pagetable
  (a device write would bypass pagetable validation);
* a chain's head and every ``next`` index is below the queue size, a chain
  is no longer than the queue and never loops, device-writable descriptors
  follow all device-readable ones, and INDIRECT (not offered) is refused;
* the driver's avail index never runs more than a queue size ahead.

A broken rule raises RingError; the transport then sets DEVICE_NEEDS_RESET
and touches the queue no more until the driver resets the device.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hypervisor.mm.frames import PageType
from hypervisor.public.io.virtio import (
    VRING_AVAIL_ALIGN,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC,
    VRING_DESC_ALIGN,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_FLAGS_OFF,
    VRING_IDX_OFF,
    VRING_RING_OFF,
    VRING_USED_ALIGN,
    VRING_USED_ELEM,
    vring_avail_size,
    vring_used_size,
)
from hypervisor.public.xen import PAGE_SHIFT

if TYPE_CHECKING:
    from hypervisor.mm.frames import FrameTable
    from hypervisor.mm.memory import MachineMemory

_U16 = struct.Struct("<H")


class RingError(Exception):
    """The driver broke a ring rule; the message says which."""


@dataclass
class Buffer:
    addr: int       # bus (machine) address
    length: int
    writable: bool  # device-writable


@dataclass
class Chain:
    head: int
    buffers: list[Buffer]

    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.writable]


class DomainMemory:
    """A domain's memory as its devices may touch it, by bus address: the
    machine's memory and frame table, seen for one domain. Whoever creates a
    device gives it this view, so no device reaches up to the hypervisor."""

    def __init__(self, memory: MachineMemory, frames: FrameTable, domid: int,
                 on_write: Callable[[int, int], None] | None = None) -> None:
        self.memory = memory
        self.frames = frames
        self.domid = domid
        # told of each write (machine address, length): log-dirty's marking
        self.on_write = on_write

    def check(self, addr: int, length: int, write: bool, what: str) -> None:
        ft = self.frames
        if length < 0 or addr < 0 or addr + length > self.memory.size:
            raise RingError(f"{what} at {addr:#x}+{length:#x} is outside RAM")
        if length == 0:
            return
        mfns = np.arange(addr >> PAGE_SHIFT, ((addr + length - 1) >> PAGE_SHIFT) + 1)
        if ((ft.owner[mfns] != self.domid) | ft.xenheap[mfns]).any():
            raise RingError(f"{what} at {addr:#x}+{length:#x} is not the domain's memory")
        if write:
            table = (ft.type[mfns] >= PageType.l1) & (ft.type[mfns] <= PageType.l4) \
                & (ft.type_count[mfns] > 0)
            if table.any():
                raise RingError(f"{what} at {addr:#x} is a pagetable: the device "
                                "may not write it")

    def read(self, addr: int, length: int, what: str) -> bytes:
        self.check(addr, length, False, what)
        return self.memory.read(addr, length)

    def write(self, addr: int, data: bytes, what: str) -> None:
        self.check(addr, len(data), True, what)
        self.memory.write(addr, data)
        if self.on_write is not None:
            self.on_write(addr, len(data))

    def read_u16(self, addr: int, what: str) -> int:
        return _U16.unpack(self.read(addr, 2, what))[0]


class SplitQueue:
    """One virtqueue's device side: its registers and its place in the rings."""

    def __init__(self, index: int, num_max: int) -> None:
        self.index = index
        self.num_max = num_max
        self.reset()

    def reset(self) -> None:
        self.num = self.num_max
        self.ready = False
        self.desc = self.avail = self.used = 0
        self.last_avail = 0   # the next avail entry to take (free-running u16)
        self.used_idx = 0     # the next used entry to fill (free-running u16)
        self.kick_pending = False  # a notify the device could not serve yet

    def check_layout(self, mem: DomainMemory) -> None:
        """The rings' sizes and alignment (virtio 1.2, 2.7), and that they are
        the domain's memory: at QueueReady, and again at every use."""
        n = self.num
        if not n or n & (n - 1) or n > self.num_max:
            raise RingError(f"queue {self.index}: size {n} is not a power of two "
                            f"up to {self.num_max}")
        for name, addr, align, size in (("descriptor table", self.desc, VRING_DESC_ALIGN,
                                         VRING_DESC.size * n),
                                        ("available ring", self.avail, VRING_AVAIL_ALIGN,
                                         vring_avail_size(n)),
                                        ("used ring", self.used, VRING_USED_ALIGN,
                                         vring_used_size(n))):
            if addr % align:
                raise RingError(f"queue {self.index}: {name} at {addr:#x} is not "
                                f"{align}-byte aligned")
            mem.check(addr, size, name == "used ring", f"queue {self.index} {name}")

    # --- taking buffers ------------------------------------------------------------

    def avail_idx(self, mem: DomainMemory) -> int:
        return mem.read_u16(self.avail + VRING_IDX_OFF, f"queue {self.index} avail idx")

    def has_work(self, mem: DomainMemory) -> bool:
        return self.avail_idx(mem) != self.last_avail

    def pop(self, mem: DomainMemory) -> Chain | None:
        """The next chain the driver made available, checked; None if none."""
        self.check_layout(mem)
        idx = self.avail_idx(mem)
        pending = (idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.num:
            raise RingError(f"queue {self.index}: avail idx {idx} is {pending} entries "
                            f"ahead of the device, more than the queue's {self.num}")
        slot = self.avail + VRING_RING_OFF + 2 * (self.last_avail % self.num)
        head = mem.read_u16(slot, f"queue {self.index} avail ring")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return Chain(head, self._walk(mem, head))

    def _walk(self, mem: DomainMemory, head: int) -> list[Buffer]:
        table = mem.read(self.desc, VRING_DESC.size * self.num, f"queue {self.index} descriptors")
        out: list[Buffer] = []
        seen: set[int] = set()
        i = head
        total = 0
        while True:
            if i >= self.num:
                raise RingError(f"queue {self.index}: descriptor index {i} is beyond "
                                f"the queue's {self.num}")
            if i in seen or len(seen) >= self.num:
                raise RingError(f"queue {self.index}: the chain from {head} loops")
            seen.add(i)
            addr, length, flags, nxt = VRING_DESC.unpack_from(table, VRING_DESC.size * i)
            if flags & VRING_DESC_F_INDIRECT:
                raise RingError(f"queue {self.index}: descriptor {i} is INDIRECT, "
                                "which the device did not offer")
            writable = bool(flags & VRING_DESC_F_WRITE)
            if out and out[-1].writable and not writable:
                raise RingError(f"queue {self.index}: descriptor {i} is device-readable "
                                "after a device-writable one")
            total += length
            if total >= 1 << 32:
                raise RingError(f"queue {self.index}: the chain from {head} is 4 GiB or more")
            mem.check(addr, length, writable, f"queue {self.index} buffer {i}")
            out.append(Buffer(addr, length, writable))
            if not flags & VRING_DESC_F_NEXT:
                return out
            i = nxt

    # --- giving them back ------------------------------------------------------------

    def push(self, mem: DomainMemory, head: int, written: int) -> None:
        """Return a chain: its used element first, then the used index (the
        driver must not see the index before the element)."""
        self.check_layout(mem)
        slot = self.used + VRING_RING_OFF + VRING_USED_ELEM.size * (self.used_idx % self.num)
        mem.write(slot, VRING_USED_ELEM.pack(head, written), f"queue {self.index} used ring")
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        mem.write(self.used + VRING_IDX_OFF, _U16.pack(self.used_idx),
                  f"queue {self.index} used idx")

    def wants_interrupt(self, mem: DomainMemory) -> bool:
        flags = mem.read_u16(self.avail + VRING_FLAGS_OFF, f"queue {self.index} avail flags")
        return not flags & VRING_AVAIL_F_NO_INTERRUPT
