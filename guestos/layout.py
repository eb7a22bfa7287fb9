"""Kernel data structures as layouts in guest memory.

A ``Layout`` names fields at offsets of a struct that lives at some guest
virtual address; ``Ref`` binds one to an address and a VCPU, so that
``task.state = 2`` is a write to guest memory. No value is cached in Python.
"""

from __future__ import annotations

import struct

from hypervisor.public.native import NativeCpu

_FMT = {"u8": "<B", "u16": "<H", "u32": "<I", "u64": "<Q"}


class Layout:
    def __init__(self, name: str, fields: list[tuple[str, str]]) -> None:
        self.name = name
        self.fields: dict[str, tuple[int, struct.Struct]] = {}
        off = 0
        for fname, ftype in fields:
            s = struct.Struct(_FMT[ftype])
            off = (off + s.size - 1) // s.size * s.size
            self.fields[fname] = (off, s)
            off += s.size
        self.size = (off + 7) // 8 * 8

    def at(self, cpu: NativeCpu, va: int) -> Ref:
        return Ref(self, cpu, va)


class Ref:
    __slots__ = ("_layout", "_cpu", "va")

    def __init__(self, layout: Layout, cpu: NativeCpu, va: int) -> None:
        object.__setattr__(self, "_layout", layout)
        object.__setattr__(self, "_cpu", cpu)
        object.__setattr__(self, "va", va)

    def __getattr__(self, name: str) -> int:
        off, s = self._layout.fields[name]
        return s.unpack(self._cpu.read(self.va + off, s.size))[0]

    def __setattr__(self, name: str, value: int) -> None:
        off, s = self._layout.fields[name]
        self._cpu.write(self.va + off, s.pack(value & ((1 << (8 * s.size)) - 1)))
