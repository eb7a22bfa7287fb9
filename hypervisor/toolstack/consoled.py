"""The console daemon's part for one guest (xenconsoled): when the guest
kicks its console port, take what it wrote in the ring's ``out`` half and
hand it to the domain's console."""

from __future__ import annotations

import numpy as np

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.public.io.console import OUT_CONS_OFF, OUT_OFF, OUT_PROD_OFF, XENCONS_OUT_SIZE
from hypervisor.public.io.ring import ring_spans, ring_used
from hypervisor.public.xen import PAGE_SHIFT


class ConsoleBackend:
    def __init__(self, hv: Hypervisor, dom: Domain, ring_mfn: int, port: int) -> None:
        self.hv = hv
        self.dom = dom
        self.move_ring(ring_mfn, port)

    def move_ring(self, ring_mfn: int, port: int) -> None:
        """Map the ring and bind the port (again, after a restore: both are new)."""
        self.ring, self.port = ring_mfn << PAGE_SHIFT, port
        self.page = domctl.map_foreign_range(self.hv, self.dom, ring_mfn)
        domctl.evtchn_bind_backend(self.dom, port, self.notify)

    def _u32(self, off: int) -> int:
        return int.from_bytes(self.page[off:off + 4].tobytes(), "little")

    def notify(self) -> None:
        """xenconsoled's buffer_append: take the output and notify the guest
        (room again: it may wait on it). An empty ring, or indices further
        apart than the ring is long, is left as it is and not notified: a
        notification for nothing would wake a guest that waits for the ring
        to drain, to kick again."""
        cons, prod = self._u32(OUT_CONS_OFF), self._u32(OUT_PROD_OFF)
        n = ring_used(cons, prod)
        if n == 0 or n > XENCONS_OUT_SIZE:
            return
        data = b"".join(self.page[OUT_OFF + off:OUT_OFF + off + chunk].tobytes()
                        for off, chunk in ring_spans(cons, n, XENCONS_OUT_SIZE))
        self.page[OUT_CONS_OFF:OUT_CONS_OFF + 4] = np.frombuffer(prod.to_bytes(4, "little"),
                                                                  dtype=np.uint8)
        domctl.console_write(self.dom, data)
        domctl.evtchn_notify(self.dom, self.port)
