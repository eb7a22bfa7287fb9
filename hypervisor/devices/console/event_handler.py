"""The console's queue notifications: the control transmitq (the driver's
control messages), the ports' transmitqs (output to the host) and receiveqs
(buffers for input). Mixed into Console, as the balloon's event_handler.py
is mixed into Balloon.

The control protocol is QEMU's (hw/char/virtio-serial-bus.c,
handle_control_message): DEVICE_READY 1 is answered with a DEVICE_ADD for
every port; PORT_READY 1 with CONSOLE_PORT (a console port), PORT_NAME and,
if the host side is open, PORT_OPEN 1; PORT_OPEN from the driver says
whether the guest has the port open. Everything is served inside the
notify: Linux's driver spins until its control buffer is used.

A message shorter than 8 bytes, of an event the driver does not send, or
naming a port that does not exist is counted (bad_control) and used; a
buffer of the wrong direction or larger than any message is counted
(malformed) and used unread. No message the guest writes raises on the host.
"""

from __future__ import annotations

import logging

from hypervisor.devices.console.backend import Port
from hypervisor.devices.console.metrics import ConsoleMetrics
from hypervisor.devices.virtio.mmio import VirtioMmio
from hypervisor.devices.virtio.queue import Chain, SplitQueue
from hypervisor.public.io.virtio_console import (
    VIRTIO_CONSOLE_CONSOLE_PORT,
    VIRTIO_CONSOLE_CONTROL,
    VIRTIO_CONSOLE_CTRL_RXQ,
    VIRTIO_CONSOLE_CTRL_TXQ,
    VIRTIO_CONSOLE_DEVICE_ADD,
    VIRTIO_CONSOLE_DEVICE_READY,
    VIRTIO_CONSOLE_EVENT_NAMES,
    VIRTIO_CONSOLE_PORT_NAME,
    VIRTIO_CONSOLE_PORT_OPEN,
    VIRTIO_CONSOLE_PORT_READY,
    port_rxq,
    port_txq,
    queue_port,
)

log = logging.getLogger(__name__)

CONTROL_MAX_BYTES = 64       # a driver's control message is 8 bytes
TX_MAX_BYTES = 1 << 16       # one output buffer chain: Linux sends at most 32 KiB
RX_READ_MAX = 1 << 16        # host input read into one rx chain at a time, whatever room
                             # the guest claims (its descriptors may name 4 GiB)


def _readable(chain: Chain) -> int:
    return sum(b.length for b in chain.readable())


