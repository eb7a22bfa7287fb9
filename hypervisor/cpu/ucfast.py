"""Fast paths into libunicorn that the Python binding does not offer.

The binding's ``reg_read`` costs ~2.5 us a register and it has no virtual-memory
API; a trap handler that reads six argument registers that way would spend most of
its time in the binding. Here registers are read and written in one ctypes batch
with preallocated arrays (~1 us), and the two private fields of Unicorn's state that
a hypervisor needs are reached directly:

* the retired-instruction counter of a counted ``emu_start`` (``uc->emu_counter``),
  which gives deterministic virtual time even when a slice ends early;
* the CPU's ``old_exception`` (must be reset after every fault a hook handles,
  Unicorn issue #1883) and ``error_code`` (the page-fault error code), inside the
  context blob.

Both are private layouts, found at run time with marker values; the project pins
``unicorn==2.1.4`` for that reason: Unicorn never runs the CPU's interrupt
delivery, so a fault a hook handled stays in ``old_exception`` and the next one
becomes a double fault, and the page-fault error code is in no public API.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator, Sequence

import numpy as np
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import (
    UC_X86_INS_SYSCALL,
    UC_X86_REG_DR0,
    UC_X86_REG_R8,
    UC_X86_REG_R9,
    UC_X86_REG_R10,
    UC_X86_REG_R11,
    UC_X86_REG_R12,
    UC_X86_REG_R13,
    UC_X86_REG_R14,
    UC_X86_REG_R15,
    UC_X86_REG_RAX,
    UC_X86_REG_RBP,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
)

_c_u64_p = ctypes.POINTER(ctypes.c_uint64)


class RegBatch:
    """Read or write a fixed list of 64-bit registers in one library call."""

    def __init__(self, uc: Uc, regs: Sequence[int]) -> None:
        self._uch = uc._uch
        n = len(regs)
        self.n = n
        self._ids = (ctypes.c_int * n)(*regs)
        self._vals = (ctypes.c_uint64 * n)()
        self._ptrs = (ctypes.c_void_p * n)(
            *[ctypes.addressof(self._vals) + 8 * i for i in range(n)]
        )

    def read(self) -> list[int]:
        uclib.uc_reg_read_batch(self._uch, self._ids, self._ptrs, self.n)
        return self._vals[:]

    def write(self, values: Sequence[int]) -> None:
        vals = self._vals
        for i, v in enumerate(values):
            vals[i] = v & 0xFFFFFFFFFFFFFFFF
        uclib.uc_reg_write_batch(self._uch, self._ids, self._ptrs, self.n)


class FastReg:
    """One register, read and written through ctypes without the binding's checks."""

    def __init__(self, uc: Uc, reg: int) -> None:
        self._uch = uc._uch
        self._id = reg
        self._val = ctypes.c_uint64()
        self._ref = ctypes.byref(self._val)

    def read(self) -> int:
        uclib.uc_reg_read(self._uch, self._id, self._ref)
        return self._val.value

    def write(self, value: int) -> None:
        self._val.value = value & 0xFFFFFFFFFFFFFFFF
        uclib.uc_reg_write(self._uch, self._id, self._ref)


# --- the general-purpose registers, in place -----------------------------------------

# QEMU's CPUX86State.regs[] order
GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_GPR_UC_IDS = (UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX,
               UC_X86_REG_RSP, UC_X86_REG_RBP, UC_X86_REG_RSI, UC_X86_REG_RDI,
               UC_X86_REG_R8, UC_X86_REG_R9, UC_X86_REG_R10, UC_X86_REG_R11,
               UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14, UC_X86_REG_R15)
_GPR_MARKS = tuple(0x5EED00000000C0DE + (i << 20) for i in range(16))
_WINDOW = 4 << 20  # searched about each pointer first; whole mappings (a heap can
                   # grow to GiBs) only if that finds nothing


