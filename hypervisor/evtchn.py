"""Event channels, Xen's 2-level ABI (xen/common/event_channel.c, event_2l.c).

Pending and mask bits live in the domain's shared_info page, where the guest
reads and writes them directly; the per-vcpu selector word and upcall flag live
in vcpu_info. Setting a port pending raises an upcall on the vcpu it is bound to
unless the port is masked; the upcall itself is delivered by the trap code on
the way back into the guest.

The table is given its domain (through the little it needs of one, below) and
the scheduler's kick; it names neither class.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hypervisor.public.errno import EBUSY, EEXIST, EINVAL, ENOENT, ENOSPC
from hypervisor.public.xen import (
    NR_EVENT_CHANNELS,
    VIRQ_DEBUG,
    VIRQ_TIMER,
    VIRQ_XENOPROF,
    VIRQ_XENPMU,
)

BITS_PER_WORD = 64
DOMID_TOOLSTACK = 0  # the other end of a guest's console and xenstore channels
# Xen allocates ports a bucket at a time (PAGE_SIZE over struct evtchn, 64
# bytes in the default build) and every port of an allocated bucket is valid
# (port_is_valid), free ones and port 0 included; the first bucket exists from
# the start (evtchn_init)
EVTCHNS_PER_BUCKET = 64


class PortState(enum.IntEnum):
    """ECS_* in Xen's struct evtchn."""

    free = 0
    reserved = 1
    unbound = 2
    interdomain = 3
    pirq = 4
    virq = 5
    ipi = 6


@dataclass
class Port:
    state: PortState = PortState.free
    vcpu: int = 0
    virq: int = 0
    remote_dom: int = 0
    remote_port: int = 0


# per-vcpu virqs may be bound on any vcpu and never move; global ones are bound
# on vcpu 0 (Xen's virq_is_global)
PER_VCPU_VIRQS = frozenset({VIRQ_TIMER, VIRQ_DEBUG, VIRQ_XENOPROF, VIRQ_XENPMU})


class EvtchnDomain(Protocol):
    """What an event-channel table needs of its domain."""

    domid: int
    vcpus: Sequence[Any]
    evtchn: EventChannels

    @property
    def shared_info(self) -> Any: ...
    def domain_by_id(self, domid: int) -> EvtchnDomain | None: ...


