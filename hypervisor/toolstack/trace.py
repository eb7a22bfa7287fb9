"""``pvlab run --trace N``: the first N instructions each VCPU executes,
disassembled with capstone, with symbols from the guest image and the names of
the Python kernel's native entries.

The hypervisor traces for it (domctl.debug_trace): a code hook on every
instruction costs ~1000x, so it is attached only for the traced prefix.
"""

from __future__ import annotations

import bisect
from functools import partial
from typing import IO, Any

from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.toolstack.context import domain_of


class Symbols:
    def __init__(self, symbols: dict[int, str]) -> None:
        self.addrs = sorted(symbols)
        self.names = [symbols[a] for a in self.addrs]

    def lookup(self, addr: int) -> str:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0:
            return ""
        off = addr - self.addrs[i]
        if off > 0x100000:
            return ""
        return f"{self.names[i]}+{off:#x}" if off else self.names[i]


class Tracer:
    def __init__(self, hv: Hypervisor, dom: Domain, count: int, out: IO[str]) -> None:
        self.hv = hv
        self.dom = dom
        self.count = count
        self.out = out
        self.cs = Cs(CS_ARCH_X86, CS_MODE_64)
        image = domain_of(hv, dom).image
        self.symbols = Symbols(image.symbols if image is not None else {})
        self.left: dict[int, int] = {}

    def attach(self) -> None:
        for v in range(domctl.max_vcpus(self.dom)):
            self.left[v] = self.count
            domctl.debug_trace(self.dom, v, partial(self._more, v), partial(self._insn, v),
                               partial(self._native, v))

    def _more(self, vcpu_id: int) -> bool:
        return self.left.get(vcpu_id, 0) > 0

    def _name(self, addr: int) -> str:
        sym = self.symbols.lookup(addr)
        return f"<{sym}>" if sym else ""

    def _native(self, vcpu_id: int, addr: int, fn: Any) -> None:
        """A native entry: no x86 instruction runs there, the kernel's Python does."""
        self.left[vcpu_id] -= 1
        self.out.write(f"trace d{self.dom.domid}v{vcpu_id} k {addr:016x} "
                       f"{'<native>':<40} python {fn.__module__}.{fn.__qualname__}\n")

    def _insn(self, vcpu_id: int, addr: int, size: int, in_kernel: bool) -> None:
        self.left[vcpu_id] -= 1
        code = domctl.gdbsx_guestmemio(self.hv, self.dom, vcpu_id, addr, max(size, 1)) or b""
        text = "(unreadable)"
        for insn in self.cs.disasm(code, addr):
            text = f"{insn.mnemonic} {insn.op_str}".strip()
            break
        mode = "k" if in_kernel else "u"
        self.out.write(f"trace d{self.dom.domid}v{vcpu_id} {mode} {addr:016x} "
                       f"{self._name(addr):<40} {text}\n")