class ConsoleEventHandler:
    """Queue notifications of the console (mixed into Console)."""

    transport: VirtioMmio
    metrics: ConsoleMetrics
    ports: dict[int, Port]
    domid: int

    def handle_queue(self, q: SplitQueue) -> None:
        """The driver notified ``q``; a RingError goes up to the transport."""
        if q.index == VIRTIO_CONSOLE_CTRL_TXQ:
            self.handle_control(q)
        elif q.index == VIRTIO_CONSOLE_CTRL_RXQ:
            return  # buffers for control messages: used when one is sent
        else:
            port = self.ports.get(queue_port(q.index) or 0)
            if q.index % 2:
                self.handle_output(q, port)
            elif port is not None:
                self.serve_rx(port)

    # --- the control queues ---------------------------------------------------------

    def handle_control(self, q: SplitQueue) -> None:
        mem = self.transport.mem
        done = 0
        while (chain := q.pop(mem)) is not None:
            size = _readable(chain)
            if any(b.writable for b in chain.buffers) or size > CONTROL_MAX_BYTES:
                self.metrics.malformed += 1
            else:
                data = b"".join(mem.read(b.addr, b.length, "control message")
                                for b in chain.buffers)
                self._control_message(data)
            q.push(mem, chain.head, 0)
            done += 1
        if done:
            self.transport.used_notify(q)

    def _control_message(self, data: bytes) -> None:
        """One message from the driver (handle_control_message)."""
        if len(data) < VIRTIO_CONSOLE_CONTROL.size:
            self._bad(f"a control message of {len(data)} bytes")
            return
        pid, event, value = VIRTIO_CONSOLE_CONTROL.unpack_from(data)
        if event == VIRTIO_CONSOLE_DEVICE_READY:
            self.metrics.control_in += 1
            if not value:
                self.metrics.guest_failures += 1
                log.info("d%d virtio-console: the guest failed to add the device", self.domid)
                return
            for port in self.ports.values():
                self.send_control(port.id, VIRTIO_CONSOLE_DEVICE_ADD, 1)
            return
        port = self.ports.get(pid)
        if port is None or event not in (VIRTIO_CONSOLE_PORT_READY, VIRTIO_CONSOLE_PORT_OPEN):
            name = VIRTIO_CONSOLE_EVENT_NAMES[event] if event < 8 else f"event {event}"
            self._bad(f"{name} for port {pid}")
            return
        self.metrics.control_in += 1
        if event == VIRTIO_CONSOLE_PORT_READY:
            if not value:
                self.metrics.guest_failures += 1
                log.info("d%d virtio-console: the guest failed to add port %d", self.domid,
                         pid)
                return
            self.port_ready(port)
        else:
            self.guest_open(port, bool(value))

    def _bad(self, what: str) -> None:
        self.metrics.bad_control += 1
        log.info("d%d virtio-console: control message refused: %s", self.domid, what)

    def port_ready(self, port: Port) -> None:
        """PORT_READY 1: tell the driver what the port is and whether the
        host side is open (asked afresh: a client may have come or gone, and
        the answer carries it)."""
        self.refresh(port, tell=False)
        if port.console:
            self.send_control(port.id, VIRTIO_CONSOLE_CONSOLE_PORT, 1)
        self.send_control(port.id, VIRTIO_CONSOLE_PORT_NAME, 1, port.name.encode())
        if port.backend.connected:
            self.send_control(port.id, VIRTIO_CONSOLE_PORT_OPEN, 1)

    def guest_open(self, port: Port, opened: bool) -> None:
        port.guest_connected = opened
        if opened:
            self.serve_rx(port)

    def send_control(self, pid: int, event: int, value: int, extra: bytes = b"") -> bool:
        """A message into the control receiveq's next buffer (send_control_msg);
        dropped and counted if there is none ready, as QEMU drops it."""
        t = self.transport
        q = t.queues[VIRTIO_CONSOLE_CTRL_RXQ]
        msg = VIRTIO_CONSOLE_CONTROL.pack(pid, event, value) + extra
        if not t.live or not q.ready:
            self.metrics.control_dropped += 1
            return False
        chain = q.pop(t.mem)
        if chain is None:
            self.metrics.control_dropped += 1
            return False
        written = self._fill(chain, msg)
        if written < len(msg):
            self.metrics.malformed += 1  # a buffer too small (or not writable)
        q.push(t.mem, chain.head, written)
        t.used_notify(q)
        self.metrics.control_out += 1
        return True

    def _fill(self, chain: Chain, data: bytes) -> int:
        """Write ``data`` across the chain's device-writable buffers; how much fitted."""
        mem = self.transport.mem
        done = 0
        for b in chain.buffers:
            if not b.writable or done == len(data):
                continue
            piece = data[done:done + b.length]
            mem.write(b.addr, piece, "console input buffer")
            done += len(piece)
        return done

    # --- data -----------------------------------------------------------------------

    def handle_output(self, q: SplitQueue, port: Port | None) -> None:
        """Output buffers (handle_output): to the host if its side is open,
        else discarded; each used with length 0. A buffer the host takes
        only part of is held and the queue waits (the port is throttled)
        until the poll has sent the rest (``flush_output``)."""
        mem = self.transport.mem
        if port is not None and port.tx_held is not None:
            return  # throttled: the poll goes on when the client reads
        done = 0
        while (chain := q.pop(mem)) is not None:
            size = _readable(chain)
            if any(b.writable for b in chain.buffers) or size > TX_MAX_BYTES:
                self.metrics.malformed += 1
            elif port is None or not port.backend.connected:
                self.metrics.tx_discarded += size
            else:
                data = b"".join(mem.read(b.addr, b.length, "console output buffer")
                                for b in chain.buffers)
                took = port.backend.write(data)
                self.metrics.tx_bytes += took
                if took < len(data) and port.backend.throttles and not port.console:
                    port.tx_held, port.tx_data, port.tx_done = chain, data, took
                    self.metrics.tx_throttled += 1
                    break
                self.metrics.tx_dropped += len(data) - took
            q.push(mem, chain.head, 0)
            done += 1
        if done:
            self.transport.used_notify(q)

    def flush_output(self, port: Port) -> None:
        """The held output buffer's rest to the host, as far as it takes it;
        once all is sent the buffer is used and the queue goes on
        (virtio_serial_throttle_port(false), do_flush_queued_data)."""
        if port.tx_held is None:
            return
        t = self.transport
        q = t.queues[port_txq(port.id)]
        if not t.live or not q.ready:
            return
        if not port.backend.connected:
            self._discard_held(port)
            return
        took = port.backend.write(port.tx_data[port.tx_done:])
        self.metrics.tx_bytes += took
        port.tx_done += took
        if port.tx_done < len(port.tx_data):
            return
        q.push(t.mem, port.tx_held.head, 0)
        port.tx_held, port.tx_data, port.tx_done = None, b"", 0
        t.used_notify(q)
        self.handle_output(q, port)

    def _discard_held(self, port: Port) -> None:
        """The client went: the held output's rest discarded and the buffer
        used (virtio_serial_close discards pending guest output)."""
        if port.tx_held is None:
            return
        t = self.transport
        self.metrics.tx_discarded += len(port.tx_data) - port.tx_done
        q = t.queues[port_txq(port.id)]
        if t.live and q.ready:
            q.push(t.mem, port.tx_held.head, 0)
            t.used_notify(q)
        port.tx_held, port.tx_data, port.tx_done = None, b"", 0

    def serve_rx(self, port: Port) -> None:
        """Host input into the port's receive buffers, while the guest has
        the port open and buffers are there. A buffer taken when no input
        is ready is held (``port.rx_held``) until some comes. A client's end
        of file closes the host side only in a round that gave no input, so
        the guest sees the input (and may answer it) before the close."""
        t = self.transport
        q = t.queues[port_rxq(port.id)]
        if not t.live or not q.ready or not port.guest_connected:
            return
        done = 0
        while True:
            chain = port.rx_held if port.rx_held is not None else q.pop(t.mem)
            if chain is None:
                break
            port.rx_held = None
            room = sum(b.length for b in chain.buffers if b.writable)
            if not room:  # no byte it could take: used empty, never held for ever
                self.metrics.malformed += 1
                q.push(t.mem, chain.head, 0)
                done += 1
                continue
            want = min(room, RX_READ_MAX)
            data = port.backend.read(want) if not done else port.backend.read_data(want)
            if data is None:
                port.rx_held = chain
                break
            if data == b"":  # the client's end of file: after the guest took the rest
                port.rx_held = chain
                self.host_closed(port)
                break
            written = self._fill(chain, data)
            q.push(t.mem, chain.head, written)
            self.metrics.rx_bytes += written
            done += 1
        if done:
            t.used_notify(q)

    # --- the host side ----------------------------------------------------------------

    def refresh(self, port: Port, tell: bool = True) -> None:
        """A client came or went at the port's backend: tell the driver
        (virtio_serial_open, virtio_serial_close)."""
        event = port.backend.refresh()
        if event == "connected":
            self.metrics.connects += 1
            if tell:
                self.send_control(port.id, VIRTIO_CONSOLE_PORT_OPEN, 1)
        elif event == "disconnected":
            self.host_closed(port, tell)

    def host_closed(self, port: Port, tell: bool = True) -> None:
        """The client went: PORT_OPEN 0, held output discarded."""
        self.metrics.disconnects += 1
        self._discard_held(port)
        if tell:
            self.send_control(port.id, VIRTIO_CONSOLE_PORT_OPEN, 0)
