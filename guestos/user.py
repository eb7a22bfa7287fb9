"""User programs: found in the image's program table, loaded from their ELF
into a fresh address space, and entered at CPL3 through the iret hypercall."""

from __future__ import annotations

import struct
from typing import Any

from guestos.frame import iret_to
from guestos.kdata import header, kernel, percpu
from guestos.mm import AddressSpace, KernelPanic, alloc_pages, read_cstr, va
from hypervisor.public.arch_x86 import FLAT_USER_CS64, FLAT_USER_SS64
from hypervisor.public.native import TailCall

USER_STACK_TOP = 0x00007FFFFFFFF000
USER_STACK_PAGES = 4
PT_LOAD = 1
PF_W = 2
ELF_MAGIC = b"\x7fELF"


def find_program(cpu: Any, name: str) -> tuple[int, int]:
    """(VA, size) of a program's ELF in the image's program table."""
    table = header(cpu).programs
    (count,) = struct.unpack("<Q", cpu.read(table, 8))
    for i in range(count):
        entry = table + 8 + 32 * i
        pname = read_cstr(cpu, entry, 16)
        off, size = struct.unpack("<QQ", cpu.read(entry + 16, 16))
        if pname == name:
            return table + off, size
    raise KernelPanic(f"no program {name!r} in the image")


def program_names(cpu: Any) -> list[str]:
    table = header(cpu).programs
    (count,) = struct.unpack("<Q", cpu.read(table, 8))
    return [read_cstr(cpu, table + 8 + 32 * i, 16) for i in range(count)]


def load_program(cpu: Any, name: str) -> tuple[AddressSpace, int]:
    """Build an address space holding program ``name``; returns it and the entry."""
    elf, size = find_program(cpu, name)
    ehdr = cpu.read(elf, 64)
    if ehdr[:4] != ELF_MAGIC:
        raise KernelPanic(f"program {name!r} is not an ELF")
    entry, phoff = struct.unpack_from("<QQ", ehdr, 24)
    phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
    aspace = AddressSpace(cpu)
    for i in range(phnum):
        ph = cpu.read(elf + phoff + i * phentsize, 56)
        p_type, p_flags, p_offset, p_vaddr, _pa, p_filesz, p_memsz, _al = struct.unpack(
            "<IIQQQQQQ", ph)
        if p_type != PT_LOAD or not p_memsz:
            continue
        first = p_vaddr & ~0xFFF
        npages = (p_vaddr + p_memsz - first + 0xFFF) >> 12
        base = alloc_pages(cpu, npages)
        data = cpu.read(elf + p_offset, p_filesz)
        cpu.write(va(base) + (p_vaddr - first), data)
        for p in range(npages):
            aspace.map(first + 4096 * p, base + p, bool(p_flags & PF_W))
    stack = alloc_pages(cpu, USER_STACK_PAGES)
    for p in range(USER_STACK_PAGES):
        aspace.map(USER_STACK_TOP - 4096 * (USER_STACK_PAGES - p), stack + p, True)
    return aspace, entry


def start_program(cpu: Any, name: str, args: tuple[int, int, int]) -> TailCall:
    """Load ``name`` and enter it on this cpu, in user mode."""
    aspace, entry = load_program(cpu, name)
    l4 = aspace.activate()
    k = kernel(cpu)
    pc = percpu(cpu)
    pid = k.next_pid + 1
    k.next_pid = pid
    pc.task_pid = pid
    pc.task_user_l4 = l4
    cpu.set_regs(rdi=args[0], rsi=args[1], rdx=args[2], rax=0, rbx=0, rbp=0,
                 r8=0, r9=0, r10=0, r12=0, r13=0, r14=0, r15=0)
    return iret_to(cpu, 0, entry, FLAT_USER_CS64, 0x202, USER_STACK_TOP, FLAT_USER_SS64,
                   stack=pc.stack_top)
