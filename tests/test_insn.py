"""The decoder of the memory writes the writable-pagetable emulation carries
out (hypervisor/cpu/insn.py): operand sizes, addressing forms, prefixes."""

from __future__ import annotations

import pytest

from hypervisor.cpu.insn import decode_mem_write, write_reg

GPR = [0x1000 * (i + 1) for i in range(16)]  # rax = 0x1000 ... r15 = 0x10000
FS, GS = 0x64, 0x65
BASES = {FS: 0x7000_0000, GS: 0x9000_0000}


def decode(hexcode: str, rip: int = 0x100):
    return decode_mem_write(bytes.fromhex(hexcode), rip, GPR, BASES)


@pytest.mark.parametrize(("code", "op", "size", "addr", "src", "length"), [
    ("498906", "mov", 8, 0xF000, 0x1000, 3),                    # mov %rax,(%r14)
    ("418906", "mov", 4, 0xF000, 0x1000, 3),                    # mov %eax,(%r14)
    ("66418906", "mov", 2, 0xF000, 0x1000, 4),                  # mov %ax,(%r14)
    ("418806", "mov", 1, 0xF000, 0x00, 3),                      # mov %al,(%r14)
    ("8826", "mov", 1, 0x7000, 0x10, 2),                        # mov %ah,(%rsi)
    ("49c70600000000", "mov", 8, 0xF000, 0, 7),                 # movq $0,(%r14)
    ("48c784c810000000ffffffff", "mov", 8, 0x11010, (1 << 64) - 1, 12),  # SIB, disp32
    ("48890d10000000", "mov", 8, 0x100 + 7 + 0x10, 0x2000, 7),  # RIP-relative
    ("644889042508000000", "mov", 8, 0x7000_0008, 0x1000, 9),  # %fs:8, no base
    ("f0490fb10e", "cmpxchg", 8, 0xF000, 0x2000, 5),
    ("49870e", "xchg", 8, 0xF000, 0x2000, 3),
    ("f0418026fd", "and", 1, 0xF000, 0xFD, 5),
    ("f048834e08ff", "or", 8, 0x7008, (1 << 64) - 1, 6),         # imm8 sign-extended
    ("f0490fba3601", "btr", 8, 0xF000, 1, 6),
    ("4c0936", "or", 8, 0x7000, 0xF000, 3),                     # or %r14,(%rsi)
])
def test_decodes_the_writes_a_kernel_makes_to_a_pte(code, op, size, addr, src, length):
    insn = decode(code.ljust(30, "9"))
    assert (insn.op, insn.size, insn.addr, insn.src, insn.length) == (op, size, addr, src,
                                                                     length)


@pytest.mark.parametrize("code", [
    "4889c0",      # mov %rax,%rax: no memory operand
    "48c74e0800",  # C7 /1 is no mov
    "488b06",      # a load
    "0fba2601",    # bt (reads only)
    "4989",        # cut short
])
def test_anything_else_is_not_decoded(code):
    assert decode(code) is None


def test_register_results_merge_or_zero_extend_as_the_cpu_does():
    regs = [0x1122334455667788] * 2
    write_reg(regs, 0, 0, 4, 0xAABBCCDD)
    write_reg(regs, 1, 8, 1, 0xEE)
    assert regs == [0xAABBCCDD, 0x112233445566EE88]
