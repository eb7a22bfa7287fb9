"""The hypervisor: machine, domains, the hypercall dispatcher and the way back
into a guest. One object per machine; everything runs on one host thread
(Unicorn engines on several threads lose ``lock``-prefixed updates)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from hypervisor import emulate, traps
from hypervisor.cpu.context import get_context, set_context
from hypervisor.cpu.vcpu import X86_EXC_PF, Vcpu
from hypervisor.devices.bus import MmioBus
from hypervisor.domain import Domain
from hypervisor.hypercalls.callback import (
    do_callback_op,
    do_set_callbacks,
    do_set_trap_table,
    do_stack_switch,
)
from hypervisor.hypercalls.console import do_console_io
from hypervisor.hypercalls.control import do_domctl, do_sysctl
from hypervisor.hypercalls.descriptor_tables import (
    do_set_gdt,
    do_update_descriptor,
    segdesc_validator,
)
from hypervisor.hypercalls.evtchn import do_event_channel_op
from hypervisor.hypercalls.grant_table import do_grant_table_op
from hypervisor.hypercalls.multicall import do_multicall
from hypervisor.hypercalls.sched import do_sched_op, do_set_timer_op
from hypervisor.hypercalls.vcpu import do_vcpu_op
from hypervisor.hypercalls.version import do_xen_version
from hypervisor.hypercalls.vm_assist import do_vm_assist
from hypervisor.machine import Machine
from hypervisor.mm.frames import OutOfMemory, PageType
from hypervisor.mm.mmu import Mmu
from hypervisor.mm.ptwr import Ptwr
from hypervisor.mm.reservation import Reservation
from hypervisor.native import NativeKernel
from hypervisor.public.errno import ENOSYS
from hypervisor.public.sched import SCHEDOP_yield
from hypervisor.public.xen import (
    DOMID_FIRST_RESERVED,
    DOMID_XEN,
    VIRQ_CON_RING,
    VIRQ_DOM_EXC,
    Hypercall,
)
from hypervisor.scheduler import Scheduler

log = logging.getLogger(__name__)

_SCHED_OP = int(Hypercall.sched_op)  # looked up once: the dispatcher runs on every hypercall

# what Xen keeps per vcpu beside its context record: scheduling state
_SCHED_STATE = ("online", "initialised", "blocked", "timer_deadline", "clock", "runstate",
                "poll_evtchn", "poll_deadline", "periodic_period", "periodic_last")

Handler = Callable[..., "int | None"]


def _name(nr: int) -> str:
    return Hypercall(nr).name if nr in Hypercall._value2member_map_ else str(nr)


class Hypervisor:
    """A machine running domains. It builds the layers below it and hands each
    what it needs (the machine, the domain list, the scheduler, itself as the
    VCPUs' exits); none of them names it."""

    def __init__(self, memory_mib: int = 256, seed: int = 0, clock: str = "deterministic",
                 slice_insns: int = 50_000, slice_us: int = 5_000,
                 sched_seed: int | None = None) -> None:
        self.seed = seed
        self.machine = Machine(memory_mib, seed)
        self.walker = self.machine.walker
        self.mmu = Mmu(self.machine)
        self.ptwr = Ptwr(self.mmu)
        self.reservation = Reservation(self.machine)
        self.domains: dict[int, Domain] = {}
        self.domid_last = 0  # the last domid handed out (domid_alloc's domid_last)
        # the schedule follows the machine's seed unless given its own
        self.scheduler = Scheduler(self.domains, self.return_to_guest, clock, slice_insns,
                                   slice_us, seed if sched_seed is None else sched_seed)
        self.machine.types.on_type_change = self._type_changed
        self.scheduler.between_slices.append(self.machine.memory.absent.background_step)
        self.machine.types.iomem_permitted = self._iomem_permitted
        self.machine.types.validators[PageType.seg_desc] = segdesc_validator(self.machine.memory)
        self.bus = MmioBus()
        self.table: dict[int, Handler] = {
            Hypercall.set_trap_table: do_set_trap_table,
            Hypercall.mmu_update: self.mmu.mmu_update,
            Hypercall.set_gdt: do_set_gdt,
            Hypercall.update_descriptor: do_update_descriptor,
            Hypercall.stack_switch: do_stack_switch,
            Hypercall.set_callbacks: do_set_callbacks,
            Hypercall.update_va_mapping: self.mmu.update_va_mapping,
            Hypercall.update_va_mapping_otherdomain: self.mmu.update_va_mapping_otherdomain,
            Hypercall.multicall: do_multicall,
            Hypercall.memory_op: self.reservation.memory_op,
            Hypercall.set_timer_op: do_set_timer_op,
            Hypercall.xen_version: do_xen_version,
            Hypercall.vm_assist: do_vm_assist,
            Hypercall.console_io: do_console_io,
            Hypercall.grant_table_op: do_grant_table_op,
            Hypercall.iret: traps.do_iret,
            Hypercall.vcpu_op: do_vcpu_op,
            Hypercall.mmuext_op: self.mmu.mmuext_op,
            Hypercall.sched_op: do_sched_op,
            Hypercall.callback_op: do_callback_op,
            Hypercall.event_channel_op: do_event_channel_op,
            Hypercall.sysctl: do_sysctl,
            Hypercall.domctl: do_domctl,
        }
        self.hypercall_count = 0
        # the global VIRQs the toolstack bound (VIRQ_DOM_EXC, VIRQ_CON_RING): Xen
        # sends them to the domain that bound them; here the handler is called
        self.global_virqs: dict[int, Callable[..., None]] = {}
        # a test mode: called as after_hypercall(vcpu, nr, args, rc) after each one
        self.after_hypercall: Callable[[Vcpu, int, Any, Any], None] | None = None

    # --- domains -----------------------------------------------------------------------

    def domid_alloc(self) -> int:
        """Xen's domid_alloc(DOMID_ANY): the first free domid after the last
        one handed out, wrapping to 1 (0 is dom0's): a new domain never gets
        the domid of one just destroyed."""
        for domid in itertools.chain(range(self.domid_last + 1, DOMID_FIRST_RESERVED),
                                     range(1, self.domid_last + 1)):
            if domid not in self.domains:
                self.domid_last = domid
                return domid
        raise OutOfMemory("no free domid")

    def create_domain(self, name: str, max_pages: int, nr_vcpus: int) -> Domain:
        domid = self.domid_alloc()
        dom = Domain(domid, name, max_pages, nr_vcpus, machine=self.machine,
                     domains=self.domains, scheduler=self.scheduler, exits=self,
                     on_console=self._console_output)
        self.domains[domid] = dom
        return dom

    def domain_by_id(self, domid: int) -> Domain | None:
        return self.domains.get(domid)

    def bind_global_virq(self, virq: int, handler: Callable[..., None]) -> bool:
        """The toolstack binds a global VIRQ (one binding each, as in Xen);
        False if it is bound already."""
        if virq in self.global_virqs:
            return False
        self.global_virqs[virq] = handler
        return True

    def send_global_virq(self, virq: int, *args: Any) -> None:
        """Xen's send_global_virq: to whoever bound it, if anyone did."""
        handler = self.global_virqs.get(virq)
        if handler is not None:
            handler(*args)

    def _console_output(self, dom: Domain, data: bytes) -> None:
        """What a domain wrote to its console (VIRQ_CON_RING)."""
        self.send_global_virq(VIRQ_CON_RING, dom, data)

    def iomem_permit(self, dom: Domain, first_mfn: int, nr_mfns: int) -> None:
        """XEN_DOMCTL_iomem_permission: let ``dom`` map these frames of device
        memory (never RAM)."""
        if first_mfn < self.machine.nr_frames:
            raise ValueError(f"mfn {first_mfn:#x} is RAM, not device memory")
        dom.iomem.append(range(first_mfn, first_mfn + nr_mfns))

    def _iomem_permitted(self, domid: int, mfn: int) -> bool:
        dom = self.domains.get(domid)
        return dom is not None and any(mfn in r for r in dom.iomem)

    def add_device(self, dom: Domain, base: int, device: Any) -> None:
        """Put a device's register page on the bus at machine address ``base``,
        reachable by ``dom``'s VCPUs' loads and stores once mapped."""
        self.bus.add(base, device)
        dom.devices.append(device)
        for v in dom.vcpus:
            v.map_mmio(base)

    def destroy_domain(self, dom: Domain) -> None:
        """Tear a domain down and give all its frames back."""
        ft = self.machine.frames
        self.machine.paging.forget(dom.domid)
        for mfn in ft.owned_by(dom.domid).tolist():
            ft.type_count[mfn] = 0
            ft.ref_count[mfn] = 0
            ft.free(mfn)
        for device in dom.devices:
            self.bus.remove(device)
            self.scheduler.cancel_timers(device.device)  # the model owns its timers
            device.device.close()
        dom.close()
        self.domains.pop(dom.domid, None)
        self.walker.flush()
        self.send_global_virq(VIRQ_DOM_EXC, dom.domid)  # the toolstack cleans up after it

    def rebuild_vcpus(self, dom: Domain) -> None:
        """Throw away every VCPU object of ``dom`` (engine, hooks, Python state)
        and the binding of its guest kernel, and make them anew from the VCPUs'
        context records and the scheduling state alone. The guest must go on
        as if nothing happened: that checks the rule that a guest kernel keeps
        all its state in guest memory, and it is the path a restore in a new
        process takes."""
        records = [(bytes(get_context(v)) if v.guest_table else None,
                    {k: getattr(v, k) for k in _SCHED_STATE}) for v in dom.vcpus]
        for v in dom.vcpus:
            v.close()
        self.scheduler.current = None
        dom.vcpus = [Vcpu(dom, i, self.machine) for i in range(len(records))]
        for v in dom.vcpus:
            for dev in dom.devices:
                v.map_mmio(dev.base)
        if dom.native is not None:
            old = dom.native
            dom.native = NativeKernel(dom, dom.kernel_module, old.text, old.size)
            for v in dom.vcpus:
                dom.native.bind(v)
        for v, (ctx, state) in zip(dom.vcpus, records, strict=True):
            if ctx is not None:
                set_context(v, ctx, take_refs=False)
            for k, value in state.items():
                setattr(v, k, value)

    # --- hypercalls --------------------------------------------------------------------

    def hypercall(self, vcpu: Vcpu, nr: int, args: Sequence[int]) -> int | None:
        """The one dispatcher, for x86 ``syscall`` and the Python kernel alike."""
        self.hypercall_count += 1
        handler = self.table.get(nr)
        if handler is None:
            return -ENOSYS
        if nr != _SCHED_OP or not args or args[0] != SCHEDOP_yield:
            vcpu.idle_yields = 0  # any other hypercall is progress
        tbuf = vcpu.domain.tbuf
        if tbuf is not None:
            tbuf.hypercall(self.scheduler.now(), vcpu.vcpu_id, nr, args)
        try:
            rc = handler(vcpu, *args)
        except Exception as e:  # noqa: BLE001 - a hypervisor bug must not take the host down
            log.exception("internal error in hypercall %s", nr)
            vcpu.domain.crash(vcpu, f"internal error in hypercall {_name(nr)}: "
                              f"{type(e).__name__}: {e} (a pvlab bug: please report it)")
            return None
        if self.after_hypercall is not None:
            self.after_hypercall(vcpu, nr, args, rc)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("d%dv%d hypercall %s%s -> %s", vcpu.domain.domid, vcpu.vcpu_id,
                      _name(nr), tuple(hex(a) for a in args), rc)
        return rc

    # --- the VCPUs' exits (cpu.vcpu.GuestExits) -----------------------------------

    def return_to_guest(self, vcpu: Vcpu) -> None:
        """Xen's exit path to a guest: deliver a pending event upcall."""
        traps.deliver_event(vcpu)

    bounce_syscall = staticmethod(traps.bounce_syscall)
    inject = staticmethod(traps.inject)
    do_int = staticmethod(traps.do_int)
    do_general_protection = staticmethod(traps.do_general_protection)
    do_invalid_op = staticmethod(traps.do_invalid_op)
    cpuid = staticmethod(emulate.cpuid)

    def do_page_fault(self, vcpu: Vcpu, error_code: int, cr2: int) -> None:
        """Xen's do_page_fault: the fixups first (fixup_page_fault: the
        writable-pagetable emulation), and only then the guest's #PF."""
        if not self.ptwr.fixup(vcpu, error_code, cr2):
            traps.inject(vcpu, X86_EXC_PF, error_code, cr2)

    def ptwr_store(self, vcpu: Vcpu, va: int, data: bytes) -> bool:
        """A store the Python kernel makes faulted on a read-only page:
        True if it was a pagetable write Xen emulates (and it is done)."""
        return self.ptwr.emulate_store(vcpu, va, data)

    def _type_changed(self, domid: int) -> None:
        dom = self.domains.get(domid)
        if dom is not None and domid != DOMID_XEN:
            dom.flush_tlbs()

    # --- running -----------------------------------------------------------------------

    def run(self, until_ns: int | None = None, stop: Callable[[], bool] | None = None) -> None:
        self.scheduler.run(until_ns, stop)

    def close(self) -> None:
        for dom in list(self.domains.values()):
            for device in dom.devices:
                device.device.close()  # its host files and sockets
            dom.close()


