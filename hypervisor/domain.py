"""A domain: its VCPUs, its memory accounting, its event channels, its console,
and how it ends (Xen's struct domain, cut to what pvlab models).

A domain is given what it needs of the hypervisor that runs it: the machine, the
list of every domain (for domain_by_id), the scheduler's clock and wake-up, and
the exits its VCPUs take. It never names the core. It and its VCPUs know each
other, as Xen's struct domain and struct vcpu do: the one import cycle allowed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from unicorn.unicorn_const import UC_CTL_TLB_FLUSH
from unicorn.unicorn_py3.unicorn import uclib

from hypervisor.cpu.vcpu import GuestExits, Vcpu
from hypervisor.evtchn import EventChannels
from hypervisor.mm.memory import PAGE_SHIFT
from hypervisor.public.sched import (
    SHUTDOWN_crash,
    SHUTDOWN_poweroff,
    SHUTDOWN_reboot,
    SHUTDOWN_soft_reset,
    SHUTDOWN_suspend,
    SHUTDOWN_watchdog,
)
from hypervisor.public.xen import shared_info
from hypervisor.watchdog import DomainWatchdog
from hypervisor.xentrace import TraceBuffer

if TYPE_CHECKING:
    from hypervisor.machine import Machine

log = logging.getLogger(__name__)

SHUTDOWN_NAMES = {SHUTDOWN_poweroff: "poweroff", SHUTDOWN_reboot: "reboot",
                  SHUTDOWN_suspend: "suspend", SHUTDOWN_crash: "crash",
                  SHUTDOWN_watchdog: "watchdog", SHUTDOWN_soft_reset: "soft_reset"}

# uc_ctl(UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0)): the binding has no wrapper for it
_UC_CTL_IO_WRITE = 1
_TLB_FLUSH = (_UC_CTL_IO_WRITE << 30) | UC_CTL_TLB_FLUSH


class Scheduling(Protocol):
    """What a domain needs of the scheduler: the time now, waking a VCPU an
    event is pending for, and timers on system time."""

    current: Vcpu | None  # the VCPU running now, if any

    def now(self) -> int: ...
    def kick(self, vcpu: Vcpu) -> None: ...
    def add_timer(self, deadline_ns: int, owner: Any, fn: Callable[[], None]) -> None: ...
    def cancel_timers(self, owner: Any) -> None: ...


class Domain:
    def __init__(self, domid: int, name: str, max_pages: int, nr_vcpus: int, *,
                 machine: Machine, domains: dict[int, Domain], scheduler: Scheduling,
                 exits: GuestExits,
                 on_console: Callable[[Domain, bytes], None] | None = None) -> None:
        self.machine = machine
        self.domains = domains      # every domain of the machine, by id (Xen's domain_list)
        self.scheduler = scheduler
        self.exits = exits          # given to each VCPU
        self.on_console = on_console  # where each console write goes on to
        self.domid = domid
        self.name = name
        self.max_pages = max_pages
        self.vcpus = [Vcpu(self, i, machine) for i in range(nr_vcpus)]
        self.evtchn = EventChannels(self, scheduler.kick)
        self.shared_info_mfn = 0
        self._shared_info: Any = None
        self.grant_table: Any = None      # made on its first grant_table_op
        self.shutdown_reason: int | None = None
        # the reason a guest chose ahead (SCHEDOP_shutdown_code); None is
        # Xen's SHUTDOWN_CODE_INVALID
        self.shutdown_code: int | None = None
        self.watchdog = DomainWatchdog(scheduler, self._watchdog_timeout)
        self.vm_assist = 0                 # VMASST_TYPE_* bits (do_vm_assist)
        self.handle = bytes(16)            # the toolstack's UUID (xen_domain_handle_t)
        self.paused = False
        self.crash_report = ""
        self.console_out = bytearray()     # everything written to its console
        self.native: Any = None            # the bound guest kernel, if any
        self.kernel_module = ""
        # device memory it may map (XEN_DOMCTL_iomem_permission), its devices
        self.iomem: list[range] = []
        self.devices: list[Any] = []
        self.tbuf: TraceBuffer | None = None  # its trace buffer, once the toolstack enables it

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
        t.system_time = self.scheduler.now()
        t.version += 1

    @property
    def tot_pages(self) -> int:
        """Frames in the domain's reservation (shared hypervisor pages excluded)."""
        ft = self.machine.frames
        return int(((ft.owner == self.domid) & ~ft.xenheap).sum())

    # --- console ---------------------------------------------------------------------

    def console_write(self, data: bytes) -> None:
        """Output of the domain's console (its console_io hypercalls, and what the
        console daemon took from its ring): kept, and passed on."""
        self.console_out += data
        if self.tbuf is not None:
            cur = self.scheduler.current
            self.tbuf.console(self.scheduler.now(), cur.vcpu_id if cur is not None else -1, data)
        if self.on_console is not None:
            self.on_console(self, data)

    # --- life and death ----------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self.shutdown_reason is None

    def shutdown(self, reason: int) -> None:
        """Xen's domain_shutdown: a code stored before (SCHEDOP_shutdown_code)
        wins over the reason given, whoever asks (a crash included)."""
        if self.shutdown_code is None:
            self.shutdown_code = reason
        reason = self.shutdown_code
        if self.shutdown_reason is not None:
            return
        self.shutdown_reason = reason
        for v in self.vcpus:
            v.request_stop()
        log.info("domain %d (%s) shut down: %s", self.domid, self.name,
                 SHUTDOWN_NAMES.get(reason, str(reason)))

    def _watchdog_timeout(self) -> None:
        """domain_watchdog_timeout: a watchdog timer expired."""
        if self.is_running:
            log.info("watchdog timer fired for domain %d", self.domid)
            self.shutdown(SHUTDOWN_watchdog)

    def crash(self, vcpu: Vcpu | None, why: str) -> None:
        """Xen's domain_crash: the domain stops, with a report of why."""
        where = f"vcpu{vcpu.vcpu_id}: " if vcpu is not None else ""
        self.crash_report = f"domain {self.domid} ({self.name}) crashed: {where}{why}"
        log.info("%s", self.crash_report)
        self.shutdown(SHUTDOWN_crash)

    # --- other domains, TLBs --------------------------------------------------------

    def domain_by_id(self, domid: int) -> Domain | None:
        """Another domain of the same machine (Xen's rcu_lock_domain_by_id)."""
        return self.domains.get(domid)

    def flush_tlbs(self) -> None:
        """A TLB shootdown (Xen's flush_tlb_mask of the domain's dirty CPUs):
        every VCPU's engine and the machine's software walker."""
        for v in self.vcpus:
            uclib.uc_ctl(v.uc._uch, _TLB_FLUSH)
        self.machine.walker.flush()

    # --- suspend and resume ----------------------------------------------------------

    def suspend(self) -> None:
        """SCHEDOP_shutdown(SHUTDOWN_suspend): the VCPUs stop where they are,
        for the toolstack to save or resume the domain."""
        self.shutdown(SHUTDOWN_suspend)

    def resume(self) -> None:
        """Xen's domain_resume (XEN_DOMCTL_resumedomain): a domain that shut
        down for a suspend runs on, its VCPUs where they stopped (the toolstack
        has set the suspend hypercall's result)."""
        if self.shutdown_reason != SHUTDOWN_suspend:
            raise ValueError(f"domain {self.domid} is not suspended")
        self.shutdown_reason = None
        self.shutdown_code = None

    def close(self) -> None:
        self.watchdog.stop()
        for v in self.vcpus:
            v.close()
        self._shared_info = None


__all__ = ["Domain", "Scheduling", "SHUTDOWN_NAMES"]
