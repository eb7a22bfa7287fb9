"""The step kinds of the portable hypercall cases, each with its x86 form (GNU
assembler for firmware/tests/cases.S, leaving the result in rax) beside its
Python form (the same hypercall from the Python kernel path). A new kind is one
entry of ``KINDS``; tests/hypercalls/portable.py describes a step.

Arguments are expressions, evaluated by the guest at run time the same way on
both paths: numbers; the symbols of ``SYMBOLS``; ``("pte", sym, flags)`` (a
pagetable entry), ``("slot", sym, n)`` (the machine address of entry n of the
table at mfn sym) and ``("or", e, bits)``; ``("buf", off)``, the address of
byte ``off`` of the guest's argument buffer; ``("out", off)``, the 32-bit field
at ``off`` of the buffer as the previous ``mem`` step's hypercall left it (a
port just bound).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypervisor.public.errno import ENOENT
from hypervisor.public.vcpu import VCPUOP_is_up
from hypervisor.public.xen import DOMID_SELF, Hypercall

ARG_REGS = ("%rdi", "%rsi", "%rdx", "%r10", "%r8")
BUF_SIZE = 512  # the argument buffer; `mem` steps write at most this much


class Ctx:
    """The Python path's view of a running case: the guest and its symbols."""

    def __init__(self, guest: Any) -> None:
        self.g = guest
        self.last = bytes(BUF_SIZE)  # the buffer as the last `mem` hypercall left it

    def value(self, e: object) -> int:
        if isinstance(e, int):
            return e
        if isinstance(e, str):
            return SYMBOLS[e][1](self.g)
        kind, *rest = e  # type: ignore[misc]
        if kind == "buf":
            return self.g.scratch + rest[0]
        if kind == "out":
            return struct.unpack_from("<I", self.last, rest[0])[0]
        if kind == "or":
            return self.value(rest[0]) | rest[1]
        base = self.value(rest[0]) << 12
        return base | rest[1] if kind == "pte" else base + 8 * rest[1]


# symbol: (x86 code leaving it in rax, its value from the Python path)
SYMBOLS: dict[str, tuple[str, Callable[[Any], int]]] = {
    "free_pfn": ("call sym_free_pfn", lambda g: g.nr_pages - 1),
    "free_mfn": ("call sym_free_mfn", lambda g: g.mfn(g.nr_pages - 1)),
    "free_va": ("call sym_free_va", lambda g: g.va(g.nr_pages - 1)),
    "l4_mfn": ("call sym_l4_mfn", lambda g: g.l4_mfn),
    "xen_frame": ("mov $1, %eax", lambda g: 1),
    "mmio_frame": ("movabs $0x1000000000, %rax", lambda g: 1 << 36),
    # the page below the top one: a second free page
    "spare_pfn": ("call sym_spare_pfn", lambda g: g.nr_pages - 2),
    "spare_mfn": ("call sym_spare_mfn", lambda g: g.mfn(g.nr_pages - 2)),
    "spare_va": ("call sym_spare_va", lambda g: g.va(g.nr_pages - 2)),
    # the machine address of the bootstrap L1 entry that maps free_va
    "free_l1e": ("call sym_free_l1e", lambda g: g.l1e_maddr(g.va(g.nr_pages - 1))),
    # the bootstrap L2 on free_va's path
    "l2_mfn": ("call sym_l2_mfn", lambda g: g.table_mfn(g.va(g.nr_pages - 1), 2)),
    # where the p2m list keeps free_pfn's frame
    "p2m_free": ("call sym_p2m_free", lambda g: g.si.mfn_list + 8 * (g.nr_pages - 1)),
}


def expr(e: object) -> list[str]:
    """x86 code leaving the value of ``e`` in rax."""
    if isinstance(e, int):
        return [f"movabs ${e & (2**64 - 1):#x}, %rax"]
    if isinstance(e, str):
        return [SYMBOLS[e][0]]
    kind, *rest = e  # type: ignore[misc]
    if kind == "buf":
        return [f"lea scratch+{rest[0]}(%rip), %rax"]
    if kind == "out":
        return [f"mov lastbuf+{rest[0]}(%rip), %eax"]
    if kind == "or":
        return expr(rest[0]) + [f"movabs ${rest[1]:#x}, %rcx", "or %rcx, %rax"]
    out = expr(rest[0]) + ["shl $12, %rax"]
    if kind == "pte":
        return out + [f"movabs ${rest[1]:#x}, %rcx", "or %rcx, %rax"]
    return out + [f"add ${8 * rest[1]}, %rax"]