def _readable_regions() -> list[tuple[int, int]]:
    """The writable mappings, adjacent ones joined: one heap can be several
    mappings (numpy's madvise(MADV_HUGEPAGE) of a big array in it splits it), and
    a struct the heap holds can straddle two of them: the X86CPU that uc->cpu
    points at, with env->regs in the next mapping."""
    out: list[tuple[int, int]] = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            if perms.startswith("rw"):
                lo, hi = (int(x, 16) for x in span.split("-"))
                if out and out[-1][1] == lo:
                    lo = out.pop()[0]
                out.append((lo, hi))
    return out


def gpr_file(uc: Uc, marks: Sequence[int] | None = None) -> ctypes.Array | None:
    """The engine's ``env->regs[16]`` as a ctypes array, or None if it cannot be
    found. Unicorn's own ``uc_reg_write`` of a GPR is a plain store to this
    array, so loads and stores here are equivalent and cost no library call.

    Found by writing marker values through the API and looking for them in the
    writable mappings that pointers in ``struct uc_struct`` lead into; every
    match is checked both ways before use, because other engines (live, or
    freed and not yet reused) can hold the same values: each call takes
    markers of its own unless given some. Where the last engine's array was
    (which pointer of its uc_struct, how far past it) is looked at first: the
    layout is the library's, the same for every engine, so the search of the
    mappings is made once a process unless that place fails its checks."""
    global _mark_serial
    if marks is None:
        _mark_serial += 1
        marks = tuple(m ^ (_mark_serial << 40) for m in _GPR_MARKS)
    for reg, mark in zip(_GPR_UC_IDS, marks, strict=True):
        uc.reg_write(reg, mark)
    want = np.array(marks, dtype=np.uint64)
    regions = _readable_regions()
    ptrs = [p for (p,) in struct.iter_unpack("<Q", ctypes.string_at(uc._uch.value, 4096))]
    found = _at_known_place(uc, ptrs, regions, want)
    if found is None:
        found = _search(uc, ptrs, regions, want)
        if found is not None:
            _remember_place(ptrs, ctypes.addressof(found))
    for reg in _GPR_UC_IDS:
        uc.reg_write(reg, 0)
    return found


# (index of the uc_struct pointer, offset of env->regs past it) of the last find
_known_place: tuple[int, int] | None = None
_REGS_SIZE = 16 * 8
_PLACE_REACH = 1 << 20  # env->regs is ~35 KiB past uc->cpu


def _at_known_place(uc: Uc, ptrs: list[int], regions: list[tuple[int, int]],
                    want: np.ndarray) -> ctypes.Array | None:
    if _known_place is None:
        return None
    slot, delta = _known_place
    lo = ptrs[slot] + delta
    if not any(rlo <= lo and lo + _REGS_SIZE <= rhi for rlo, rhi in regions):
        return None
    return _verified_match(uc, lo, lo + _REGS_SIZE, want)


def _remember_place(ptrs: list[int], addr: int) -> None:
    global _known_place
    near = [(addr - p, i) for i, p in enumerate(ptrs) if 0 <= addr - p < _PLACE_REACH]
    if near:
        delta, slot = min(near)
        _known_place = (slot, delta)


def _search(uc: Uc, ptrs: list[int], regions: list[tuple[int, int]],
            want: np.ndarray) -> ctypes.Array | None:
    """The markers looked for about each pointer of uc_struct, then in the
    mappings those pointers lead into, whole."""
    windows: list[tuple[int, int]] = []
    whole: list[tuple[int, int]] = []
    for ptr in ptrs:
        for lo, hi in regions:
            if lo <= ptr < hi:
                # the CPU state is right by what uc_struct points at (env->regs
                # ~35 KiB past uc->cpu); a window keeps a big heap's search short
                windows.append((max(lo, ptr - _WINDOW) & ~7, min(hi, ptr + _WINDOW)))
                whole.append((lo, hi))
                break
    spans: list[tuple[int, int]] = []
    for lo, hi in sorted(windows):  # overlapping windows (most are) searched once
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(hi, spans[-1][1]))
        else:
            spans.append((lo, hi))
    # the windows first, then the mappings whole, smallest first
    for lo, hi in spans + sorted(set(whole), key=lambda r: r[1] - r[0]):
        found = _verified_match(uc, lo, hi, want)
        if found is not None:
            return found
    return None


