"""Events thrown at a virtio device from the host side, at chosen register
accesses of the guest: the explorer's injector (``pvlab explore
--inject-every N``, hypervisor/toolstack/explore.py).

The guest's freeze, reset and restore of a device are a sequence of register
accesses: the status read and written, the queues stopped and set up again,
the features, the kicks. An armed ``Injector`` waits for that sequence: its
window opens at the guest's first access to the Status register (the core's
freeze reads it first; nothing else does while the device runs) and closes
when the guest sets DRIVER_OK again after a reset (the thaw's or the
restore's end). In the window it counts the guest's accesses, less those of
the interrupt handler (InterruptStatus, InterruptACK) and of the config
space, which answer its own events, and after each access whose number is
``phase`` modulo ``every`` it makes the device do what a host may do at any
moment: use a buffer (the device's ``spontaneous``: a stats request, a
packet, console input), change its config and raise the used-buffer
interrupt (the transport's ``config_changed`` and ``interrupt``). A device
that is not at DRIVER_OK raises no interrupt (virtio 1.2, 2.1.2), so there
the injector sends the bare event, as a stale one still in flight arrives.
Each throw is kept (``thrown``): the access number and register, and whether
the device was live, so that a failing schedule can be told step by step.
At most ``MAX_THROWS`` are thrown: a guest whose steps never end cannot
make the injector storm it.

With ``unit="slice"`` the injector counts the scheduler's slices instead
(its ``tick`` runs between two), and its window opens as soon as it is
armed: the events then also come before the freeze's first access, while
the guest's other cpus work towards it (the moment at which an interrupt's
hard half taken on another cpu is left half handled by the freeze).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypervisor.devices.virtio.mmio import VirtioMmio
from hypervisor.public.io.virtio import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG_GENERATION,
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


MAX_THROWS = 64
UNITS = ("access", "slice")   # what the injector counts
# the accesses that answer the injector's own events: not steps of the guest's
_NOT_STEPS = (VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_INTERRUPT_ACK,
              VIRTIO_MMIO_CONFIG_GENERATION)


def register_name(offset: int) -> str:
    if offset >= VIRTIO_MMIO_CONFIG:
        return f"config+{offset - VIRTIO_MMIO_CONFIG:#x}"
    return REGISTER_NAMES.get(offset, f"register {offset:#x}")


@dataclass(frozen=True)
class Throw:
    """One throw: after the guest's access number ``access`` (from the arming)."""

    access: int        # or slice, by the injector's unit
    what: str          # "read Status", "write Status 0x0", "slice", ...
    live: bool         # the device was at DRIVER_OK: config change and interrupt raised

    def __str__(self) -> str:
        how = "config change, used buffer, interrupt" if self.live else "a bare event"
        step = f"access {self.access} ({self.what})" if self.what != "slice" \
            else f"slice {self.access}"
        return f"{step}: {how}"


@dataclass
class Injector:
    """Throws events at ``transport``'s device in the window of its freeze,
    reset and restore, after every ``every``-th access of the guest there,
    from those numbered ``phase`` modulo ``every``, once armed."""

    transport: VirtioMmio
    every: int
    phase: int = 0
    unit: str = "access"
    armed: bool = False
    in_window: bool = False
    reset_seen: bool = False
    accesses: int = 0
    thrown: list[Throw] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every {self.every}: throw at every N-th step, N >= 1")
        if self.unit not in UNITS:
            raise ValueError(f"unit {self.unit!r}: one of {', '.join(UNITS)}")
        t = self.transport
        read, write = t.mmio_read, t.mmio_write

        def mmio_read(offset: int, size: int) -> int:
            value = read(offset, size)
            self._step(offset, f"read {register_name(offset)}")
            return value

        def mmio_write(offset: int, size: int, value: int) -> None:
            write(offset, size, value)
            self._step(offset, f"write {register_name(offset)} {value:#x}", value)

        t.mmio_read, t.mmio_write = mmio_read, mmio_write  # type: ignore[method-assign]

    def arm(self) -> None:
        """Wait for the window from here (by slices: it opens now); its
        first step is number 1."""
        self.armed, self.reset_seen, self.accesses = True, False, 0
        self.in_window = self.unit == "slice"

    def tick(self) -> None:
        """Between two slices (the scheduler's between_slices)."""
        if self.armed and self.unit == "slice":
            self._count("slice")

    def _count(self, what: str) -> None:
        self.accesses += 1
        if self.accesses % self.every == self.phase % self.every \
                and len(self.thrown) < MAX_THROWS:
            self.throw(what)

    def _step(self, offset: int, what: str, value: int | None = None) -> None:
        if not self.armed or offset in _NOT_STEPS or offset >= VIRTIO_MMIO_CONFIG:
            return
        status = offset == VIRTIO_MMIO_STATUS
        if not self.in_window and not status:
            return
        self.in_window = True
        if self.unit == "access":
            self._count(what)
        if status and value is not None:
            if value == 0:
                self.reset_seen = True
            elif self.reset_seen and value & VIRTIO_CONFIG_S_DRIVER_OK:
                self.armed = False     # the thaw or restore is done: the window closes

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
