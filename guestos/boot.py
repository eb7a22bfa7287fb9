"""Boot: vcpu0 enters start_kernel with rsi = start_info; it sets up the
kernel's data, maps shared_info, registers its entry points, starts a timer,
creates the tasks the command line names (spread over the cpus), brings up
the other VCPUs with vcpu_op, and every cpu enters the scheduler."""

from __future__ import annotations

import guestos.drivers  # noqa: F401 - the built-in drivers register themselves
from guestos import manage, pm, syscalls, traps
from guestos.cmdline import BadOption, parse_int, parse_run
from guestos.evtchn import xen_init_IRQ
from guestos.freezer import start_periodic_work
from guestos.hypercall import with_args
from guestos.init import do_initcalls
from guestos.kdata import (
    KSTACK_PAGES,
    MAX_CPUS,
    kernel,
    percpu,
    read_start_info,
)
from guestos.manage import xen_manage
from guestos.mm import (
    PAGE_SIZE,
    PTE_RW,
    alloc_pages,
    free_page,
    nr_free_pages,
    pfn_of,
    pfn_to_mfn,
    va,
    xen_setup_mfn_list_list,
    zone,
)
from guestos.printk import printk
from guestos.smp import xen_smp_intr_init
from guestos.stop_machine import stopper
from guestos.suspend import suspend_state
from guestos.task import init_rq, sched, schedule, spawn
from guestos.tick import xen_setup_timer
from guestos.time import set_next_tick
from guestos.upcall import failsafe_callback, hypervisor_callback
from guestos.user import program_names
from guestos.xenbus import xenstore_init
from guestos.xencons import xencons_init
from hypervisor.public.arch_x86 import FLAT_KERNEL_SS64, VGCF_in_kernel, vcpu_guest_context
from hypervisor.public.native import NativeCpu, TailCall
from hypervisor.public.vcpu import VCPUOP_initialise, VCPUOP_is_up, VCPUOP_up
from hypervisor.public.xen import Hypercall

RFLAGS_IF = 0x200
RFLAGS_FIXED = 0x2  # bit 1 of rflags always reads 1


def parse_cmdline(cmdline: str) -> list[tuple[str, tuple[int, int, int]]]:
    """``run=prog[:a0[:a1[:a2]]],...``: the tasks to start, on cpus 0, 1, ...
    in turn."""
    for word in cmdline.split():
        if word.startswith("run="):
            return parse_run(word)
    return [("hello", (0, 0, 0))]


def check_cmdline(cmdline: str) -> str:
    """The options the kernel cannot obey, for the builder to refuse before
    boot (hypervisor/public/native.py's check_cmdline): "" or the first
    reason. Boot checks the same again itself."""
    try:
        parse_cmdline(cmdline)
    except BadOption as e:
        return str(e)
    for word in cmdline.split():
        if word.startswith("pmfail=") and pm.pmfail_error(word):
            return pm.pmfail_error(word)
    return ""


def parse_holds(cmdline: str) -> dict[str, tuple[int, int]]:
    """``hold=build:PID:MS`` / ``hold=exit:PID:MS``: stop that task's
    construction (pgd built, not yet pinned) or teardown (pgd unpinned, not yet
    freed) for MS milliseconds of virtual time."""
    holds = {}
    for word in cmdline.split():
        if word.startswith("hold="):
            for item in word[5:].split(","):
                what, pid, ms = item.split(":")
                if what in ("build", "exit"):
                    holds[what] = (int(pid, 0), int(ms, 0))
    return holds


def parse_options(cpu: NativeCpu, cmdline: str) -> None:
    """The kernel's options besides run= and hold=:
    stopmachine=MS   run a stop_machine check at MS
    stopmachinebug=ack  a planted race: each stop_machine state before EXIT
                     advances one acknowledgement early (guestos/stop_machine.py)
    nosaverestore    built without save/restore (CONFIG_XEN_SAVE_RESTORE=n)
    nopinall         the suspend path skips xen_mm_pin_all: a bug to find, which
                     breaks unpinned pgds across a restore
    worker=MS        a freezable kernel worker that runs every MS
    pmfail=DEV:PHASE PM device DEV, in registration order (0: the console, then the
                     test devices), fails PHASE (freeze, freeze_noirq, ...: pm.PHASES)
    The drivers read their own from their initcalls: testdevs=N and
    testdev.order=reverse (drivers/testdev.py),
    virtio_mmio.device=SIZE@BASE:PORT and irqaffinity=CPU (drivers/virtio_mmio.py),
    virtio.nosync=1 (drivers/virtio.py), virtio_balloon.policy=P and
    balloonbug=leak|keepmap (drivers/virtio_balloon.py)."""
    words = cmdline.split()
    stopper(cpu).test_at_ms = parse_int(cmdline, "stopmachine")
    stopper(cpu).bug_ack = 1 if "stopmachinebug=ack" in words else 0
    xen_manage(cpu).save_restore = 0 if "nosaverestore" in words else 1
    suspend_state(cpu).no_pin_all = 1 if "nopinall" in words else 0
    start_periodic_work(cpu, parse_int(cmdline, "worker"))
    pm.pm_fail_option(cpu, cmdline)


def register_callbacks(cpu: NativeCpu) -> None:
    cpu.hypercall(Hypercall.set_callbacks, cpu.native_addr(hypervisor_callback),
                  cpu.native_addr(failsafe_callback),
                  cpu.native_addr(syscalls.syscall_entry))
    cpu.hypercall(Hypercall.set_trap_table, with_args(cpu, traps.trap_table(cpu)))
    cpu.hypercall(Hypercall.stack_switch, FLAT_KERNEL_SS64, percpu(cpu).stack_top)