def _verified_match(uc: Uc, lo: int, hi: int, want: np.ndarray) -> ctypes.Array | None:
    """Look for the 16 markers in [lo, hi) through a view, not a copy."""
    words = np.ctypeslib.as_array((ctypes.c_uint64 * ((hi - lo) // 8)).from_address(lo))
    for i in np.flatnonzero(words[:-15] == want[0]).tolist():
        if not (words[i:i + 16] == want).all():
            continue
        regs = (ctypes.c_uint64 * 16).from_address(lo + 8 * i)
        old_rax, old_r15 = regs[0], regs[15]
        regs[0] = 0x1234
        ok = uc.reg_read(UC_X86_REG_RAX) == 0x1234
        uc.reg_write(UC_X86_REG_R15, 0x4321)
        ok = ok and regs[15] == 0x4321
        if ok:
            return regs
        regs[0], regs[15] = old_rax, old_r15  # someone else's: leave it as it was
        uc.reg_write(UC_X86_REG_R15, int(want[15]))  # and ours holds its marker again
    return None


_mark_serial = 0


class RegFileByCalls:
    """``env->regs[16]`` through uc_reg_read and uc_reg_write: what gpr_file's
    array is, at the cost of a library call per access. For an engine whose
    register file could not be found (gpr_file's search is a heuristic)."""

    def __init__(self, uc: Uc) -> None:
        self.uc = uc

    def __len__(self) -> int:
        return len(_GPR_UC_IDS)

    def __getitem__(self, i: int) -> int:
        return self.uc.reg_read(_GPR_UC_IDS[i])

    def __setitem__(self, i: int, value: int) -> None:
        self.uc.reg_write(_GPR_UC_IDS[i], value & 0xFFFFFFFFFFFFFFFF)

    def __iter__(self) -> Iterator[int]:
        return (self.uc.reg_read(r) for r in _GPR_UC_IDS)


# --- the instruction counter -------------------------------------------------------

_counter_offset: int | None = None


def _find_counter_offset() -> int:
    """Locate ``emu_counter`` in ``struct uc_struct``: run a counted slice of a
    known length on a scratch engine and look for ``emu_count`` (N) just after
    ``emu_counter`` (N + 1: the count hook stops on the instruction after N)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x2000)
    uc.mem_write(0x1000, b"\x48\xff\xc0" * 1024)  # inc %rax, many times
    n = 0x1D3
    uc.emu_start(0x1000, 0, 0, n)
    raw = ctypes.string_at(uc._uch.value, 8192)
    for off in range(0, len(raw) - 16, 8):
        counter, count = struct.unpack_from("<QQ", raw, off)
        if count == n and counter == n + 1:
            return off
    raise RuntimeError("cannot find unicorn's emu_counter; is unicorn 2.1.4 installed?")


class InsnCounter:
    """Instructions retired by the current counted ``emu_start`` of one engine."""

    def __init__(self, uc: Uc) -> None:
        global _counter_offset
        if _counter_offset is None:
            _counter_offset = _find_counter_offset()
        self._cell = ctypes.c_uint64.from_address(uc._uch.value + _counter_offset)

    def retired(self, budget: int) -> int:
        """Instructions executed by the last ``emu_start(count=budget)``."""
        return min(self._cell.value, budget)


# --- the CPU state blob ----------------------------------------------------------

_dr0_offset: int | None = None
_MARK = 0x5A17C0DEFEED1234


def _find_dr0_offset(uc: Uc, ctx: ctypes.c_void_p, size: int) -> int:
    uc.reg_write(UC_X86_REG_DR0, _MARK)
    uclib.uc_context_save(uc._uch, ctx)
    raw = ctypes.string_at(ctx.value, size)
    uc.reg_write(UC_X86_REG_DR0, 0)
    off = raw.find(struct.pack("<Q", _MARK))
    if off < 0:
        raise RuntimeError("cannot find DR0 in unicorn's context blob")
    return off


class CpuEnv:
    """Access to the private ``CPUX86State`` fields Unicorn leaves out of its API.

    ``env->error_code`` sits 16 bytes before ``dr[0]``, ``env->exception_is_int``
    12 bytes before it and ``env->old_exception`` 96 bytes after it in Unicorn
    2.1.4's ``CPUX86State`` (measured on that version; ``dr[0]`` itself is found
    with a marker value).
    """

    def __init__(self, uc: Uc) -> None:
        global _dr0_offset
        self._uc = uc
        self._size = uclib.uc_context_size(uc._uch)
        self._ctx = ctypes.c_void_p()
        uclib.uc_context_alloc(uc._uch, ctypes.byref(self._ctx))
        # the blob starts after the uc_context header; offsets are relative to the
        # start of the allocation, so the header is included
        alloc = self._size + 64
        if _dr0_offset is None:
            _dr0_offset = _find_dr0_offset(uc, self._ctx, alloc)
        self._old_exc = ctypes.c_int32.from_address(self._ctx.value + _dr0_offset + 96)
        self._err = ctypes.c_int32.from_address(self._ctx.value + _dr0_offset - 16)
        self._is_int = ctypes.c_int32.from_address(self._ctx.value + _dr0_offset - 12)

    def fault_error_code(self) -> int:
        """The error code of the exception being delivered (saves the blob first)."""
        uclib.uc_context_save(self._uc._uch, self._ctx)
        return self._err.value & 0xFFFFFFFF

    def take_exception(self) -> tuple[bool, int]:
        """In an exception hook, with one save of the blob: whether the
        exception is an int3 / int $N, and its error code; and forget it, so
        the next one is not a #DF."""
        uclib.uc_context_save(self._uc._uch, self._ctx)
        taken = bool(self._is_int.value), self._err.value & 0xFFFFFFFF
        self._old_exc.value = -1
        uclib.uc_context_restore(self._uc._uch, self._ctx)
        return taken

    def clear_old_exception(self) -> None:
        """Forget the fault a hook just handled, so the next one is not a #DF."""
        uclib.uc_context_save(self._uc._uch, self._ctx)
        self._old_exc.value = -1
        uclib.uc_context_restore(self._uc._uch, self._ctx)

    def free(self) -> None:
        if self._ctx:
            uclib.uc_context_free(self._ctx)
            self._ctx = ctypes.c_void_p()


# --- virtual memory through the live page tables ----------------------------------

UC_PROT_READ = 1
UC_PROT_WRITE = 2
UC_PROT_EXEC = 4

uclib.uc_vmem_translate.restype = ctypes.c_int
uclib.uc_vmem_translate.argtypes = [
    ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, _c_u64_p,
]


def vmem_translate(uc: Uc, va: int, prot: int = UC_PROT_READ) -> int | None:
    """Physical address of ``va`` through the engine's current CR3, or None.

    A failed translation writes the guest's CR2 (Unicorn raises the fault as
    the MMU would): callers that care save and restore CR2 around it."""
    pa = ctypes.c_uint64()
    err = uclib.uc_vmem_translate(uc._uch, va, prot, ctypes.byref(pa))
    return pa.value if err == 0 else None


__all__ = [
    "CpuEnv", "FastReg", "InsnCounter", "RegBatch", "vmem_translate",
    "UC_PROT_READ", "UC_PROT_WRITE", "UC_PROT_EXEC",
    "UC_HOOK_INSN", "UC_X86_INS_SYSCALL", "UC_X86_REG_RAX",
]
