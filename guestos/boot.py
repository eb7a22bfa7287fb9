"""Boot: vcpu0 enters start_kernel with rsi = start_info; it sets up the
kernel's data, maps shared_info, registers its entry points, starts a timer,
creates the tasks the command line names (spread over the cpus), brings up
the other VCPUs with vcpu_op, and every cpu enters the scheduler."""

from __future__ import annotations

import ctypes
from typing import Any

from guestos import events, manage, pm, syscalls, traps
from guestos.drivers import virtio_balloon
from guestos.hypercall import with_args
from guestos.kdata import KSTACK_PAGES, MAX_CPUS, MAX_TASKS, header, kernel, percpu
from guestos.mm import (
    PAGE_SIZE,
    PTE_RW,
    alloc_pages,
    free_page,
    mfn_to_pfn,
    nr_free_pages,
    pfn_of,
    pfn_to_mfn,
    read_cstr,
    va,
    xen_setup_mfn_list_list,
)
from guestos.printk import printk
from guestos.task import schedule, spawn
from guestos.user import program_names
from hypervisor.public.arch_x86 import FLAT_KERNEL_SS64, VGCF_in_kernel, vcpu_guest_context
from hypervisor.public.native import TailCall
from hypervisor.public.sched import SCHEDOP_block, SHUTDOWN_poweroff
from hypervisor.public.vcpu import VCPUOP_initialise, VCPUOP_is_up, VCPUOP_up
from hypervisor.public.xen import Hypercall, start_info


def parse_cmdline(cmdline: str) -> list[tuple[str, tuple[int, int, int]]]:
    """``run=prog[:a0[:a1[:a2]]],...``: the tasks to start, on cpus 0, 1, ...
    in turn."""
    for word in cmdline.split():
        if word.startswith("run="):
            out = []
            for item in word[4:].split(","):
                name, *nums = item.split(":")
                args = [int(n, 0) for n in nums[:3]] + [0] * (3 - len(nums[:3]))
                out.append((name, (args[0], args[1], args[2])))
            return out
    return [("hello", (0, 0, 0))]


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


def parse_int(cmdline: str, name: str, default: int = 0) -> int:
    """The value of option ``name=N`` (0x.. too); default if it is absent or no number."""
    for word in cmdline.split():
        if word.startswith(name + "="):
            try:
                return int(word.split("=", 1)[1], 0)
            except ValueError:
                return default
    return default


def parse_word(cmdline: str, name: str, default: str = "") -> str:
    """The value of option ``name=VALUE``; default if it is absent."""
    for word in cmdline.split():
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return default


def parse_options(cpu: Any, cmdline: str) -> None:
    """The kernel's options besides run= and hold=:
    stopmachine=MS   run a stop_machine check at MS
    nosaverestore    built without save/restore (CONFIG_XEN_SAVE_RESTORE=n)
    nopinall         the suspend path skips xen_mm_pin_all: a bug to find, which
                     breaks unpinned pgds across a restore
    worker=MS        a freezable kernel worker that runs every MS
    testdevs=N       N test devices that log their PM callbacks
    pmfail=DEV:PHASE device DEV (0: the console, 1..N: the test devices) fails PHASE
                     (freeze, freeze_noirq, ...: guestos/pm.py PHASES)
    virtio_mmio.device=SIZE@BASE:PORT   a virtio-mmio device (the toolstack adds it)
    virtio_balloon.policy=P   what the balloon does across a save: discard, deflate
                     (the default) or keep (guestos/drivers/virtio_balloon.py)
    balloonbug=leak  the 2012 discard code's leak, for the lab"""
    k = kernel(cpu)
    words = cmdline.split()
    k.stop_test_ms = parse_int(cmdline, "stopmachine")
    k.save_restore = 0 if "nosaverestore" in words else 1
    k.no_pin_all = 1 if "nopinall" in words else 0
    k.wq_period_ms = parse_int(cmdline, "worker")
    k.wq_next = k.wq_period_ms * 1_000_000
    for word in words:
        if word.startswith("pmfail="):
            dev, _, phase = word[7:].partition(":")
            if dev.isdigit() and phase in pm.PHASES:
                k.pm_fail = (int(dev) + 1) << 8 | (pm.PHASES.index(phase) + 1)
            else:
                printk(cpu, f"option {word}: want pmfail=DEV:PHASE, PHASE one of "
                       + ", ".join(pm.PHASES))


def register_callbacks(cpu: Any) -> None:
    cpu.hypercall(Hypercall.set_callbacks, cpu.native_addr(events.hypervisor_callback),
                  cpu.native_addr(events.failsafe_callback),
                  cpu.native_addr(syscalls.syscall_entry))
    cpu.hypercall(Hypercall.set_trap_table, with_args(cpu, traps.trap_table(cpu)))
    cpu.hypercall(Hypercall.stack_switch, FLAT_KERNEL_SS64, percpu(cpu).stack_top)