def init_cpu(cpu: NativeCpu) -> None:
    """This cpu's timer and IPI, and its first tick."""
    xen_setup_timer(cpu, cpu.vcpu_id)
    xen_smp_intr_init(cpu, cpu.vcpu_id)
    set_next_tick(cpu)


def setup_arch(cpu: NativeCpu, si_va: int) -> None:
    """Memory, shared_info, the rings and the cpus, from start_info."""
    k = kernel(cpu)
    k.start_info = si_va
    si = read_start_info(cpu)
    k.nr_pages = si.nr_pages
    k.mfn_list = si.mfn_list
    z = zone(cpu)
    z.totalram_pages = si.nr_pages
    z.next_free_pfn = pfn_of(cpu.reg("rsp"))  # everything below the boot stack top is taken
    k.kernel_l4_pfn = pfn_of(si.pt_base)
    xencons_init(cpu, si)  # printk goes to the console ring from now on
    xenstore_init(cpu, si)
    # map shared_info over a spare page of the kernel's own mapping
    shinfo_pfn = alloc_pages(cpu)
    cpu.hypercall(Hypercall.update_va_mapping, va(shinfo_pfn), si.shared_info | PTE_RW, 0)
    k.shared_info = va(shinfo_pfn)
    xen_init_IRQ(cpu)
    xen_setup_mfn_list_list(cpu)
    nr_cpus = 0
    while nr_cpus < MAX_CPUS and cpu.hypercall(Hypercall.vcpu_op, VCPUOP_is_up, nr_cpus, 0) >= 0:
        nr_cpus += 1
    k.nr_cpus = nr_cpus
    for n in range(nr_cpus):
        percpu(cpu, n).stack_top = va(alloc_pages(cpu, KSTACK_PAGES) + KSTACK_PAGES)
        init_rq(cpu, n)
    z.mem_map = va(alloc_pages(cpu, (si.nr_pages + PAGE_SIZE - 1) // PAGE_SIZE))


def start_kernel(cpu: NativeCpu) -> TailCall:
    """Native entry 0: the image's ENTRY. rsi = start_info's VA."""
    setup_arch(cpu, cpu.reg("rsi"))
    k = kernel(cpu)
    si = read_start_info(cpu)
    cmdline = si.cmd_line.decode(errors="replace")
    printk(cpu, f"pvlab guest kernel booting on {si.magic.decode()}")
    printk(cpu, f"{k.nr_pages} pages ({k.nr_pages >> 8} MiB), {k.nr_cpus} vcpus, "
           f"command line {cmdline!r}")
    printk(cpu, f"programs in the image: {', '.join(program_names(cpu))}")
    cpu.set_regs(rsp=percpu(cpu).stack_top)
    register_callbacks(cpu)
    init_cpu(cpu)
    k.cpus_up = 1
    holds, sc = parse_holds(cmdline), sched(cpu)
    sc.hold_build_pid, sc.hold_build_ms = holds.get("build", (0, 0))
    sc.hold_exit_pid, sc.hold_exit_ms = holds.get("exit", (0, 0))
    parse_options(cpu, cmdline)
    manage.xenbus_init(cpu)
    do_initcalls(cpu, cmdline)
    sc.free_at_boot = nr_free_pages(cpu)
    names = program_names(cpu)
    for i, (name, args) in enumerate(parse_cmdline(cmdline)):
        pid = spawn(cpu, name, args, on_cpu=i % k.nr_cpus)
        if pid > 0:
            printk(cpu, f"task {pid}: {name} on cpu{i % k.nr_cpus}")
        elif name not in names:
            printk(cpu, f"cannot start {name}: error {pid} (no program {name!r} in the "
                   f"image; it has {', '.join(names)})")
        else:
            printk(cpu, f"cannot start {name}: error {pid}")
    for n in range(1, k.nr_cpus):
        _bring_up(cpu, n)
    return schedule(cpu)


def _bring_up(cpu: NativeCpu, n: int) -> None:
    k = kernel(cpu)
    ctx = vcpu_guest_context()
    ctx.flags = VGCF_in_kernel
    ctx.user_regs.rip = cpu.native_addr(secondary_start)
    ctx.user_regs.rsp = percpu(cpu, n).stack_top
    ctx.user_regs.rflags = RFLAGS_IF | RFLAGS_FIXED
    ctx.kernel_ss = FLAT_KERNEL_SS64
    ctx.kernel_sp = percpu(cpu, n).stack_top
    ctx.ctrlreg[3] = pfn_to_mfn(cpu, k.kernel_l4_pfn) << 12
    ctx.event_callback_eip = cpu.native_addr(hypervisor_callback)
    ctx.syscall_callback_eip = cpu.native_addr(syscalls.syscall_entry)
    first = alloc_pages(cpu, 2)  # the context is 5168 bytes
    cpu.write(va(first), bytes(ctx))
    rc = cpu.hypercall(Hypercall.vcpu_op, VCPUOP_initialise, n, va(first))
    free_page(cpu, first)
    free_page(cpu, first + 1)
    if rc == 0:
        rc = cpu.hypercall(Hypercall.vcpu_op, VCPUOP_up, n, 0)
    printk(cpu, f"bringing up vcpu{n}: {'ok' if rc == 0 else rc}")


def secondary_start(cpu: NativeCpu) -> TailCall:
    register_callbacks(cpu)
    init_cpu(cpu)
    k = kernel(cpu)
    k.cpus_up = k.cpus_up + 1
    printk(cpu, "up")
    return schedule(cpu)


__all__ = ["start_kernel", "secondary_start"]
