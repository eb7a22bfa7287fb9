"""The console daemon's part for one guest (xenconsoled): when the guest
kicks its console port, take what it wrote in the ring's ``out`` half and
hand it to the domain's console; what is typed at the console goes into the
ring's ``in`` half.

Input (xenconsoled's handle_tty_read): ``feed`` queues the bytes and moves as
many as the ``in`` half has room for, then notifies the guest; the rest
waits here and moves when the guest kicks the port again, which its driver
does after it has taken input (Linux's domU_read_console). Every way input
reaches a guest goes through ``feed``: a scripted ``type`` request, a
person at ``pvlab run --console``. The queue is the daemon's, not the
guest's: a save does not carry it (docs/image.md)."""

from __future__ import annotations

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.io.console import (
    IN_CONS_OFF,
    IN_OFF,
    IN_PROD_OFF,
    OUT_CONS_OFF,
    OUT_OFF,
    OUT_PROD_OFF,
    XENCONS_IN_SIZE,
    XENCONS_OUT_SIZE,
)
from hypervisor.public.io.ring import ring_spans, ring_used
from hypervisor.public.xen import PAGE_SHIFT


class ConsoleBackend:
    def __init__(self, hv: Hypervisor, dom: Domain, ring_mfn: int, port: int) -> None:
        self.hv = hv
        self.dom = dom
        self.pending_input = bytearray()  # typed, not yet in the ring
        self.move_ring(ring_mfn, port)

    def move_ring(self, ring_mfn: int, port: int) -> None:
        """Map the ring and bind the port (again, after a restore: both are new)."""
        self.ring, self.port = ring_mfn << PAGE_SHIFT, port
        self.page = domctl.map_foreign_range(self.hv, self.dom, ring_mfn)
        domctl.evtchn_bind_backend(self.dom, port, self.notify)

    def _u32(self, off: int) -> int:
        return int.from_bytes(self.page[off:off + 4].tobytes(), "little")

    def _set_u32(self, off: int, value: int) -> None:
        """An index written (after the data it publishes): the ring's page
        was written, which log-dirty must see (modified_memory)."""
        self.page[off:off + 4] = np.frombuffer((value & 0xFFFFFFFF).to_bytes(4, "little"),
                                               dtype=np.uint8)
        pfn = int(domctl.map_m2p(self.hv)[self.ring >> PAGE_SHIFT])
        domctl.modified_memory(self.hv, self.dom, pfn, 1)

    def notify(self) -> None:
        """The guest kicked its port: take its output, move waiting input,
        and notify it if either did anything (room again: it may wait on
        it; input: its handler takes it)."""
        took = self._take_output()
        moved = self._move_input()
        if took or moved:
            domctl.evtchn_notify(self.dom, self.port)

    def _take_output(self) -> bool:
        """xenconsoled's buffer_append. An empty ring, or indices further
        apart than the ring is long, is left as it is: a notification for
        nothing would wake a guest that waits for the ring to drain, to kick
        again."""
        cons, prod = self._u32(OUT_CONS_OFF), self._u32(OUT_PROD_OFF)
        n = ring_used(cons, prod)
        if n == 0 or n > XENCONS_OUT_SIZE:
            return False
        data = b"".join(self.page[OUT_OFF + off:OUT_OFF + off + chunk].tobytes()
                        for off, chunk in ring_spans(cons, n, XENCONS_OUT_SIZE))
        self._set_u32(OUT_CONS_OFF, prod)
        domctl.console_write(self.dom, data)
        return True

    def feed(self, data: bytes) -> None:
        """Input for the guest: into the ring as far as it has room, the
        rest queued; the guest is notified if anything moved."""
        self.pending_input += data
        if self._move_input():
            domctl.evtchn_notify(self.dom, self.port)

    def _move_input(self) -> bool:
        """handle_tty_read: queued bytes into ``in``, up to its free space,
        the producer index written after the data. Indices further apart
        than the ring is long (a guest that broke them) take nothing."""
        cons, prod = self._u32(IN_CONS_OFF), self._u32(IN_PROD_OFF)
        used = ring_used(cons, prod)
        if not self.pending_input or used >= XENCONS_IN_SIZE:
            return False
        n = min(XENCONS_IN_SIZE - used, len(self.pending_input))
        sent = 0
        for off, chunk in ring_spans(prod, n, XENCONS_IN_SIZE):
            self.page[IN_OFF + off:IN_OFF + off + chunk] = np.frombuffer(
                bytes(self.pending_input[sent:sent + chunk]), dtype=np.uint8)
            sent += chunk
        self._set_u32(IN_PROD_OFF, prod + n)
        del self.pending_input[:n]
        return True
