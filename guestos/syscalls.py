"""System calls from user programs, bounced here by the hypervisor.

Numbers are Linux's where Linux has the call; sleep takes milliseconds and
spawn(name, a0, a1, a2) starts another program of the image as a new task,
a child of the caller (pvlab's own, numbered 1000). read(0, buf, len) reads
a line of the console (guestos/tty.py) and wait4(pid, wstatus, 0, 0) waits
for a child, both blocking: the task is BLOCKED and the call restarted when
it is woken (guestos/task.py). open, close, lseek, ioctl, and read and write
on descriptors from 3 reach a driver through a device file (guestos/fs.py);
a driver's read or write may block the same way."""

from __future__ import annotations

from guestos import fs
from guestos.frame import iret_to, read_bounce
from guestos.printk import console_out, printk
from guestos.task import (
    BLOCKED,
    DEAD,
    FREE,
    RUNNABLE,
    SLEEPING,
    WAIT_CHILD,
    WAIT_NONE,
    WAIT_TTY_READ,
    ZOMBIE,
    current,
    exit_current,
    find_task,
    save_user_context,
    schedule,
    spawn,
)
from guestos.time import NSEC_PER_MSEC, now
from guestos.tty import n_tty_read, tty_open
from guestos.usercopy import copy_from_user, copy_to_user
from hypervisor.public.errno import EBADF, ECHILD, EFAULT, EINVAL, ENOSYS
from hypervisor.public.native import NativeCpu, TailCall

SYS_read, SYS_write, SYS_open, SYS_close, SYS_lseek, SYS_ioctl = 0, 1, 2, 3, 8, 16
SYS_sched_yield, SYS_sleep, SYS_getpid, SYS_exit = 24, 35, 39, 60
SYS_wait4 = 61
SYS_spawn = 1000
MAX_WRITE = 1 << 16
MAX_NAME = 16
SYSCALL_INSN_LEN = 2  # 0f 05: a restarted call goes back over it


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
    rc = _call(cpu, nr, r)
    if isinstance(rc, tuple):
        return _block(cpu, frame, nr, rc[1])
    rcx, r11, rip, cs, rflags, rsp, ss = frame
    frame_top = cpu.reg("rsp") + 56
    return iret_to(cpu, rc, rip, cs, rflags, rsp, ss, rcx, r11, in_syscall=True, stack=frame_top)


def _call(cpu: NativeCpu, nr: int, r: dict[str, int]) -> int | tuple[str, int]:
    """The calls that return to the caller: their result, or ("block",
    channel) for one that must wait."""
    if nr in (SYS_read, SYS_write) and r["rdi"] >= fs.FIRST_FD:
        f = fs.fget(cpu, r["rdi"])
        op = fs.file_write if nr == SYS_write else fs.file_read
        rc = op(cpu, r["rdi"], r["rsi"], r["rdx"])
        return _or_block(rc, fs.wait_channel(f) if f is not None else WAIT_NONE)
    if nr == SYS_write:
        return sys_write(cpu, r["rdi"], r["rsi"], r["rdx"])
    if nr == SYS_read:
        return _or_block(sys_read(cpu, r["rdi"], r["rsi"], r["rdx"]), WAIT_TTY_READ)
    if nr == SYS_open:
        return fs.sys_open(cpu, r["rdi"], r["rsi"])
    if nr == SYS_close:
        return fs.sys_close(cpu, r["rdi"])
    if nr == SYS_lseek:
        return fs.sys_lseek(cpu, r["rdi"], r["rsi"], r["rdx"])
    if nr == SYS_ioctl:
        return fs.sys_ioctl(cpu, r["rdi"], r["rsi"], r["rdx"])
    if nr == SYS_wait4:
        return _or_block(sys_wait4(cpu, r["rdi"], r["rsi"], r["rdx"]), WAIT_CHILD)
    if nr == SYS_getpid:
        return current(cpu).pid
    if nr == SYS_spawn:
        return sys_spawn(cpu, r["rdi"], (r["rsi"], r["rdx"], r["r10"]))
    return -ENOSYS


def _or_block(rc: int | None, chan: int) -> int | tuple[str, int]:
    return ("block", chan) if rc is None else rc


def _block(cpu: NativeCpu, frame: tuple[int, ...], nr: int, chan: int) -> TailCall:
    """The caller waits on ``chan``; woken, it makes the same call again
    (Linux's -ERESTARTSYS: rip back over the syscall, rax the number)."""
    t = current(cpu)
    save_user_context(cpu, t, frame, rax=nr)
    t.rip = t.rip - SYSCALL_INSN_LEN
    t.state, t.wait_chan = BLOCKED, chan
    return schedule(cpu)


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


def sys_read(cpu: NativeCpu, fd: int, buf: int, size: int) -> int | None:
    """fd 0 is the console: a line, or None while none is complete."""
    if fd != 0:
        return -EBADF
    tty_open(cpu)
    return n_tty_read(cpu, buf, min(size, MAX_WRITE))


def sys_wait4(cpu: NativeCpu, pid: int, wstatus: int, options: int) -> int | None:
    """Wait for child ``pid`` to exit (Linux's wait4, for one pid and no
    options): its pid, the status (exit code << 8) stored at ``wstatus``
    unless 0, and the child reaped; None while it runs."""
    if options:
        return -EINVAL
    child = find_task(cpu, pid)
    if child is None or child.parent != current(cpu).pid:
        return -ECHILD
    if child.state not in (ZOMBIE, DEAD):
        return None
    status = (child.exit_code & 0xFF) << 8
    if wstatus and not copy_to_user(cpu, wstatus, status.to_bytes(4, "little")):
        return -EFAULT
    if child.state == ZOMBIE:
        child.state = FREE
    else:
        child.parent = 0  # a held teardown: the slot goes when it ends
    return pid


def sys_spawn(cpu: NativeCpu, name_ptr: int, args: tuple[int, int, int]) -> int:
    raw = copy_from_user(cpu, name_ptr, MAX_NAME)
    if raw is None:
        return -EFAULT
    name = raw.split(b"\0")[0].decode(errors="replace")
    pid = spawn(cpu, name, args, parent=current(cpu).pid)
    if pid > 0:
        printk(cpu, f"task {current(cpu).pid} spawned {name} as task {pid}")
    return pid
