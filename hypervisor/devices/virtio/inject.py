"""Events thrown at a virtio device from the host side, at chosen register
accesses of the guest: the explorer's injector (``pvlab explore
--inject-every N``, hypervisor/toolstack/explore.py).

The guest's freeze, reset and restore of a device are sequences of register
accesses: the status read and written, the queues stopped and set up again,
the features, the notifies. An ``Injector`` counts the accesses of one device
from the moment it is armed and, at each access whose number is ``phase``
modulo ``every``, right after the access, makes the device do what a host
may do at any moment: use a buffer (the device's ``spontaneous``: a stats
request, a packet, console input), change its config and raise the used-buffer
interrupt (the transport's ``config_changed`` and ``interrupt``). A device
that is not at DRIVER_OK raises no interrupt (virtio 1.2, 2.1.2), so there
the injector sends the bare event, as a stale one still in flight arrives.
Each throw is kept (``thrown``): the access number and register, and the
device status then, so that a failing schedule can be told step by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypervisor.devices.virtio.mmio import VirtioMmio
from hypervisor.public.io.virtio import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_STATUS,
)

REGISTER_NAMES = {VIRTIO_MMIO_STATUS: "Status", VIRTIO_MMIO_QUEUE_READY: "QueueReady",
                  VIRTIO_MMIO_QUEUE_SEL: "QueueSel", VIRTIO_MMIO_QUEUE_NOTIFY: "QueueNotify",
                  VIRTIO_MMIO_INTERRUPT_STATUS: "InterruptStatus",
                  VIRTIO_MMIO_INTERRUPT_ACK: "InterruptACK"}


def register_name(offset: int) -> str:
    if offset >= VIRTIO_MMIO_CONFIG:
        return f"config+{offset - VIRTIO_MMIO_CONFIG:#x}"
    return REGISTER_NAMES.get(offset, f"register {offset:#x}")


@dataclass(frozen=True)
class Throw:
    """One throw: after the guest's access number ``access`` (from the arming)."""

    access: int
    what: str          # "read Status", "write Status 0x0", ...
    live: bool         # the device was at DRIVER_OK: config change and interrupt raised

    def __str__(self) -> str:
        how = "config change, used buffer, interrupt" if self.live else "a bare event"
        return f"access {self.access} ({self.what}): {how}"


@dataclass
class Injector:
    """Throws events at ``transport``'s device every ``every`` accesses of
    the guest, at those numbered ``phase`` modulo ``every`` once armed."""

    transport: VirtioMmio
    every: int
    phase: int = 0
    armed: bool = False
    accesses: int = 0
    thrown: list[Throw] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every {self.every}: throw at every N-th access, N >= 1")
        t = self.transport
        read, write = t.mmio_read, t.mmio_write

        def mmio_read(offset: int, size: int) -> int:
            value = read(offset, size)
            self._step(f"read {register_name(offset)}")
            return value

        def mmio_write(offset: int, size: int, value: int) -> None:
            write(offset, size, value)
            self._step(f"write {register_name(offset)} {value:#x}")

        t.mmio_read, t.mmio_write = mmio_read, mmio_write  # type: ignore[method-assign]

    def arm(self) -> None:
        """Count from here: the next access is number 1."""
        self.armed, self.accesses = True, 0

    def _step(self, what: str) -> None:
        if not self.armed:
            return
        self.accesses += 1
        if self.accesses % self.every == self.phase % self.every:
            self.throw(what)

    def throw(self, what: str = "by hand") -> None:
        """The device's events, now."""
        t = self.transport
        live = bool(t.status & VIRTIO_CONFIG_S_DRIVER_OK)
        self.thrown.append(Throw(self.accesses, what, live))
        if live:
            t.device.spontaneous()
            t.config_changed()
            t.interrupt(VIRTIO_MMIO_INT_VRING)
        else:
            t.send_event()
