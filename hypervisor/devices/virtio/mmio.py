"""The virtio-mmio transport, version 2 (the virtio 1.2 specification, section
4.2; QEMU's hw/virtio/virtio-mmio.c and Firecracker's transport/mmio.rs were
the models).

One register page per device. Control registers (below 0x100) take only
aligned 32-bit accesses; the config space at 0x100 takes 8-, 16- and 32-bit
ones. The status handshake is checked: ACKNOWLEDGE, DRIVER, FEATURES_OK (kept
only if the driver accepted VIRTIO_F_VERSION_1 and nothing the device did
not offer), DRIVER_OK; the driver never clears a bit; writing 0 resets the
device, clearing the interrupt status and every QueueReady. A bad access is
ignored (a read gives 0) and counted, never an error of the host.

The interrupt is an event channel: the device sets InterruptStatus bits and
sends the event with the function its creator gave it, as a backend
notifies its frontend. Notifications are sent only while DRIVER_OK is set
(the device consumes no buffer and sends no notification before the driver
says it is ready: virtio 1.2, 3.1). A notify for a queue that is not
ready, or after a reset, is discarded and counted; one that comes after
QueueReady but before DRIVER_OK (Linux kicks the balloon's stats queue that
early) is held and served at DRIVER_OK.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from hypervisor.devices.virtio.queue import DomainMemory, RingError, SplitQueue
from hypervisor.public.io.virtio import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC,
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_VERSION_2,
    VIRTIO_MMIO_WINDOW,
)

log = logging.getLogger(__name__)

PVLAB_VENDOR_ID = 0x424C5650  # "PVLB"
_QUEUE_ADDR = {VIRTIO_MMIO_QUEUE_DESC_LOW: ("desc", 0), VIRTIO_MMIO_QUEUE_DESC_HIGH: ("desc", 32),
               VIRTIO_MMIO_QUEUE_AVAIL_LOW: ("avail", 0),
               VIRTIO_MMIO_QUEUE_AVAIL_HIGH: ("avail", 32),
               VIRTIO_MMIO_QUEUE_USED_LOW: ("used", 0), VIRTIO_MMIO_QUEUE_USED_HIGH: ("used", 32)}


@dataclass(slots=True)
class VirtioMmioMetrics:
    """What the transport counts (slots: a misspelt counter is an error)."""

    bad_accesses: int = 0        # register accesses ignored: size, alignment, order
    features_refused: int = 0    # FEATURES_OK not taken: the driver's choice was bad
    resets: int = 0              # status 0 written
    ring_errors: int = 0         # rules broken in the rings: DEVICE_NEEDS_RESET
    notifies: int = 0            # QueueNotify writes served
    notifies_held: int = 0       # ... that came before DRIVER_OK, served at DRIVER_OK
    notifies_discarded: int = 0  # ... for a queue not ready, or while the device is broken
    interrupts: int = 0          # InterruptStatus raised and the event sent


class VirtioDevice:
    """What a device behind the transport provides (the balloon is one)."""

    device_id = 0
    name = "virtio"
    transport: VirtioMmio

    def features(self) -> int:
        """Offered feature bits, VIRTIO_F_VERSION_1 included."""
        return 1 << VIRTIO_F_VERSION_1

    def queue_sizes(self) -> list[int]:
        """QueueNumMax of each queue, in their order."""
        return []

    def config_read(self, offset: int, size: int) -> int:
        return 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass

    def activate(self) -> None:
        """DRIVER_OK: the device is live."""

    def reset(self) -> None:
        """The transport was reset (status 0)."""

    def handle_queue(self, q: SplitQueue) -> None:
        """The driver notified ``q``; may raise RingError."""

    def spontaneous(self) -> None:
        """Use a buffer as the host may at any moment (a stats request, a
        packet, console input), if there is one to use; the explorer's
        injector (devices/virtio/inject.py) calls it at chosen steps."""

    def close(self) -> None:
        """The domain is gone: let go of what the host gave the device (its
        files and sockets). Called once, after which nothing else is."""


class VirtioMmio:
    """One device's register page, its queues and its interrupt.

    Its creator gives it the device, the domain's memory as the device may
    touch it (``mem``, which names the domain), where the page is on the bus
    (``base``), the event channel that is its interrupt (``port``) and the
    function that sends that event (``send_event``)."""

    def __init__(self, device: VirtioDevice, mem: DomainMemory, base: int, port: int,
                 send_event: Callable[[], None]) -> None:
        self.device = device
        self.mem = mem
        self.domid = mem.domid
        self.base = base
        self.port = port
        self.send_event = send_event
        self.queues = [SplitQueue(i, n) for i, n in enumerate(device.queue_sizes())]
        self.metrics = VirtioMmioMetrics()
        self.last_error = ""  # the last ring error, for the curious
        self.config_generation = 0
        device.transport = self
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.isr = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        for q in self.queues:
            q.reset()

    # --- helpers for devices ----------------------------------------------------------

    @property
    def live(self) -> bool:
        return bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK) \
            and not self.status & VIRTIO_CONFIG_S_NEEDS_RESET

    def negotiated(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1) and bool(
            self.status & VIRTIO_CONFIG_S_FEATURES_OK)

    def interrupt(self, bits: int) -> None:
        """Raise InterruptStatus bits and the event (only while DRIVER_OK)."""
        if not self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            return
        self.isr |= bits
        self.metrics.interrupts += 1
        self.send_event()

    def config_changed(self) -> None:
        """The device changed its config space (QEMU's virtio_notify_config)."""
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self.interrupt(VIRTIO_MMIO_INT_CONFIG)

    def needs_reset(self, why: str) -> None:
        """An error the device cannot recover from (virtio 1.2, 2.1.2): it
        serves nothing more until the driver resets it."""
        self.metrics.ring_errors += 1
        log.info("d%d %s: %s: DEVICE_NEEDS_RESET", self.domid, self.device.name, why)
        self.last_error = why
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
            return
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        self.config_changed()

    def bad_access(self, what: str) -> None:
        """A register or config access the rules refuse: ignored, counted."""
        self.metrics.bad_accesses += 1
        log.debug("d%d %s: %s", self.domid, self.device.name, what)

    # --- the bus side -----------------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        if offset >= VIRTIO_MMIO_CONFIG:
            if offset >= VIRTIO_MMIO_WINDOW or size not in (1, 2, 4) or offset % size:
                self.bad_access(f"config read of {size} bytes at {offset:#x}")
                return 0
            return self.device.config_read(offset - VIRTIO_MMIO_CONFIG, size)
        if size != 4 or offset % 4:
            self.bad_access(f"read of {size} bytes at {offset:#x}: registers take aligned 32 bits")
            return 0
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == VIRTIO_MMIO_MAGIC_VALUE:
            return VIRTIO_MMIO_MAGIC
        if offset == VIRTIO_MMIO_VERSION:
            return VIRTIO_MMIO_VERSION_2
        if offset == VIRTIO_MMIO_DEVICE_ID:
            return self.device.device_id
        if offset == VIRTIO_MMIO_VENDOR_ID:
            return PVLAB_VENDOR_ID
        if offset == VIRTIO_MMIO_DEVICE_FEATURES:
            sel = self.device_features_sel
            return self.device.features() >> (32 * sel) & 0xFFFFFFFF if sel < 2 else 0
        if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
            return q.num_max if q is not None else 0
        if offset == VIRTIO_MMIO_QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
            return self.isr
        if offset == VIRTIO_MMIO_STATUS:
            return self.status
        if offset == VIRTIO_MMIO_CONFIG_GENERATION:
            return self.config_generation
        self.bad_access(f"read of write-only or unknown register {offset:#x}")
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if offset >= VIRTIO_MMIO_CONFIG:
            if offset >= VIRTIO_MMIO_WINDOW or size not in (1, 2, 4) or offset % size:
                self.bad_access(f"config write of {size} bytes at {offset:#x}")
                return
            if not self.status & VIRTIO_CONFIG_S_DRIVER:
                self.bad_access("config write before DRIVER")
                return
            self.device.config_write(offset - VIRTIO_MMIO_CONFIG, size, value)
            return
        if size != 4 or offset % 4:
            self.bad_access(f"write of {size} bytes at {offset:#x}: registers take aligned 32 bits")
            return
        if offset == VIRTIO_MMIO_STATUS:
            self._write_status(value & 0xFF)
        elif offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == VIRTIO_MMIO_QUEUE_NOTIFY:
            self._notify(value & 0xFFFF)
        elif offset == VIRTIO_MMIO_INTERRUPT_ACK:
            self.isr &= ~value & 0xFFFFFFFF
        elif offset in (VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY) or offset in _QUEUE_ADDR:
            self._write_queue(offset, value)
        else:
            self.bad_access(f"write of read-only or unknown register {offset:#x}")

    # --- status and features ----------------------------------------------------------

    def reset(self) -> None:
        """Status 0: forget the negotiation, stop every queue, clear interrupts."""
        self.metrics.resets += 1
        self._reset_registers()
        self.device.reset()

    def _write_status(self, new: int) -> None:
        old = self.status
        if new == 0:
            self.reset()
            return
        if new & VIRTIO_CONFIG_S_FAILED:
            self.status |= VIRTIO_CONFIG_S_FAILED
            return
        if old & ~new & ~VIRTIO_CONFIG_S_NEEDS_RESET:
            self.bad_access(f"status {new:#x} clears bits of {old:#x}: only a reset may")
            return
        added = new & ~old
        needs = {VIRTIO_CONFIG_S_DRIVER: VIRTIO_CONFIG_S_ACKNOWLEDGE,
                 VIRTIO_CONFIG_S_FEATURES_OK: VIRTIO_CONFIG_S_DRIVER,
                 VIRTIO_CONFIG_S_DRIVER_OK: VIRTIO_CONFIG_S_FEATURES_OK}
        for bit, before in needs.items():
            if added & bit and not new & before:
                self.bad_access(f"status {new:#x} sets {bit:#x} before {before:#x}")
                return
        if added & VIRTIO_CONFIG_S_FEATURES_OK:
            wanted = self.driver_features
            if wanted & ~self.device.features() or not wanted >> VIRTIO_F_VERSION_1 & 1:
                # refused: FEATURES_OK does not read back (the driver must give up)
                self.metrics.features_refused += 1
                new &= ~VIRTIO_CONFIG_S_FEATURES_OK & ~VIRTIO_CONFIG_S_DRIVER_OK
        self.status = (new & ~VIRTIO_CONFIG_S_NEEDS_RESET) | (old & VIRTIO_CONFIG_S_NEEDS_RESET)
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
            self.device.activate()
            for q in self.queues:  # the notifies that came too early
                if q.kick_pending:
                    q.kick_pending = False
                    if self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
                        # the device broke meanwhile: it serves nothing until reset
                        self.metrics.notifies_discarded += 1
                    else:
                        self._serve(q)

    def _write_driver_features(self, value: int) -> None:
        st = self.status
        if not st & VIRTIO_CONFIG_S_DRIVER or st & (VIRTIO_CONFIG_S_FEATURES_OK
                                                    | VIRTIO_CONFIG_S_FAILED):
            self.bad_access("DriverFeatures written outside DRIVER .. FEATURES_OK")
            return
        sel = self.driver_features_sel
        if sel >= 2:
            self.bad_access(f"DriverFeaturesSel {sel}: no such feature word")
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    # --- queues -----------------------------------------------------------------------

    def _write_queue(self, offset: int, value: int) -> None:
        if self.queue_sel >= len(self.queues):
            self.bad_access(f"queue register {offset:#x} of queue {self.queue_sel}, which is none")
            return
        q = self.queues[self.queue_sel]
        if offset == VIRTIO_MMIO_QUEUE_READY and not value:
            q.ready = False  # stopping a queue is always allowed (after a reset too)
            return
        if not self.status & VIRTIO_CONFIG_S_FEATURES_OK or self.status & VIRTIO_CONFIG_S_FAILED:
            self.bad_access(f"queue register {offset:#x} written outside FEATURES_OK")
            return
        if offset == VIRTIO_MMIO_QUEUE_READY:
            try:
                q.check_layout(self.mem)
            except RingError as e:
                self.needs_reset(str(e))
                return
            q.ready = True
            return
        if q.ready:
            self.bad_access(f"queue {q.index} register {offset:#x} written while the queue "
                            "is ready")
            return
        if offset == VIRTIO_MMIO_QUEUE_NUM:
            q.num = value
            return
        name, shift = _QUEUE_ADDR[offset]
        old = getattr(q, name)
        setattr(q, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _notify(self, index: int) -> None:
        q = self.queues[index] if index < len(self.queues) else None
        if q is None or not q.ready or self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
            self.metrics.notifies_discarded += 1
            return
        if not self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            q.kick_pending = True  # served at DRIVER_OK
            self.metrics.notifies_held += 1
            return
        self._serve(q)

    def _serve(self, q: SplitQueue) -> None:
        self.metrics.notifies += 1
        try:
            self.device.handle_queue(q)
        except RingError as e:
            self.needs_reset(str(e))

    def used_notify(self, q: SplitQueue) -> None:
        """A device returned buffers on ``q``: interrupt unless suppressed."""
        try:
            wanted = q.wants_interrupt(self.mem)
        except RingError as e:
            self.needs_reset(str(e))
            return
        if wanted:
            self.interrupt(VIRTIO_MMIO_INT_VRING)
