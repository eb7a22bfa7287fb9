"""The console daemon's part for one guest (xenconsoled): when the guest
kicks its console port, take what it wrote in the ring's ``out`` half and
hand it to the domain's console."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.public.io.console import OUT_CONS_OFF, OUT_OFF, OUT_PROD_OFF, XENCONS_OUT_SIZE
from hypervisor.public.io.ring import ring_spans, ring_used

if TYPE_CHECKING:
    from hypervisor.domain import Domain


class ConsoleBackend:
    def __init__(self, dom: Domain, ring_mfn: int, port: int) -> None:
        self.dom = dom
        self.mem = dom.hypervisor.machine.memory
        self.move_ring(ring_mfn, port)

    def move_ring(self, ring_mfn: int, port: int) -> None:
        """Bind (again, after a restore: the page and the port are new)."""
        self.ring, self.port = ring_mfn << 12, port
        self.dom.evtchn.bind_backend(port, self.notify)

    def notify(self) -> None:
        cons = int.from_bytes(self.mem.read(self.ring + OUT_CONS_OFF, 4), "little")
        prod = int.from_bytes(self.mem.read(self.ring + OUT_PROD_OFF, 4), "little")
        n = ring_used(cons, prod)
        if n > XENCONS_OUT_SIZE:
            n = XENCONS_OUT_SIZE  # a confused guest: take one ringful, as xenconsoled does
            cons = (prod - n) & 0xFFFFFFFF
        data = b"".join(self.mem.read(self.ring + OUT_OFF + off, chunk)
                        for off, chunk in ring_spans(cons, n, XENCONS_OUT_SIZE))
        self.mem.write(self.ring + OUT_CONS_OFF, prod.to_bytes(4, "little"))
        if data:
            self.dom.console_write(data)
        self.dom.evtchn.set_pending(self.port)  # room again: the guest may wait on it