def call(nr: int, args: list[object]) -> list[str]:
    """Evaluate args onto the stack, pop them into the ABI registers, call."""
    out: list[str] = []
    for a in args:
        out += expr(a) + ["push %rax"]
    for reg in reversed(ARG_REGS[:len(args)]):
        out.append(f"pop {reg}")
    return out + [f"call hypercall_page + {nr} * 32"]


def words(data: list[object]) -> list[object]:
    """A ``mem`` step's buffer as 64-bit words: bytes (a public struct's
    contents) are split, padded with zeros; anything else is one word."""
    out: list[object] = []
    for item in data:
        if isinstance(item, bytes | bytearray):
            raw = bytes(item) + bytes(-len(item) % 8)
            out += [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
        else:
            out.append(item)
    assert 8 * len(out) <= BUF_SIZE, "a mem step's buffer is too big"
    return out


def fill_buffer(data: list[object]) -> list[str]:
    """x86: the words evaluated first (they may read the last buffer), then stored."""
    ws = words(data)
    out: list[str] = []
    for w in ws:
        out += expr(w) + ["push %rax"]
    for i in reversed(range(len(ws))):
        out += ["pop %rax", f"mov %rax, scratch+{8 * i}(%rip)"]
    return out


@dataclass(frozen=True)
class Kind:
    """A step kind: the hypercall it makes (None: the step's first argument
    names it; NO_HYPERCALL: it reads or writes the guest's own memory), its x86
    code from the step's arguments, and its Python form."""
    hypercall: Hypercall | int | None
    x86: Callable[[list], list[str]]
    python: Callable[[Ctx, list], int]


def _x86_mmuext(args: list, fd: object = DOMID_SELF) -> list[str]:
    cmd, a1, a2 = args[:3]
    return (expr(a1) + ["mov %rax, scratch+8(%rip)"] + expr(a2)
            + ["mov %rax, scratch+16(%rip)", f"movq ${cmd}, scratch(%rip)"]
            + expr(fd) + ["mov %rax, %r10", "lea scratch(%rip), %rdi", "mov $1, %esi",
                          "lea scratch+32(%rip), %rdx",
                          f"call hypercall_page + {Hypercall.mmuext_op} * 32"])


def _x86_mmu_update(args: list) -> list[str]:
    ptr, val = args
    return (expr(ptr) + ["mov %rax, scratch(%rip)"] + expr(val)
            + ["mov %rax, scratch+8(%rip)", "lea scratch(%rip), %rdi", "mov $1, %esi",
               "lea scratch+32(%rip), %rdx", f"mov ${DOMID_SELF}, %r10d",
               f"call hypercall_page + {Hypercall.mmu_update} * 32"])


def _x86_query(args: list) -> list[str]:
    return [f"movw ${DOMID_SELF}, scratch(%rip)", f"mov ${args[0]}, %edi",
            "lea scratch(%rip), %rsi", f"call hypercall_page + {Hypercall.memory_op} * 32"]


def _py_query(c: Ctx, args: list) -> int:
    c.g.cpu.write(c.g.scratch, DOMID_SELF.to_bytes(2, "little"))
    return c.g.cpu.hypercall(Hypercall.memory_op, c.value(args[0]), c.g.scratch)


def _x86_mem(args: list) -> list[str]:
    nr, hargs, data = args
    return fill_buffer(data) + call(nr, list(hargs)) + ["call save_buffer"]


def _py_mem(c: Ctx, args: list) -> int:
    nr, hargs, data = args
    values = [c.value(w) for w in words(data)]
    hv = [c.value(a) for a in hargs]  # before the buffer is written, as on x86
    c.g.cpu.write(c.g.scratch, b"".join(struct.pack("<Q", v & (2**64 - 1)) for v in values))
    rc = c.g.cpu.hypercall(c.value(nr), *hv)
    c.last = c.g.cpu.read(c.g.scratch, BUF_SIZE)
    return rc


def _x86_mem_result(args: list) -> list[str]:
    *rest, off = args
    return _x86_mem(rest) + [f"mov lastbuf+{off}(%rip), %rax"]


def _py_mem_result(c: Ctx, args: list) -> int:
    *rest, off = args
    _py_mem(c, rest)
    return struct.unpack_from("<q", c.last, off)[0]


def _x86_last(args: list) -> list[str]:
    return [f"mov lastbuf+{args[0]}(%rip), %eax"]


def _x86_peek(args: list) -> list[str]:
    return expr(args[0]) + ["mov (%rax), %rax"]


def _x86_poke(args: list) -> list[str]:
    return expr(args[0]) + ["push %rax"] + expr(args[1]) + [
        "pop %rcx", "mov %rax, (%rcx)", "xor %eax, %eax"]


def _py_poke(c: Ctx, args: list) -> int:
    c.g.cpu.write_u64(c.value(args[0]), c.value(args[1]) & (2**64 - 1))
    return 0


NO_HYPERCALL = -1  # a step that reads or writes the guest's own memory

KINDS: dict[str, Kind] = {
    # ("hypercall", nr, *args): nr(args) with the args in registers
    "hypercall": Kind(None, lambda a: call(a[0], list(a[1:])),
                      lambda c, a: c.g.cpu.hypercall(*[c.value(x) for x in a])),
    # ("uvm", va, val, flags): update_va_mapping
    "uvm": Kind(Hypercall.update_va_mapping,
                lambda a: call(Hypercall.update_va_mapping, list(a)),
                lambda c, a: c.g.update_va_mapping(*[c.value(x) for x in a])),
    # ("mmuext", cmd, arg1, arg2): one mmuext_op for DOMID_SELF
    "mmuext": Kind(Hypercall.mmuext_op, _x86_mmuext,
                   lambda c, a: c.g.mmuext1(*[c.value(x) for x in a])),
    # ("mmuext_fd", cmd, arg1, arg2, foreigndom): one mmuext_op for foreigndom
    "mmuext_fd": Kind(Hypercall.mmuext_op, lambda a: _x86_mmuext(a, a[3]),
                      lambda c, a: c.g.mmuext1(*[c.value(x) for x in a[:3]],
                                               foreigndom=c.value(a[3]))),
    # ("mmu_update", ptr, val): one request for DOMID_SELF; the call's rc
    "mmu_update": Kind(Hypercall.mmu_update, _x86_mmu_update,
                       lambda c, a: c.g.mmu_update([(c.value(a[0]), c.value(a[1]))])[0]),
    # ("query", op): memory_op(op, &DOMID_SELF)
    "query": Kind(Hypercall.memory_op, _x86_query, _py_query),
    # ("mem", nr, [args], [words]): the buffer ("buf", 0) filled with words, nr(args)
    "mem": Kind(None, _x86_mem, _py_mem),
    # ("mem_result", nr, [args], [words], off): as mem; the result is the 64-bit
    # field at off of the buffer afterwards (a multicall entry's result)
    "mem_result": Kind(None, _x86_mem_result, _py_mem_result),
    # ("last", off): the 32-bit field at off of the buffer as the last mem step's
    # hypercall left it (a done count)
    "last": Kind(NO_HYPERCALL, _x86_last,
                 lambda c, a: struct.unpack_from("<I", c.last, a[0])[0]),
    # ("peek", addr): the 64-bit word the guest reads at addr
    "peek": Kind(NO_HYPERCALL, _x86_peek, lambda c, a: c.g.cpu.read_u64(c.value(a[0]))),
    # ("poke", addr, value): the guest writes value at addr (its own page); 0
    "poke": Kind(NO_HYPERCALL, _x86_poke, _py_poke),
}


def hypercall_of(kind: str, args: list) -> int:
    """The hypercall a step makes (NO_HYPERCALL for a read or write of memory)."""
    k = KINDS[kind]
    return int(k.hypercall if k.hypercall is not None else args[0])


def _x86_needs_vcpus(n: int) -> list[str]:
    return call(Hypercall.vcpu_op, [VCPUOP_is_up, n - 1, 0]) + [
        f"cmp ${-ENOENT}, %rax", "setne %al", "movzbl %al, %eax"]


def _py_needs_vcpus(c: Ctx, n: int) -> bool:
    return c.g.cpu.hypercall(Hypercall.vcpu_op, VCPUOP_is_up, n - 1, 0) != -ENOENT


@dataclass(frozen=True)
class Need:
    """What a case may need of its domain, ``("needs", name, n)`` as its first
    step: without it the case is skipped and the verdict is at least SKIP.
    x86 code leaves rax non-zero when the need is met."""
    x86: Callable[[int], list[str]]
    python: Callable[[Ctx, int], bool]
    what: str  # shown in the skip message, formatted with n


NEEDS: dict[str, Need] = {
    # VCPU n-1 exists (VCPUOP_is_up answers -ENOENT for a VCPU the domain lacks)
    "vcpus": Need(_x86_needs_vcpus, _py_needs_vcpus, "{n} VCPUs"),
}
