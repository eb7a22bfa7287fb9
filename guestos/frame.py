"""Bounce frames and the way back out through the iret hypercall.

Xen enters the kernel with ``RCX, R11, RIP, CS, RFLAGS, RSP, SS`` on the
stack (an error code after R11 for some traps); HYPERVISOR_iret wants
``RAX, R11, RCX, FLAGS, RIP, CS, RFLAGS, RSP, SS``. Returning is rewriting the
one into the other in place and making the hypercall.
"""

from __future__ import annotations

import struct

from hypervisor.public.arch_x86 import VGCF_in_syscall
from hypervisor.public.native import NativeCpu, TailCall
from hypervisor.public.xen import Hypercall

BOUNCE = struct.Struct("<7Q")
IRET = struct.Struct("<9Q")


def read_bounce(cpu: NativeCpu, error_code: bool = False) -> tuple[int, ...]:
    """(rcx, r11, rip, cs, rflags, rsp, ss) of the frame at rsp."""
    rsp = cpu.reg("rsp")
    if error_code:
        w = struct.unpack("<8Q", cpu.read(rsp, 64))
        return (w[0], w[1], *w[3:])
    return BOUNCE.unpack(cpu.read(rsp, BOUNCE.size))


def iret_to(cpu: NativeCpu, rax: int, rip: int, cs: int, rflags: int, rsp: int, ss: int,
            rcx: int = 0, r11: int = 0, in_syscall: bool = False,
            stack: int | None = None) -> TailCall:
    """Return through HYPERVISOR_iret, building its frame below ``stack``."""
    top = cpu.reg("rsp") if stack is None else stack
    sp = top - IRET.size
    flags = VGCF_in_syscall if in_syscall else 0
    cpu.write(sp, IRET.pack(rax & (2**64 - 1), r11, rcx, flags, rip, cs, rflags, rsp, ss))
    cpu.set_regs(rsp=sp)
    return TailCall(Hypercall.iret)


def return_from_bounce(cpu: NativeCpu, error_code: bool = False) -> TailCall:
    """Resume whatever the bounce frame at rsp interrupted, registers intact."""
    rcx, r11, rip, cs, rflags, rsp, ss = read_bounce(cpu, error_code)
    frame_top = cpu.reg("rsp") + (64 if error_code else BOUNCE.size)
    return iret_to(cpu, cpu.reg("rax"), rip, cs, rflags, rsp, ss, rcx, r11, stack=frame_top)
