"""``pvlab run --trace N``: the first N instructions each VCPU executes,
disassembled with capstone, with symbols from the guest image and the names of
the Python kernel's native entries.

A Python code hook on every instruction costs ~1000x; it is attached only for
the traced prefix and removed between slices (removing a code hook inside a
run makes Unicorn raise a hidden #PF), with CR2 and the CPU's
old_exception repaired after.
"""

from __future__ import annotations

import bisect
from typing import IO, Any

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from unicorn import UC_HOOK_CODE, UcError
from unicorn.x86_const import UC_X86_REG_CR2

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor


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
        image = getattr(dom, "image", None)
        self.symbols = Symbols(image.symbols if image is not None else {})
        self.left: dict[int, int] = {}
        self.hooks: dict[int, Any] = {}

    def attach(self) -> None:
        for v in self.dom.vcpus:
            self.left[v.vcpu_id] = self.count
            self.hooks[v.vcpu_id] = v.uc.hook_add(UC_HOOK_CODE, self._hook, v)
            v.after_slice = self._after_slice
            v.on_native = self._native

    def _name(self, addr: int) -> str:
        sym = self.symbols.lookup(addr)
        return f"<{sym}>" if sym else ""

    def _native(self, vcpu: Any, addr: int, fn: Any) -> None:
        """A native entry: no x86 instruction runs there, the kernel's Python does."""
        n = self.left.get(vcpu.vcpu_id, 0)
        if n <= 0:
            return
        self.left[vcpu.vcpu_id] = n - 1
        self.out.write(f"trace d{self.dom.domid}v{vcpu.vcpu_id} k {addr:016x} "
                       f"{'<native>':<40} python {fn.__module__}.{fn.__qualname__}\n")

    def _hook(self, uc: Any, addr: int, size: int, vcpu: Any) -> None:
        n = self.left.get(vcpu.vcpu_id, 0)
        if n <= 0:
            vcpu.request_stop()
            uc.emu_stop()
            return
        self.left[vcpu.vcpu_id] = n - 1
        code = domctl.gdbsx_guestmemio(self.hv, self.dom, vcpu.vcpu_id, addr, max(size, 1)) \
            or b""
        text = "(unreadable)"
        for insn in self.cs.disasm(code, addr):
            text = f"{insn.mnemonic} {insn.op_str}".strip()
            break
        mode = "k" if vcpu.in_kernel else "u"
        self.out.write(f"trace d{self.dom.domid}v{vcpu.vcpu_id} {mode} {addr:016x} "
                       f"{self._name(addr):<40} {text}\n")

    def _after_slice(self, vcpu: Any) -> None:
        if self.left.get(vcpu.vcpu_id, 0) > 0 or vcpu.vcpu_id not in self.hooks:
            return
        uc = vcpu.uc
        cr2 = uc.reg_read(UC_X86_REG_CR2)
        try:
            uc.hook_del(self.hooks.pop(vcpu.vcpu_id))
        except UcError:
            pass
        uc.reg_write(UC_X86_REG_CR2, cr2)
        vcpu.env.clear_old_exception()
        vcpu.after_slice = None
        vcpu.on_native = None
