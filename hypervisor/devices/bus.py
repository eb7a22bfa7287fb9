"""The MMIO bus: device register windows at machine addresses above RAM.

A device window is I/O memory: a domain reaches it only through an L1 entry
of its own pagetables, which the hypervisor validates against the ranges the
toolstack gave the domain (Xen's XEN_DOMCTL_iomem_permission and
iomem_access_permitted). Two paths lead here, one bus: x86 loads and stores
(Unicorn's ``mmio_map`` in every VCPU engine) and the Python guest kernel's
readl/writel (its accessors translate through the same live pagetables).
"""

from __future__ import annotations

import logging
from typing import Protocol

from hypervisor.public.xen import PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger(__name__)

# device windows start here, a page apart (Firecracker's layout is alike);
# machine RAM never reaches it (MAX_MEMORY_MIB plus the hypervisor's frames)
MMIO_BASE = 0xD000_0000
MMIO_STRIDE = PAGE_SIZE
MMIO_NONE = 0xFFFF_FFFF  # what a read of an address with no device returns


class MmioDevice(Protocol):
    """A register window: the domain it serves and its accessors."""

    domid: int

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


class Requester(Protocol):
    """Who makes an access: the bus needs only its domain id (a domain)."""

    domid: int


class MmioBus:
    """Which device answers at which machine address."""

    def __init__(self) -> None:
        self.windows: dict[int, MmioDevice] = {}  # first mfn -> device (a page each)
        self.unclaimed = 0                        # accesses where no device is

    def next_base(self) -> int:
        base = MMIO_BASE
        while base >> PAGE_SHIFT in self.windows:
            base += MMIO_STRIDE
        return base

    def add(self, base: int, device: MmioDevice) -> None:
        mfn = base >> PAGE_SHIFT
        if base & (PAGE_SIZE - 1) or mfn in self.windows:
            raise ValueError(f"MMIO window {base:#x} is misaligned or taken")
        self.windows[mfn] = device

    def remove(self, device: MmioDevice) -> None:
        for mfn in [m for m, d in self.windows.items() if d is device]:
            del self.windows[mfn]

    def read(self, dom: Requester, maddr: int, size: int) -> int:
        dev = self.windows.get(maddr >> PAGE_SHIFT)
        if dev is None or dev.domid != dom.domid:
            self.unclaimed += 1
            return MMIO_NONE & ((1 << (8 * size)) - 1)
        return dev.mmio_read(maddr & (PAGE_SIZE - 1), size)

    def write(self, dom: Requester, maddr: int, size: int, value: int) -> None:
        dev = self.windows.get(maddr >> PAGE_SHIFT)
        if dev is None or dev.domid != dom.domid:
            self.unclaimed += 1
            return
        dev.mmio_write(maddr & (PAGE_SIZE - 1), size, value)
