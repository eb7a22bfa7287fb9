"""System calls from user programs, bounced here by the hypervisor."""

from __future__ import annotations

from typing import Any

from guestos.frame import iret_to, read_bounce
from guestos.hypercall import console_write, mmuext
from guestos.kdata import kernel, percpu
from hypervisor.public.native import TailCall
from hypervisor.public.xen import MMUEXT_NEW_USER_BASEPTR, MMUEXT_UNPIN_TABLE

SYS_write, SYS_sched_yield, SYS_sleep, SYS_getpid, SYS_exit = 1, 24, 35, 39, 60
ENOSYS, EFAULT, EBADF = 38, 14, 9
MAX_WRITE = 1 << 16


def syscall_entry(cpu: Any) -> TailCall:
    r = cpu.regs()
    nr = r["rax"]
    if nr == SYS_exit:
        return task_exit(cpu, r["rdi"])
    if nr == SYS_write:
        rc = sys_write(cpu, r["rdi"], r["rsi"], r["rdx"])
    elif nr == SYS_getpid:
        rc = percpu(cpu).task_pid
    elif nr in (SYS_sched_yield, SYS_sleep):
        rc = 0
    else:
        rc = -ENOSYS
    rcx, r11, rip, cs, rflags, rsp, ss = read_bounce(cpu)
    frame_top = cpu.reg("rsp") + 56
    return iret_to(cpu, rc, rip, cs, rflags, rsp, ss, rcx, r11, in_syscall=True, stack=frame_top)


def sys_write(cpu: Any, fd: int, buf: int, size: int) -> int:
    """Copy from the user's address space and print. The user L4 is not ours,
    so the bytes are read through the user mapping the hypervisor walks for us:
    the console_io hypercall takes a kernel buffer; copy via the task's L4."""
    if fd not in (1, 2):
        return -EBADF
    size = min(size, MAX_WRITE)
    from guestos.usercopy import copy_from_user
    data = copy_from_user(cpu, buf, size)
    if data is None:
        return -EFAULT
    from guestos.kdata import scratch_va
    tmp = scratch_va(cpu)
    for i in range(0, len(data), 256):
        chunk = data[i:i + 256]
        cpu.write(tmp, chunk)
        console_write(cpu, tmp, len(chunk))
    return len(data)


def task_exit(cpu: Any, code: int) -> TailCall:
    from guestos.boot import cpu_idle, poweroff
    from guestos.printk import printk
    pc = percpu(cpu)
    printk(cpu, f"task {pc.task_pid} exited with code {code} ({pc.ticks} timer ticks so far)")
    l4 = pc.task_user_l4
    mmuext(cpu, MMUEXT_NEW_USER_BASEPTR, 0)
    mmuext(cpu, MMUEXT_UNPIN_TABLE, l4)
    pc.task_pid = 0
    pc.task_user_l4 = 0
    k = kernel(cpu)
    k.tasks_live = k.tasks_live - 1
    if k.tasks_live == 0:
        return poweroff(cpu)
    return cpu_idle(cpu)
