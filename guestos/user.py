"""User programs: found in the image's program table and loaded from their ELF
into a fresh address space (guestos.task runs them)."""

from __future__ import annotations

import struct

from guestos.kdata import header
from guestos.mm import AddressSpace, KernelPanic, alloc_pages, read_cstr, va
from hypervisor.public.native import NativeCpu

USER_STACK_TOP = 0x00007FFFFFFFF000
USER_STACK_PAGES = 4
PT_LOAD = 1
PF_W = 2
ELF_MAGIC = b"\x7fELF"


def find_program(cpu: NativeCpu, name: str) -> tuple[int, int]:
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


def program_names(cpu: NativeCpu) -> list[str]:
    table = header(cpu).programs
    (count,) = struct.unpack("<Q", cpu.read(table, 8))
    return [read_cstr(cpu, table + 8 + 32 * i, 16) for i in range(count)]


def pages_needed(cpu: NativeCpu, name: str) -> int:
    """An upper bound of the pages load_program takes for ``name``."""
    elf, _ = find_program(cpu, name)
    ehdr = cpu.read(elf, 64)
    _entry, phoff = struct.unpack_from("<QQ", ehdr, 24)
    phentsize, phnum = struct.unpack_from("<HH", ehdr, 54)
    n = USER_STACK_PAGES + 4 * 3  # data, stack, and an L3, L2, L1 per mapped region
    for i in range(phnum):
        p_type, _f, _o, p_vaddr, _pa, _fs, p_memsz, _al = struct.unpack(
            "<IIQQQQQQ", cpu.read(elf + phoff + i * phentsize, 56))
        if p_type == PT_LOAD and p_memsz:
            n += (p_vaddr + p_memsz - (p_vaddr & ~0xFFF) + 0xFFF) >> 12
    return n + 1  # the L4


def load_program(cpu: NativeCpu, name: str) -> tuple[AddressSpace, int]:
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
    aspace.stack_top = USER_STACK_TOP
    return aspace, entry
