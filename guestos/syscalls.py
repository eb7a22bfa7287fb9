"""System calls from user programs, bounced here by the hypervisor.

Numbers are Linux's where Linux has the call; sleep takes milliseconds and
spawn(name, a0, a1, a2) starts another program of the image as a new task
(pvlab's own, numbered 1000)."""

from __future__ import annotations

from guestos.frame import iret_to, read_bounce
from guestos.printk import console_out, printk
from guestos.task import (
    RUNNABLE,
    SLEEPING,
    current,
    exit_current,
    save_user_context,
    schedule,
    spawn,
)
from guestos.time import NSEC_PER_MSEC, now
from guestos.usercopy import copy_from_user
from hypervisor.public.errno import EBADF, EFAULT, ENOSYS
from hypervisor.public.native import NativeCpu, TailCall

SYS_write, SYS_sched_yield, SYS_sleep, SYS_getpid, SYS_exit = 1, 24, 35, 39, 60
SYS_spawn = 1000
MAX_WRITE = 1 << 16
MAX_NAME = 16


def syscall_entry(cpu: NativeCpu) -> TailCall:
    r = cpu.regs()
    nr = r["rax"]
    frame = read_bounce(cpu)
    t = current(cpu)
    assert t is not None, "a system call with no task running"
    if nr == SYS_exit:
        return exit_current(cpu, r["rdi"])
    if nr in (SYS_sched_yield, SYS_sleep):
        save_user_context(cpu, t, frame, rax=0)
        if nr == SYS_sleep:
            t.wake_at = now(cpu) + r["rdi"] * NSEC_PER_MSEC
            t.state = SLEEPING
        else:
            t.state = RUNNABLE
        return schedule(cpu)
    if nr == SYS_write:
        rc = sys_write(cpu, r["rdi"], r["rsi"], r["rdx"])
    elif nr == SYS_getpid:
        rc = t.pid
    elif nr == SYS_spawn:
        rc = sys_spawn(cpu, r["rdi"], (r["rsi"], r["rdx"], r["r10"]))
    else:
        rc = -ENOSYS
    rcx, r11, rip, cs, rflags, rsp, ss = frame
    frame_top = cpu.reg("rsp") + 56
    return iret_to(cpu, rc, rip, cs, rflags, rsp, ss, rcx, r11, in_syscall=True, stack=frame_top)


def sys_write(cpu: NativeCpu, fd: int, buf: int, size: int) -> int:
    """Copy from the user's address space (the kernel's L4 does not map it)
    into a kernel buffer, and print."""
    if fd not in (1, 2):
        return -EBADF
    size = min(size, MAX_WRITE)
    data = copy_from_user(cpu, buf, size)
    if data is None:
        return -EFAULT
    console_out(cpu, data)
    return len(data)


def sys_spawn(cpu: NativeCpu, name_ptr: int, args: tuple[int, int, int]) -> int:
    raw = copy_from_user(cpu, name_ptr, MAX_NAME)
    if raw is None:
        return -EFAULT
    name = raw.split(b"\0")[0].decode(errors="replace")
    pid = spawn(cpu, name, args)
    if pid > 0:
        printk(cpu, f"task {current(cpu).pid} spawned {name} as task {pid}")
    return pid
