"""Decoding the x86-64 instructions a PV kernel changes a pagetable entry with:
the memory writes Xen's x86_emulate carries out on a write fault to a
read-only L1 (xen/arch/x86/pv/ro-page-fault.c). Unicorn has no decoder.

Forms decoded, at 8-, 16-, 32- or 64-bit operand size, with any ModRM/SIB
memory operand (RIP-relative included) and optional lock, fs/gs and null
segment prefixes:

* ``mov r/m, reg`` (88, 89) and ``mov r/m, imm`` (C6 /0, C7 /0);
* ``xchg r/m, reg`` (86, 87) and ``cmpxchg r/m, reg`` (0F B0, 0F B1);
* ``or`` and ``and`` of a register (08, 09, 20, 21) or an immediate
  (80, 81, 83 with /1 or /4) into memory: Linux's set_bit/clear_bit;
* ``bts`` and ``btr`` with an immediate bit number (0F BA /5, /6): Linux's
  test_and_set_bit/test_and_clear_bit.

Anything else (a register destination, 32-bit addressing, other opcodes) is
not decoded, and the caller treats it as an instruction it cannot emulate
(pvlab's emulator knows fewer instructions than Xen's)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_INSN_LEN = 15
MASK64 = (1 << 64) - 1
_LOCK, FS_PREFIX, GS_PREFIX, _OPSIZE = 0xF0, 0x64, 0x65, 0x66
_NULL_SEGMENTS = (0x26, 0x2E, 0x36, 0x3E)  # es, cs, ss, ds: base 0 in 64-bit mode
_PREFIXES = (_LOCK, FS_PREFIX, GS_PREFIX, _OPSIZE, *_NULL_SEGMENTS)
RSP_INDEX = 4  # an SIB index of 4 (without REX.X) means no index

# opcode -> (operation, byte-sized, source): source "reg" is ModRM.reg;
# "imm" an immediate of the operand size (at most 4 bytes), "imm8" one byte
# (sign-extended for 83); for the group opcodes ModRM.reg picks the operation
_ONE_BYTE = {
    0x88: ("mov", True, "reg"), 0x89: ("mov", False, "reg"),
    0x86: ("xchg", True, "reg"), 0x87: ("xchg", False, "reg"),
    0x08: ("or", True, "reg"), 0x09: ("or", False, "reg"),
    0x20: ("and", True, "reg"), 0x21: ("and", False, "reg"),
    0xC6: ({0: "mov"}, True, "imm"), 0xC7: ({0: "mov"}, False, "imm"),
    0x80: ({1: "or", 4: "and"}, True, "imm"), 0x81: ({1: "or", 4: "and"}, False, "imm"),
    0x83: ({1: "or", 4: "and"}, False, "imm8"),
}
_TWO_BYTE = {
    0xB0: ("cmpxchg", True, "reg"), 0xB1: ("cmpxchg", False, "reg"),
    0xBA: ({5: "bts", 6: "btr"}, False, "imm8"),
}


@dataclass(frozen=True)
class MemWrite:
    """A decoded memory write: ``op`` on ``size`` bytes at ``addr``. ``src``
    is the register or immediate operand's value; ``reg`` the register's
    index (None for an immediate) and ``reg_shift`` 8 for ah, ch, dh, bh."""

    op: str
    size: int
    addr: int
    src: int
    reg: int | None
    reg_shift: int
    length: int


class _Bytes:
    def __init__(self, code: bytes) -> None:
        self.code, self.pos = code, 0

    def peek(self) -> int:
        if self.pos >= len(self.code):
            raise IndexError("instruction runs past the bytes fetched")
        return self.code[self.pos]

    def take(self, n: int) -> int:
        """n bytes, little-endian, sign-extended (n < 8)."""
        if self.pos + n > len(self.code):
            raise IndexError("instruction runs past the bytes fetched")
        value = int.from_bytes(self.code[self.pos:self.pos + n], "little", signed=True)
        self.pos += n
        return value


def decode_mem_write(code: bytes, rip: int, gpr: Sequence[int],
                     seg_base: dict[int, int]) -> MemWrite | None:
    """Decode the instruction at the start of ``code`` (fetched at ``rip``),
    with the registers ``gpr`` (rax..r15 order) and the fs/gs bases by
    prefix byte; None if it is not a memory write decoded here."""
    try:
        return _decode(_Bytes(code), rip, gpr, seg_base)
    except IndexError:
        return None


def _decode(b: _Bytes, rip: int, gpr: Sequence[int], seg_base: dict[int, int]
            ) -> MemWrite | None:
    seg, opsize16 = 0, False
    while (p := b.peek()) in _PREFIXES:
        if p in (FS_PREFIX, GS_PREFIX):
            seg = seg_base.get(p, 0)
        opsize16 |= p == _OPSIZE
        b.pos += 1
    rex = b.take(1) & 0xFF if 0x40 <= b.peek() <= 0x4F else 0
    table = _ONE_BYTE
    if b.peek() == 0x0F:
        b.pos += 1
        table = _TWO_BYTE
    entry = table.get(b.take(1) & 0xFF)
    if entry is None:
        return None
    op, byte_op, source = entry
    size = 1 if byte_op else 8 if rex & 8 else 2 if opsize16 else 4
    modrm = b.take(1) & 0xFF
    mod, reg = modrm >> 6, (modrm >> 3 & 7) | (rex & 4) << 1
    if isinstance(op, dict):
        op = op.get(reg & 7)
    if mod == 3 or op is None:
        return None  # a register destination, or a group member not decoded
    base, rip_relative = _effective_address(b, mod, modrm & 7, rex, gpr)
    src, src_reg, shift = _source(b, source, size, reg, rex, gpr)
    addr = base + seg + (rip + b.pos if rip_relative else 0)
    return MemWrite(op, size, addr & MASK64, src, src_reg, shift, b.pos)


def _source(b: _Bytes, source: str, size: int, reg: int, rex: int, gpr: Sequence[int]
            ) -> tuple[int, int | None, int]:
    """The source operand: (value at the operand size, register, shift)."""
    mask = (1 << (8 * size)) - 1
    if source == "imm8":
        return b.take(1) & mask, None, 0
    if source == "imm":
        return b.take(min(size, 4)) & mask, None, 0
    shift = 0
    if size == 1 and not rex and reg >= 4:
        reg, shift = reg - 4, 8  # ah, ch, dh, bh
    return (gpr[reg] >> shift) & mask, reg, shift


def _effective_address(b: _Bytes, mod: int, rm: int, rex: int, gpr: Sequence[int]
                       ) -> tuple[int, bool]:
    """base + index * scale + displacement, and whether it is RIP-relative
    (the caller adds the address of the next instruction)."""
    if mod == 0 and rm == 5:
        return b.take(4), True
    addr = 0
    if rm == 4:
        sib = b.take(1) & 0xFF
        index = (sib >> 3 & 7) | (rex & 2) << 2
        if index != RSP_INDEX:
            addr += gpr[index] << (sib >> 6)
        if mod == 0 and sib & 7 == 5:
            addr += b.take(4)  # no base: disp32
        else:
            addr += gpr[(sib & 7) | (rex & 1) << 3]
    else:
        addr += gpr[rm | (rex & 1) << 3]
    if mod == 1:
        addr += b.take(1)
    elif mod == 2:
        addr += b.take(4)
    return addr, False


def write_reg(gpr: Any, reg: int, shift: int, size: int, value: int) -> None:
    """Write ``value`` into a register operand of ``size`` bytes as the CPU
    does: a 32-bit result zero-extends, 8- and 16-bit ones merge."""
    if size >= 4:
        gpr[reg] = value & ((1 << (8 * size)) - 1)
        return
    field = ((1 << (8 * size)) - 1) << shift
    gpr[reg] = gpr[reg] & ~field & MASK64 | (value << shift) & field
