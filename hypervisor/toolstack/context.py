"""The toolstack's own state (libxl's libxl_ctx and what libxl keeps of each
domain): the hypervisor's objects carry none of it, as Xen's struct domain
knows nothing of xenstored or xenconsoled.

One ``ToolstackContext`` per machine handle holds the xenstore (the Store its
domains share) and a ``ToolstackDomain`` per domain it built or restored: its
xenstore connection, its console backend and the sink the console output goes
to, the guest image (its symbols, for the tracer), and where the builder or
restorer put the guest's p2m list (for the frame audit).

The context learns of the machine's events as xenstored and xenconsoled learn
of Xen's, through the global VIRQs it binds with domctl: VIRQ_DOM_EXC when a
domain is destroyed (the toolstack releases its xenstore connection, as
xenstored does on @releaseDomain, and drops the domain's record) and
VIRQ_CON_RING for what a domain writes to its console.

The toolstack's functions are handed ``(hv, dom)``, the handles libxc passes
(xc_interface, domid); ``context_of(hv)`` is the context for a machine
handle, made at the first call. The machine keeps its context alive through
the VIRQ bindings; the registry here holds it weakly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.toolstack.xenstored import Store, XenstoreConnection

if TYPE_CHECKING:
    from hypervisor.toolstack.consoled import ConsoleBackend
    from hypervisor.toolstack.elfimage import GuestImage

ConsoleSink = Callable[[Domain, bytes], None]


@dataclass
class ToolstackDomain:
    """What the toolstack keeps of one domain (libxl's per-domain state)."""

    domid: int
    xenstore: XenstoreConnection | None = None   # its connection to the store
    console: ConsoleBackend | None = None        # the console daemon on its ring
    console_sink: ConsoleSink | None = None      # live console output goes here
    image: GuestImage | None = None              # the image it was built from
    # the guest's p2m list as the builder or restorer laid it out: the frames
    # holding it and its number of entries
    p2m_frames: list[int] = field(default_factory=list)
    p2m_size: int = 0
    # each device's place (savefile.DEVICE_CONFIG_KEYS), in the order made
    devices: list[dict] = field(default_factory=list)


class ToolstackContext:
    """The toolstack's state for one machine (libxl_ctx)."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.store: Store | None = None
        self.domains: dict[int, ToolstackDomain] = {}
        domctl.bind_virq_dom_exc(hv, self._domain_destroyed)
        domctl.bind_virq_con_ring(hv, self._console_output)

    def xenstore(self) -> Store:
        """The machine's store, made with the first domain that needs it."""
        if self.store is None:
            self.store = Store()
        return self.store

    def domain(self, dom: Domain) -> ToolstackDomain:
        """The record of ``dom``, made at the first call."""
        tdom = self.domains.get(dom.domid)
        if tdom is None:
            tdom = self.domains[dom.domid] = ToolstackDomain(dom.domid)
        return tdom

    def p2m_lists(self) -> dict[int, tuple[list[int], int]]:
        """domid -> (the frames of its p2m list, its entries), for the audit."""
        return {domid: (t.p2m_frames, t.p2m_size) for domid, t in self.domains.items()
                if t.p2m_size}

    # --- the VIRQs the toolstack binds -----------------------------------------------

    def _domain_destroyed(self, domid: int) -> None:
        """VIRQ_DOM_EXC: the domain is gone; release its connection (XS_RELEASE:
        its watches, transactions and home) and forget it."""
        tdom = self.domains.pop(domid, None)
        if tdom is not None and tdom.xenstore is not None and self.store is not None:
            self.store.release(tdom.xenstore)
            tdom.xenstore = None

    def _console_output(self, dom: Domain, data: bytes) -> None:
        """VIRQ_CON_RING: what the domain wrote, to the sink of its run."""
        tdom = self.domains.get(dom.domid)
        if tdom is not None and tdom.console_sink is not None:
            tdom.console_sink(dom, data)


_contexts: weakref.WeakValueDictionary[int, ToolstackContext] = weakref.WeakValueDictionary()


def context_of(hv: Hypervisor) -> ToolstackContext:
    """The toolstack's context for the machine ``hv``."""
    ctx = _contexts.get(id(hv))
    if ctx is None or ctx.hv is not hv:
        ctx = _contexts[id(hv)] = ToolstackContext(hv)
    return ctx


def domain_of(hv: Hypervisor, dom: Domain) -> ToolstackDomain:
    """What the toolstack keeps of ``dom``."""
    return context_of(hv).domain(dom)


def audit(hv: Hypervisor, p2m: bool = True) -> list[str]:
    """The hypervisor's frame audit, the p2m check given the p2m lists the
    toolstack recorded (``p2m=False``: none, for a guest caught mid-change)."""
    return domctl.audit(hv, context_of(hv).p2m_lists() if p2m else {})


__all__ = ["ConsoleSink", "ToolstackContext", "ToolstackDomain", "audit", "context_of",
           "domain_of"]
