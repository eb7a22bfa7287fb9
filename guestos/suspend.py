"""xen_suspend: the function stop_machine runs on cpu0 for a save or a
checkpoint, with every other cpu spinning with events masked (Linux's
drivers/xen/manage.c xen_suspend, arch/x86/xen/suspend_pv.c):

    sysdev_suspend
    xen_mm_pin_all            pin every unpinned pgd, marking it SavePinned,
                              so the tools canonicalise every pagetable
    pre-suspend               start_info's store and console frames as pfns;
                              shared_info unmapped (its frame is no pfn)
    the suspend hypercall     SCHEDOP_shutdown(SHUTDOWN_suspend), start_info's
                              mfn in the third argument; it returns 1 if the
                              suspend was cancelled or only a checkpoint, 0 in
                              a new domain after a restore
    post-suspend              shared_info mapped again, the p2m's place told
                              again; after a checkpoint the store and console
                              pfns back to mfns; in a new domain (a restore)
                              the new frames and ports taken from start_info,
                              every VIRQ and IPI bound anew, every cpu's tick
                              marked lost
    xen_mm_unpin_all          unpin exactly the SavePinned pgds
    sysdev_resume

Drivers that must act here register syscore_ops (guestos/pm.py): this file
names none of them.
"""

from __future__ import annotations

from guestos.evtchn import upcall_masked, xen_irq_resume
from guestos.hypercall import shutdown_args
from guestos.kdata import AREAS, kernel, read_start_info, write_start_info
from guestos.layout import Layout, Ref
from guestos.mm import PAGE_SIZE, PTE_RW, mfn_to_pfn, pfn_of, pfn_to_mfn, xen_setup_mfn_list_list
from guestos.pgd import pgd_list, pgd_pinned, xen_mm_pin_all, xen_mm_unpin_all
from guestos.pm import sysdev_resume, sysdev_suspend
from guestos.printk import printk
from guestos.stop_machine import cpu_stopper, fn_done
from guestos.symbols import export
from guestos.time import xen_timer_resume
from guestos.xenbus import xenstore_init, xs
from guestos.xencons import xencons, xencons_init
from hypervisor.public.native import NativeCpu, TailCall
from hypervisor.public.sched import SCHEDOP_shutdown, SHUTDOWN_suspend
from hypervisor.public.xen import Hypercall

SUSPEND = Layout("suspend", [
    ("cancelled", "u64"),      # the suspend hypercall's result
    ("save_pinned", "u64"),    # pgds xen_mm_pin_all pinned for this save
    ("no_pin_all", "u64"),     # option nopinall: skip xen_mm_pin_all (a lab bug)
    ("restores", "u64"),       # times this kernel resumed in a new domain
])
assert SUSPEND.size <= AREAS["suspend"].size


def suspend_state(cpu: NativeCpu) -> Ref:
    return SUSPEND.at(cpu, AREAS["suspend"].va(cpu))


def pin_for_save(cpu: NativeCpu) -> None:
    """xen_mm_pin_all, after saying what the pgd_list holds: one pgd for
    every task the console shows alive, the held ones unpinned."""
    st = suspend_state(cpu)
    pgds = pgd_list(cpu)
    unpinned = sum(1 for pgd in pgds if not pgd_pinned(cpu, pgd))
    printk(cpu, f"pgd_list: {len(pgds)} pgds, {unpinned} of them unpinned")
    if st.no_pin_all:
        st.save_pinned = 0
        printk(cpu, f"xen_mm_pin_all: SKIPPED (option nopinall): {unpinned} unpinned pgds go "
               "out raw, their mfns not canonicalised")
        return
    n = xen_mm_pin_all(cpu)
    st.save_pinned = n
    printk(cpu, f"xen_mm_pin_all: {n} unpinned pgds pinned (SavePinned)")


@export
def xen_suspend(cpu: NativeCpu) -> TailCall:
    k = kernel(cpu)
    others = [n for n in range(k.cpus_up) if n != cpu.vcpu_id]
    spinning = [n for n in others if cpu_stopper(cpu, n).in_stopper and upcall_masked(cpu, n)]
    printk(cpu, f"xen_suspend: on cpu{cpu.vcpu_id}, cpus "
           f"{','.join(map(str, spinning)) or 'none'} spinning with events masked"
           + ("" if spinning == others else " - FAILURE: not all of them"))
    sysdev_suspend(cpu)
    pin_for_save(cpu)
    si = read_start_info(cpu)
    si.store_mfn = mfn_to_pfn(cpu, si.store_mfn)
    si.console.domU.mfn = mfn_to_pfn(cpu, si.console.domU.mfn)
    write_start_info(cpu, si)
    # shared_info's frame is the hypervisor's, no pfn of ours: no pagetable may
    # map it when the tools canonicalise them. Its address gets the page's own
    # frame back, holding a copy (Linux's xen_dummy_shared_info)
    copy = cpu.read(k.shared_info, PAGE_SIZE)
    own = pfn_to_mfn(cpu, pfn_of(k.shared_info))
    cpu.hypercall(Hypercall.update_va_mapping, k.shared_info, (own << 12) | PTE_RW, 0)
    cpu.write(k.shared_info, copy)
    printk(cpu, "pre-suspend: start_info's store and console frames are pfns, "
           "shared_info unmapped")
    printk(cpu, "suspend hypercall (SCHEDOP_shutdown, SHUTDOWN_suspend)")
    _, arg = shutdown_args(cpu, SHUTDOWN_suspend)
    si_mfn = pfn_to_mfn(cpu, pfn_of(k.start_info))
    return TailCall(Hypercall.sched_op, (SCHEDOP_shutdown, arg, si_mfn), xen_suspend_resumed)


def xen_suspend_resumed(cpu: NativeCpu) -> TailCall:
    """The suspend hypercall's continuation (a native entry): rax says how."""
    k = kernel(cpu)
    cancelled = 1 if cpu.reg("rax") == 1 else 0
    printk(cpu, f"suspend hypercall returned {cancelled} "
           f"({'cancelled or checkpointed' if cancelled else 'resumed in a new domain'})")
    si = read_start_info(cpu)
    # shared_info again where the kernel maps it: its frame may be new
    cpu.hypercall(Hypercall.update_va_mapping, k.shared_info, si.shared_info | PTE_RW, 0)
    xen_setup_mfn_list_list(cpu)
    if cancelled:
        si.store_mfn = pfn_to_mfn(cpu, si.store_mfn)
        si.console.domU.mfn = pfn_to_mfn(cpu, si.console.domU.mfn)
        write_start_info(cpu, si)
        printk(cpu, "post-suspend: shared_info mapped, start_info's frames are mfns")
    else:
        # the restorer wrote the new frames and ports into start_info
        st = suspend_state(cpu)
        st.restores = st.restores + 1
        xencons_init(cpu, si)
        xenstore_init(cpu, si)
        xen_irq_resume(cpu)
        xen_timer_resume(cpu)
        printk(cpu, f"post-suspend: shared_info mapped; console on pfn {xencons(cpu).pfn:#x} "
               f"port {xencons(cpu).port}, store on pfn {xs(cpu).store_pfn:#x} "
               f"port {xs(cpu).store_port}; "
               f"timer and IPI ports of {k.cpus_up} cpus bound again")
    n = xen_mm_unpin_all(cpu)
    printk(cpu, f"xen_mm_unpin_all: {n} SavePinned pgds unpinned")
    sysdev_resume(cpu)
    suspend_state(cpu).cancelled = cancelled
    return fn_done(cpu, cancelled)
