"""A domain: its VCPUs, its memory accounting, its event channels, its console,
and how it ends (Xen's struct domain, cut to what pvlab models)."""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Any

from hypervisor.cpu.vcpu import Vcpu
from hypervisor.evtchn import EventChannels
from hypervisor.mm.memory import PAGE_SHIFT
from hypervisor.public.sched import SHUTDOWN_crash
from hypervisor.public.xen import shared_info

if TYPE_CHECKING:
    from hypervisor.core import Hypervisor

log = logging.getLogger(__name__)

SHUTDOWN_NAMES = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog",
                  5: "soft_reset"}


class Domain:
    def __init__(self, hypervisor: Hypervisor, domid: int, name: str,
                 max_pages: int, nr_vcpus: int) -> None:
        self.hypervisor = hypervisor
        self.machine = hypervisor.machine
        self.domid = domid
        self.name = name
        self.max_pages = max_pages
        self.vcpus = [Vcpu(self, i, self.machine) for i in range(nr_vcpus)]
        self.evtchn = EventChannels(self)
        self.shared_info_mfn = 0
        self._shared_info: Any = None
        self.shutdown_reason: int | None = None
        self.paused = False
        self.crash_report = ""
        self.console_out = bytearray()
        self.console_sink: Any = None      # callable(bytes) for live output
        self.native: Any = None            # the bound guest kernel, if any
        self.kernel_module = ""
        # the toolstack's backends on this domain's rings (consoled, xenstored)
        self.console_backend: Any = None
        self.xenstore: Any = None
        # the guest's p2m list as its builder or restorer laid it out: the
        # frames holding it and its entries (for the invariant audit)
        self.p2m_frames: list[int] = []
        self.p2m_size = 0
        # device memory it may map (XEN_DOMCTL_iomem_permission), its devices
        self.iomem: list[range] = []
        self.devices: list[Any] = []

    # --- shared_info -----------------------------------------------------------------

    def set_shared_info(self, mfn: int) -> None:
        self.shared_info_mfn = mfn
        self._shared_info = shared_info.from_buffer(self.machine.memory.buf,
                                                    mfn << PAGE_SHIFT)

    @property
    def shared_info(self) -> Any:
        return self._shared_info

    def update_time(self, vcpu: Vcpu) -> None:
        """Publish system time in vcpu_info (version odd while it changes)."""
        t = self._shared_info.vcpu_info[vcpu.vcpu_id].time
        t.version += 1
        t.system_time = vcpu.clock
        t.version += 1

    def update_time_now(self, vcpu: Vcpu) -> None:
        """As update_time, mid-slice: the clock plus what the slice retired."""
        t = self._shared_info.vcpu_info[vcpu.vcpu_id].time
        t.version += 1
        t.system_time = self.hypervisor.scheduler.now()
        t.version += 1

    @property
    def tot_pages(self) -> int:
        """Frames in the domain's reservation (shared hypervisor pages excluded)."""
        ft = self.machine.frames
        return int(((ft.owner == self.domid) & ~ft.xenheap).sum())

    # --- console ---------------------------------------------------------------------

    def console_write(self, data: bytes) -> None:
        self.console_out += data
        if self.console_sink is not None:
            self.console_sink(self, data)

    # --- life and death ----------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self.shutdown_reason is None

    def shutdown(self, reason: int) -> None:
        if self.shutdown_reason is not None:
            return
        self.shutdown_reason = reason
        for v in self.vcpus:
            v.request_stop()
        log.info("domain %d (%s) shut down: %s", self.domid, self.name,
                 SHUTDOWN_NAMES.get(reason, str(reason)))

    def crash(self, vcpu: Vcpu | None, why: str) -> None:
        """Xen's domain_crash: the domain stops, with a report of why."""
        where = f"vcpu{vcpu.vcpu_id}: " if vcpu is not None else ""
        self.crash_report = f"domain {self.domid} ({self.name}) crashed: {where}{why}"
        log.info("%s", self.crash_report)
        self.shutdown(SHUTDOWN_crash)

    # --- rebuilding the VCPUs from their records ---------------------------------------

    # what Xen keeps per vcpu beside the context record: scheduling state
    _SCHED_STATE = ("online", "initialised", "blocked", "timer_deadline", "clock")

    def rebuild_vcpus(self) -> None:
        """Throw away every VCPU object (engine, hooks, Python state) and the
        binding of the guest kernel, and make them anew from the VCPUs' context
        records and the hypervisor's scheduling state alone. The guest must go
        on as if nothing happened: the test of DESIGN.md's rule 2, and the
        path a restore takes in a new process."""
        from hypervisor.cpu.context import get_context, set_context
        from hypervisor.native import NativeKernel
        records = [(bytes(get_context(v)) if v.guest_table else None,
                    {k: getattr(v, k) for k in self._SCHED_STATE}) for v in self.vcpus]
        for v in self.vcpus:
            v.close()
        self.hypervisor.scheduler.current = None
        self.vcpus = [Vcpu(self, i, self.machine) for i in range(len(records))]
        for v in self.vcpus:
            for dev in self.devices:
                v.map_mmio(dev.base)
        if self.native is not None:
            old = self.native
            self.native = NativeKernel(self, self.kernel_module, old.text, old.size)
            for v in self.vcpus:
                self.native.bind(v)
        for v, (ctx, state) in zip(self.vcpus, records, strict=True):
            if ctx is not None:
                set_context(v, ctx, take_refs=False)
            for k, value in state.items():
                setattr(v, k, value)

    def close(self) -> None:
        if self.xenstore is not None:
            self.xenstore.store.release(self.xenstore)
            self.xenstore = None
        for v in self.vcpus:
            v.close()
        self._shared_info = None


__all__ = ["Domain", "ctypes"]
