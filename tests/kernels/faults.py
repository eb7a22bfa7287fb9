"""A test kernel that executes one faulting x86 instruction in kernel mode and
reports what its trap handler saw (vector, error code, CR2, frame RIP).

``CODE`` (bytes) is the instruction; ``REGISTER`` says whether to register trap
handlers first; ``GATES`` maps more vectors to the trap table flags (DPL, IF) of
a handler that records them. The handler records into ``SEEN`` (with the
registers it found) and powers off."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

from hypervisor.public.native import VIRT_BASE, TailCall, pvlab_image_header
from hypervisor.public.sched import SCHEDOP_shutdown, SHUTDOWN_poweroff
from hypervisor.public.xen import Hypercall

HEADER_SIZE = ctypes.sizeof(pvlab_image_header)
CODE = b"\x0f\x0b"  # ud2
REGISTER = True
SKIP_GP = 0  # #GPs to step over (handler returns past a 3-byte instruction)
GATES: dict[int, int] = {}  # vector -> trap_info flags, entered at on_soft
SEEN: dict[str, int] = {}
RECORDED = ("rax", "rbx", "rdx")


def _data(cpu: Any) -> int:
    return pvlab_image_header.from_buffer_copy(cpu.read(VIRT_BASE, HEADER_SIZE)).kernel_data


def start(cpu: Any) -> int:
    SEEN.clear()
    data = _data(cpu)
    if REGISTER:
        gates = [(6, 0, on_ud), (13, 0, on_gp), (14, 0, on_pf), (3, 0, on_bp)]
        gates += [(vec, flags, on_soft) for vec, flags in GATES.items()]
        table = b"".join(struct.pack("<BBHxxxxQ", vec, flags, 0, cpu.native_addr(fn))
                         for vec, flags, fn in gates)
        cpu.write(data, table + bytes(16))
        cpu.hypercall(Hypercall.set_trap_table, data)
    code = data + 0x8000
    cpu.write(code, CODE)
    SEEN["code"] = code
    cpu.write_u64(cpu.reg("rsp"), code)  # return into the faulting code
    return 0


def _record(cpu: Any, vector: int, has_error: bool) -> TailCall:
    rsp = cpu.reg("rsp")
    words = struct.unpack("<8Q", cpu.read(rsp, 64))
    SEEN["vector"] = vector
    SEEN.update((name, cpu.reg(name)) for name in RECORDED)
    if has_error:
        SEEN["error_code"], SEEN["rip"] = words[2], words[3]
    else:
        SEEN["rip"] = words[2]
    buf = _data(cpu) + 0x100
    cpu.write(buf, struct.pack("<I", SHUTDOWN_poweroff))
    return TailCall(Hypercall.sched_op, (SCHEDOP_shutdown, buf), None)


def on_ud(cpu: Any) -> TailCall:
    return _record(cpu, 6, False)


def on_gp(cpu: Any) -> TailCall:
    SEEN["gp"] = SEEN.get("gp", 0) + 1
    if SEEN["gp"] <= SKIP_GP:
        # iret past the instruction: rewrite the bounce frame into an iret frame
        rsp = cpu.reg("rsp")
        rcx, r11, _err, rip, cs, rflags, usp, ss = struct.unpack("<8Q", cpu.read(rsp, 64))
        frame = struct.pack("<9Q", cpu.reg("rax"), r11, rcx, 0, rip + 3, cs, rflags, usp, ss)
        cpu.write(rsp + 64 - 72, frame)
        cpu.set_regs(rsp=rsp + 64 - 72)
        return TailCall(Hypercall.iret)
    return _record(cpu, 13, True)


def on_pf(cpu: Any) -> TailCall:
    return _record(cpu, 14, True)


def on_bp(cpu: Any) -> TailCall:
    return _record(cpu, 3, False)


def on_soft(cpu: Any) -> TailCall:
    """A vector of GATES: the handler cannot tell which, so -1."""
    return _record(cpu, -1, False)


def native_entries() -> list[Callable[..., object]]:
    return [start, on_ud, on_gp, on_pf, on_bp, on_soft]
