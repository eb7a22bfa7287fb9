"""The network device's queue notifications (Firecracker's
net/event_handler.rs, QEMU's virtio_net_handle_tx/_rx/_ctrl).

* receive queue (0): the driver posted buffers; nothing to do until a frame
  comes (``receive_frames``).
* transmit queue (1): every chain is a virtio_net_hdr then a frame; sent to
  the backend, then the backend's answers (the user gateway's, which the
  host makes at once) are delivered.
* control queue (2): class and command, the data, then a writable ack byte.
  VIRTIO_NET_CTRL_ANNOUNCE_ACK clears ANNOUNCE; anything else is ERR.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.devices.net.metrics import NetMetrics
from hypervisor.devices.virtio.mmio import VirtioMmio
from hypervisor.devices.virtio.queue import Chain, RingError, SplitQueue
from hypervisor.public.io.virtio_net import (
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_HDR,
    VIRTIO_NET_ERR,
    VIRTIO_NET_HDR,
    VIRTIO_NET_MAX_FRAME,
    VIRTIO_NET_MIN_FRAME,
    VIRTIO_NET_OK,
    VIRTIO_NET_VQ_CTRL,
    VIRTIO_NET_VQ_RX,
    VIRTIO_NET_VQ_TX,
)

if TYPE_CHECKING:
    from hypervisor.devices.net.backend import Backend

CTRL_MAX_BYTES = 64  # no command this device knows carries more


class NetEventHandler:
    """Queue notifications of the network device (mixed into Net)."""

    transport: VirtioMmio
    metrics: NetMetrics
    backend: Backend
    status_announce: bool

    def handle_queue(self, q: SplitQueue) -> None:
        """The driver notified ``q``; a RingError goes up to the transport."""
        if q.index == VIRTIO_NET_VQ_TX:
            self.process_tx(q)
            self.receive_frames(self.backend.poll())
            self.backend_counts()
        elif q.index == VIRTIO_NET_VQ_CTRL:
            self.process_ctrl(q)
        # VIRTIO_NET_VQ_RX: buffers posted, used when frames come

    def backend_counts(self) -> None:
        """The backend's failures and drops into the device's counters."""
        self.metrics.backend_errors = self.backend.errors
        self.metrics.tx_dropped = self.backend.dropped

    # --- transmit ----------------------------------------------------------------------

    def process_tx(self, q: SplitQueue) -> None:
        mem = self.transport.mem
        done = 0
        while (chain := q.pop(mem)) is not None:
            frame = self._tx_frame(chain)
            q.push(mem, chain.head, 0)
            done += 1
            if frame is None:
                self.metrics.tx_malformed += 1
                continue
            self.metrics.tx_frames += 1
            self.metrics.tx_bytes += len(frame)
            self.backend.send(frame)
        if done:
            self.transport.used_notify(q)

    def _tx_frame(self, chain: Chain) -> bytes | None:
        """The frame a tx chain carries, or None if the chain is bad."""
        if any(b.writable for b in chain.buffers):
            return None
        total = sum(b.length for b in chain.buffers)
        if not VIRTIO_NET_HDR.size + VIRTIO_NET_MIN_FRAME <= total \
                <= VIRTIO_NET_HDR.size + VIRTIO_NET_MAX_FRAME:
            return None
        data = b"".join(self.transport.mem.read(b.addr, b.length, "tx buffer")
                        for b in chain.buffers)
        flags, gso_type = VIRTIO_NET_HDR.unpack_from(data)[:2]
        if flags or gso_type:  # no CSUM or GSO offered: the header must be zero
            return None
        return data[VIRTIO_NET_HDR.size:]

    # --- receive -----------------------------------------------------------------------

    def receive_frames(self, frames: list[bytes]) -> None:
        """Frames for the guest, each into a posted buffer or dropped."""
        if not frames:
            return
        t = self.transport
        q = t.queues[VIRTIO_NET_VQ_RX]
        if not (t.live and q.ready):
            self.metrics.rx_dropped += len(frames)
            return
        used = 0
        try:
            for frame in frames:
                used += self._receive(q, frame)
        except RingError as e:
            t.needs_reset(str(e))
            return
        if used:
            t.used_notify(q)

    def _receive(self, q: SplitQueue, frame: bytes) -> int:
        """One frame into the next good rx buffer; the buffers used."""
        mem = self.transport.mem
        data = VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 1) + frame
        used = 0
        while (chain := q.pop(mem)) is not None:
            used += 1
            room = sum(b.length for b in chain.buffers)
            if any(not b.writable for b in chain.buffers) or room < len(data):
                self.metrics.rx_malformed += 1
                q.push(mem, chain.head, 0)
                continue
            at = 0
            for b in chain.buffers:
                part = data[at:at + b.length]
                if part:
                    mem.write(b.addr, part, "rx buffer")
                at += len(part)
            q.push(mem, chain.head, len(data))
            self.metrics.rx_frames += 1
            self.metrics.rx_bytes += len(frame)
            return used
        self.metrics.rx_dropped += 1
        return used

    # --- control -----------------------------------------------------------------------

    def process_ctrl(self, q: SplitQueue) -> None:
        mem = self.transport.mem
        done = 0
        while (chain := q.pop(mem)) is not None:
            done += 1
            readable = chain.readable()
            ack = chain.buffers[-1] if chain.buffers and chain.buffers[-1].writable else None
            size = sum(b.length for b in readable)
            if (ack is None or not ack.length
                    or not VIRTIO_NET_CTRL_HDR.size <= size <= CTRL_MAX_BYTES):
                self.metrics.ctrl_malformed += 1
                if ack is not None and ack.length:
                    mem.write(ack.addr, bytes([VIRTIO_NET_ERR]), "ctrl ack")
                q.push(mem, chain.head, 1 if ack is not None and ack.length else 0)
                continue
            data = b"".join(mem.read(b.addr, b.length, "ctrl command") for b in readable)
            status = self._ctrl(*VIRTIO_NET_CTRL_HDR.unpack_from(data))
            mem.write(ack.addr, bytes([status]), "ctrl ack")
            q.push(mem, chain.head, 1)
        if done:
            self.transport.used_notify(q)

    def _ctrl(self, cls: int, cmd: int) -> int:
        if cls == VIRTIO_NET_CTRL_ANNOUNCE and cmd == VIRTIO_NET_CTRL_ANNOUNCE_ACK:
            # virtio_net_handle_announce: the driver has announced itself
            self.status_announce = False
            self.metrics.announce_acks += 1
            self.metrics.ctrl_ok += 1
            return VIRTIO_NET_OK
        self.metrics.ctrl_malformed += 1
        return VIRTIO_NET_ERR
