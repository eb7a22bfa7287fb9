"""The baseline: a user program under a bare Unicorn loop, as fast as Unicorn
runs it, with the same real 4-level paging pvlab uses (paging on is ~5x faster
than Unicorn's flat mode on memory-heavy code) and a minimal syscall hook."""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from elftools.elf.elffile import ELFFile
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn.x86_const import (
    UC_X86_INS_SYSCALL,
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_MSR,
    UC_X86_REG_RAX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
)

MEM = 16 << 20
STACK_TOP = 0x7FFFFFFFF000


@dataclass
class BareResult:
    output: bytes
    seconds: float
    instructions: int | None


class _Pager:
    """Identity-free 4-level tables in a flat buffer: VA -> a bump-allocated frame."""

    def __init__(self, u64: np.ndarray) -> None:
        self.u64 = u64
        self.next = 1
        self.l4 = self.alloc()

    def alloc(self) -> int:
        f = self.next
        self.next += 1
        return f

    def map(self, va: int) -> int:
        t = self.l4
        for shift in (39, 30, 21):
            i = (t << 9) | ((va >> shift) & 511)
            if not self.u64[i] & 1:
                self.u64[i] = (self.alloc() << 12) | 7
            t = int(self.u64[i]) >> 12
        i = (t << 9) | ((va >> 12) & 511)
        if not self.u64[i] & 1:
            self.u64[i] = (self.alloc() << 12) | 7
        return int(self.u64[i]) >> 12


def load(path: Path, args: tuple[int, int, int] = (0, 0, 0)) -> tuple[Uc, bytearray, mmap.mmap]:
    buf = mmap.mmap(-1, MEM)
    u64 = np.frombuffer(buf, np.uint64)
    pager = _Pager(u64)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    import ctypes
    uc.mem_map_ptr(0, MEM, UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    with open(path, "rb") as f:
        elf = ELFFile(f)
        entry = elf.header["e_entry"]
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            data = seg.data()
            for off in range(0, seg["p_memsz"] + (seg["p_vaddr"] & 0xFFF), 4096):
                va = (seg["p_vaddr"] & ~0xFFF) + off
                pager.map(va)
            for i in range(len(data)):
                va = seg["p_vaddr"] + i
                buf[(pager.map(va) << 12) | (va & 0xFFF)] = data[i]
    for p in range(1, 5):
        pager.map(STACK_TOP - 4096 * p)
    uc.reg_write(UC_X86_REG_CR3, pager.l4 << 12)
    uc.reg_write(UC_X86_REG_CR4, uc.reg_read(UC_X86_REG_CR4) | (1 << 5))
    uc.reg_write(UC_X86_REG_MSR, (0xC0000080, (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11)))
    uc.reg_write(UC_X86_REG_CR0, 0x80010011)
    uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
    uc.reg_write(UC_X86_REG_RIP, entry)
    uc.reg_write(UC_X86_REG_RDI, args[0])
    uc.reg_write(UC_X86_REG_RSI, args[1])
    uc.reg_write(UC_X86_REG_RDX, args[2])
    out = bytearray()
    state = {"done": False}

    def on_syscall(uc: Uc, ud: object) -> None:
        nr = uc.reg_read(UC_X86_REG_RAX)
        if nr == 1:  # write: read the bytes through the tables
            va, n = uc.reg_read(UC_X86_REG_RSI), uc.reg_read(UC_X86_REG_RDX)
            for i in range(n):
                a = va + i
                out.append(buf[(pager.map(a) << 12) | (a & 0xFFF)])
            uc.reg_write(UC_X86_REG_RAX, n)
        elif nr == 60:
            state["done"] = True
            uc.emu_stop()
        else:
            uc.reg_write(UC_X86_REG_RAX, 0)

    uc.hook_add(UC_HOOK_INSN, on_syscall, None, 1, 0, UC_X86_INS_SYSCALL)
    uc._pvlab_state = state  # type: ignore[attr-defined]
    return uc, out, buf


def run(path: Path, args: tuple[int, int, int] = (0, 0, 0), count_slice: int = 0) -> BareResult:
    """Run to exit; with ``count_slice`` in counted slices (pvlab's deterministic
    clock), else in one uncounted run."""
    uc, out, buf = load(path, args)
    state = uc._pvlab_state  # type: ignore[attr-defined]
    t = time.perf_counter()
    insns = 0
    rip = uc.reg_read(UC_X86_REG_RIP)
    if count_slice:
        from hypervisor.cpu.ucfast import InsnCounter
        counter = InsnCounter(uc)
        while not state["done"]:
            uc.emu_start(rip, 0, 0, count_slice)
            insns += counter.retired(count_slice)
            rip = uc.reg_read(UC_X86_REG_RIP)
    else:
        uc.emu_start(rip, 0)
    seconds = time.perf_counter() - t
    del buf
    return BareResult(bytes(out), seconds, insns if count_slice else None)