def start_kernel(cpu: Any) -> TailCall:
    """Native entry 0: the image's ENTRY. rsi = start_info's VA."""
    si_va = cpu.reg("rsi")
    k = kernel(cpu)
    si = start_info.from_buffer_copy(cpu.read(si_va, ctypes.sizeof(start_info)))
    magic, nr_pages, shinfo_maddr = si.magic, si.nr_pages, si.shared_info
    k.start_info = si_va
    k.nr_pages = nr_pages
    k.totalram_pages = nr_pages
    k.mfn_list = si.mfn_list
    k.next_free_pfn = pfn_of(cpu.reg("rsp"))  # everything below the boot stack top is taken
    k.kernel_l4_pfn = pfn_of(si.pt_base)
    # the console ring: printk goes there from now on; the store ring
    k.console_pfn = mfn_to_pfn(cpu, si.console.domU.mfn)
    k.console_port = si.console.domU.evtchn
    k.store_pfn = mfn_to_pfn(cpu, si.store_mfn)
    k.store_port = si.store_evtchn
    # map shared_info over a spare page of the kernel's own mapping
    shinfo_pfn = alloc_pages(cpu)
    cpu.hypercall(Hypercall.update_va_mapping, va(shinfo_pfn), shinfo_maddr | PTE_RW, 0)
    k.shared_info = va(shinfo_pfn)
    events.mask_all(cpu)
    xen_setup_mfn_list_list(cpu)
    nr_cpus = 0
    while nr_cpus < MAX_CPUS and cpu.hypercall(Hypercall.vcpu_op, VCPUOP_is_up, nr_cpus, 0) >= 0:
        nr_cpus += 1
    k.nr_cpus = nr_cpus
    for n in range(nr_cpus):
        percpu(cpu, n).stack_top = va(alloc_pages(cpu, KSTACK_PAGES) + KSTACK_PAGES)
        percpu(cpu, n).last = MAX_TASKS - 1  # round robin starts at the first slot
    k.mem_map = va(alloc_pages(cpu, (nr_pages + PAGE_SIZE - 1) // PAGE_SIZE))
    printk(cpu, f"pvlab guest kernel booting on {magic.decode()}")
    printk(cpu, f"{nr_pages} pages ({nr_pages >> 8} MiB), {nr_cpus} vcpus, "
           f"command line {read_cstr(cpu, si_va + 128, 1024)!r}")
    printk(cpu, f"programs in the image: {', '.join(program_names(cpu))}")
    cpu.set_regs(rsp=percpu(cpu).stack_top)
    register_callbacks(cpu)
    events.init_cpu(cpu)
    k.cpus_up = 1
    cmdline = read_cstr(cpu, si_va + 128, 1024)
    holds = parse_holds(cmdline)
    k.hold_build_pid, k.hold_build_ms = holds.get("build", (0, 0))
    k.hold_exit_pid, k.hold_exit_ms = holds.get("exit", (0, 0))
    parse_options(cpu, cmdline)
    pm.device_register(cpu, pm.DRV_XENCONS)
    for i in range(parse_int(cmdline, "testdevs")):
        pm.device_register(cpu, pm.DRV_TESTDEV, i)
    manage.xenbus_init(cpu)
    virtio_balloon.probe_all(cpu, cmdline)
    k.free_at_boot = nr_free_pages(cpu)
    for i, (name, args) in enumerate(parse_cmdline(cmdline)):
        pid = spawn(cpu, name, args, on_cpu=i % nr_cpus)
        printk(cpu, f"task {pid}: {name} on cpu{i % nr_cpus}" if pid > 0 else
               f"cannot start {name}: error {pid}")
    for n in range(1, nr_cpus):
        _bring_up(cpu, n)
    return schedule(cpu)


def _bring_up(cpu: Any, n: int) -> None:
    k = kernel(cpu)
    ctx = vcpu_guest_context()
    ctx.flags = VGCF_in_kernel
    ctx.user_regs.rip = cpu.native_addr(secondary_start)
    ctx.user_regs.rsp = percpu(cpu, n).stack_top
    ctx.user_regs.rflags = 0x202
    ctx.kernel_ss = FLAT_KERNEL_SS64
    ctx.kernel_sp = percpu(cpu, n).stack_top
    ctx.ctrlreg[3] = pfn_to_mfn(cpu, k.kernel_l4_pfn) << 12
    ctx.event_callback_eip = cpu.native_addr(events.hypervisor_callback)
    ctx.syscall_callback_eip = cpu.native_addr(syscalls.syscall_entry)
    first = alloc_pages(cpu, 2)  # the context is 5168 bytes
    cpu.write(va(first), bytes(ctx))
    rc = cpu.hypercall(Hypercall.vcpu_op, VCPUOP_initialise, n, va(first))
    free_page(cpu, first)
    free_page(cpu, first + 1)
    if rc == 0:
        rc = cpu.hypercall(Hypercall.vcpu_op, VCPUOP_up, n, 0)
    printk(cpu, f"bringing up vcpu{n}: {'ok' if rc == 0 else rc}")


def secondary_start(cpu: Any) -> TailCall:
    register_callbacks(cpu)
    events.init_cpu(cpu)
    k = kernel(cpu)
    k.cpus_up = k.cpus_up + 1
    printk(cpu, "up")
    return schedule(cpu)


def cpu_idle(cpu: Any) -> TailCall:
    """Nothing to run: block until an event, and come back here."""
    cpu.set_regs(rsp=percpu(cpu).stack_top)
    return TailCall(Hypercall.sched_op, (SCHEDOP_block, 0), cpu_idle)


def poweroff(cpu: Any) -> TailCall:
    from guestos.hypercall import shutdown_args
    k = kernel(cpu)
    printk(cpu, f"all programs exited: powering off ({nr_free_pages(cpu)} pages free, "
           f"{k.free_at_boot} before the first task)")
    return TailCall(Hypercall.sched_op, shutdown_args(cpu, SHUTDOWN_poweroff), cpu_idle)


__all__ = ["start_kernel", "secondary_start", "cpu_idle", "header"]