class EventChannels:
    """The event-channel table of one domain."""

    def __init__(self, domain: EvtchnDomain, kick: Callable[[Any], None]) -> None:
        self.domain = domain
        self.kick = kick    # the scheduler's: wake a VCPU an upcall is pending for
        # port 0 is never used
        self.ports = [Port(PortState.reserved)] + [Port() for _ in range(EVTCHNS_PER_BUCKET - 1)]
        self.virqs: dict[tuple[int, int], int] = {}  # (vcpu, virq) -> port
        # ports whose far end is a toolstack backend (consoled, xenstored):
        # a send runs the backend at once, inside the guest's hypercall
        self.backends: dict[int, Callable[[], None]] = {}

    # --- allocation ---------------------------------------------------------------

    def _alloc(self) -> int:
        for port, p in enumerate(self.ports):
            if p.state == PortState.free:
                return port
        if len(self.ports) >= NR_EVENT_CHANNELS:
            return -ENOSPC
        port = len(self.ports)
        self._grow(port)
        return port

    def _grow(self, port: int) -> None:
        """Allocate buckets up to the one holding ``port`` (evtchn_allocate_port)."""
        while len(self.ports) <= port:
            self.ports += [Port() for _ in range(EVTCHNS_PER_BUCKET)]

    def valid(self, port: int) -> bool:
        """Xen's port_is_valid: within the allocated buckets."""
        return 0 <= port < len(self.ports)

    def is_pending(self, port: int) -> bool:
        return self._test(self.domain.shared_info.evtchn_pending, port)

    def bind_virq(self, virq: int, vcpu: int) -> int:
        if vcpu >= len(self.domain.vcpus):
            return -ENOENT
        if (vcpu, virq) in self.virqs:
            return -EEXIST
        port = self._alloc()
        if port < 0:
            return port
        self.ports[port] = Port(PortState.virq, vcpu=vcpu, virq=virq)
        self.virqs[(vcpu, virq)] = port
        return port

    def bind_ipi(self, vcpu: int) -> int:
        if vcpu >= len(self.domain.vcpus):
            return -ENOENT
        port = self._alloc()
        if port < 0:
            return port
        self.ports[port] = Port(PortState.ipi, vcpu=vcpu)
        return port

    def alloc_unbound(self, remote_dom: int) -> int:
        """A port for ``remote_dom`` to bind (DOMID_SELF resolved by the caller)."""
        port = self._alloc()
        if port < 0:
            return port
        self.ports[port] = Port(PortState.unbound, remote_dom=remote_dom)
        return port

    def alloc_unbound_at(self, port: int, remote_dom: int) -> int:
        """alloc_unbound at a chosen port (a restorer re-creating a device whose
        port the guest knows from its command line); -EBUSY if it is taken."""
        if not 0 < port < NR_EVENT_CHANNELS:
            return -EINVAL
        self._grow(port)
        if self.ports[port].state != PortState.free:
            return -EBUSY
        self.ports[port] = Port(PortState.unbound, remote_dom=remote_dom)
        return port

    def bind_backend(self, port: int, notify: Callable[[], None]) -> None:
        """The toolstack side binds a port the builder left unbound for it, as
        xenconsoled and xenstored do with EVTCHNOP_bind_interdomain."""
        p = self.ports[port]
        if p.state != PortState.unbound or p.remote_dom != DOMID_TOOLSTACK:
            raise ValueError(f"port {port} is not unbound for the toolstack")
        p.state = PortState.interdomain
        self.backends[port] = notify

    def close(self, port: int) -> int:
        if not self.valid(port):
            return -EINVAL
        p = self.ports[port]
        if p.state == PortState.free:
            return -EINVAL
        if p.state == PortState.reserved:
            return -EINVAL
        if p.state == PortState.virq:
            # bound on one vcpu's table, perhaps since moved (bind_vcpu)
            del self.virqs[next(k for k, v in self.virqs.items() if v == port)]
        if p.state == PortState.interdomain and self.backends.pop(port, None) is None:
            peer = self.domain.domain_by_id(p.remote_dom)
            if peer is not None:
                far = peer.evtchn.ports[p.remote_port]
                peer.evtchn.ports[p.remote_port] = Port(PortState.unbound, vcpu=far.vcpu,
                                                        remote_dom=self.domain.domid)
        self.ports[port] = Port()
        # Xen clears the pending bit when a port is freed
        self._clear_bit(self.domain.shared_info.evtchn_pending, port)
        return 0

    def bind_vcpu(self, port: int, vcpu: int) -> int:
        """evtchn_bind_vcpu: the vcpu is checked first; a global VIRQ's port,
        an unbound or an interdomain port moves, nothing else does."""
        if vcpu >= len(self.domain.vcpus):
            return -ENOENT
        if not self.valid(port):
            return -EINVAL
        p = self.ports[port]
        if p.state == PortState.virq and p.virq in PER_VCPU_VIRQS:
            return -EINVAL
        if p.state not in (PortState.virq, PortState.unbound, PortState.interdomain):
            return -EINVAL
        p.vcpu = vcpu
        return 0

    def bind_interdomain(self, remote: EvtchnDomain, remote_port: int) -> int:
        """evtchn_bind_interdomain: bind a new local port to ``remote``'s port
        that was left unbound for this domain (itself too: a loopback). Xen
        then sets the local port pending, as notifications to the unbound port
        may have been lost."""
        port = self._alloc()
        if port < 0:
            return port
        rev = remote.evtchn
        if not rev.valid(remote_port):
            return -EINVAL
        rp = rev.ports[remote_port]
        if rp.state != PortState.unbound or rp.remote_dom != self.domain.domid:
            return -EINVAL
        self.ports[port] = Port(PortState.interdomain, remote_dom=remote.domid,
                                remote_port=remote_port)
        rev.ports[remote_port] = Port(PortState.interdomain, vcpu=rp.vcpu,
                                      remote_dom=self.domain.domid, remote_port=port)
        self.set_pending(port)
        return port

    # --- sending ------------------------------------------------------------------

    def send(self, port: int) -> int:
        if not self.valid(port):
            return -EINVAL
        p = self.ports[port]
        if p.state == PortState.ipi:
            self.set_pending(port)
        elif p.state == PortState.interdomain:
            backend = self.backends.get(port)
            if backend is not None:
                backend()
                return 0
            peer = self.domain.domain_by_id(p.remote_dom)
            if peer is not None:
                peer.evtchn.set_pending(p.remote_port)
        elif p.state == PortState.unbound:
            pass  # silently dropped, as in Xen
        else:
            return -EINVAL
        return 0

    def send_virq(self, vcpu: int, virq: int) -> None:
        port = self.virqs.get((vcpu, virq))
        if port is not None:
            self.set_pending(port)

    # --- the 2-level bitmaps -------------------------------------------------------

    @staticmethod
    def _test_and_set(words: object, bit: int) -> bool:
        w, b = divmod(bit, BITS_PER_WORD)
        old = words[w]  # type: ignore[index]
        words[w] = old | (1 << b)  # type: ignore[index]
        return bool(old >> b & 1)

    @staticmethod
    def _test(words: object, bit: int) -> bool:
        w, b = divmod(bit, BITS_PER_WORD)
        return bool(words[w] >> b & 1)  # type: ignore[index]

    @staticmethod
    def _clear_bit(words: object, bit: int) -> None:
        w, b = divmod(bit, BITS_PER_WORD)
        words[w] &= ~(1 << b) & 0xFFFFFFFFFFFFFFFF  # type: ignore[index]

    def set_pending(self, port: int) -> None:
        """evtchn_2l_set_pending: the selector bit and the upcall unless the
        port is masked; a VCPU polling for the port wakes even if it is."""
        shinfo = self.domain.shared_info
        if self._test_and_set(shinfo.evtchn_pending, port):
            return
        if not self._test(shinfo.evtchn_mask, port):
            vcpu = self.domain.vcpus[self.ports[port].vcpu]
            vi = shinfo.vcpu_info[vcpu.vcpu_id]
            sel = vi.evtchn_pending_sel
            w = port // BITS_PER_WORD
            if not sel >> w & 1:
                vi.evtchn_pending_sel = sel | (1 << w)
                self.mark_events_pending(vcpu)
        self.check_pollers(port)

    def check_pollers(self, port: int) -> None:
        """evtchn_check_pollers: wake each VCPU polling for this port, or for
        any (a poll of other than one port)."""
        for v in self.domain.vcpus:
            if v.poll_evtchn and (v.poll_evtchn < 0 or v.poll_evtchn == port):
                self.kick(v)

    def mark_events_pending(self, vcpu: Any) -> None:
        vi = self.domain.shared_info.vcpu_info[vcpu.vcpu_id]
        if vi.evtchn_upcall_pending:
            return
        vi.evtchn_upcall_pending = 1
        self.kick(vcpu)

    def unmask(self, port: int) -> int:
        if not self.valid(port):
            return -EINVAL
        shinfo = self.domain.shared_info
        w, b = divmod(port, BITS_PER_WORD)
        if not shinfo.evtchn_mask[w] >> b & 1:
            return 0
        self._clear_bit(shinfo.evtchn_mask, port)
        if self._test(shinfo.evtchn_pending, port):
            vcpu = self.domain.vcpus[self.ports[port].vcpu]
            vi = shinfo.vcpu_info[vcpu.vcpu_id]
            if not vi.evtchn_pending_sel >> w & 1:
                vi.evtchn_pending_sel |= 1 << w
                self.mark_events_pending(vcpu)
        return 0

    def status(self, port: int) -> Port | int:
        if not self.valid(port):
            return -EINVAL
        return self.ports[port]


__all__ = ["EventChannels", "PER_VCPU_VIRQS", "Port", "PortState", "EBUSY"]
