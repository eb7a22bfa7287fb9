"""The register file a debugger sees of an x86-64 VCPU: gdb's i386:x86-64
target description, declared once.

The order is gdb's register numbering (the ``p``/``P`` packets' numbers and
the layout of the ``g`` packet, each register's bytes little-endian); the
features are the ones gdb's amd64 support asks for by name
(gdb/features/i386/64bit-core.xml, 64bit-sse.xml, 64bit-segments.xml). The
hypervisor's debugger reads and writes the registers by these names; the
toolstack's gdb server lays out its packets and its target.xml from them.
"""

from __future__ import annotations

from typing import NamedTuple

FEATURE_CORE = "org.gnu.gdb.i386.core"
FEATURE_SSE = "org.gnu.gdb.i386.sse"
FEATURE_SEGMENTS = "org.gnu.gdb.i386.segments"
GDB_ARCHITECTURE = "i386:x86-64"


class GdbReg(NamedTuple):
    name: str
    bits: int
    type: str     # a type gdb predefines
    feature: str


def _regs(names: str, bits: int, type_: str, feature: str) -> list[GdbReg]:
    return [GdbReg(n, bits, type_, feature) for n in names.split()]


GDB_REGS: tuple[GdbReg, ...] = tuple(
    _regs("rax rbx rcx rdx rsi rdi", 64, "int64", FEATURE_CORE)
    + _regs("rbp rsp", 64, "data_ptr", FEATURE_CORE)
    + _regs("r8 r9 r10 r11 r12 r13 r14 r15", 64, "int64", FEATURE_CORE)
    + _regs("rip", 64, "code_ptr", FEATURE_CORE)
    + _regs("eflags cs ss ds es fs gs", 32, "int32", FEATURE_CORE)
    + _regs("st0 st1 st2 st3 st4 st5 st6 st7", 80, "i387_ext", FEATURE_CORE)
    + _regs("fctrl fstat ftag fiseg fioff foseg fooff fop", 32, "int", FEATURE_CORE)
    + _regs(" ".join(f"xmm{i}" for i in range(16)), 128, "uint128", FEATURE_SSE)
    + _regs("mxcsr", 32, "int", FEATURE_SSE)
    + _regs("fs_base gs_base", 64, "int64", FEATURE_SEGMENTS)
)

# why a VCPU stopped for its debugger (the signal a gdb stop reply carries)
STOP_BREAKPOINT = "breakpoint"  # about to run an instruction at a breakpoint
STOP_STEP = "step"              # a single step is done
STOP_INTERRUPT = "interrupt"    # the debugger asked the running guest to stop
