"""Binding a Python guest kernel to a domain: native entry points.

The image's native text range holds int3 bytes that never execute: the range
is mapped no-execute, so a jump there faults at exactly the entry's address,
and the VCPU's exception hook runs the Python function for that address
instead. The function then either returns to the caller (pop the return
address, result in rax) or makes the hypercall it ended with, resuming at its
continuation (hypervisor/public/native.py has the contract).

A native call reaches nothing but its VCPU: the machine's walker and memory,
and the exits the VCPU was given (the hypercall table, the MMIO bus).
"""

from __future__ import annotations

import importlib
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hypervisor.cpu.vcpu import R8, R10, RAX, RDI, RDX, RSI, RSP
from hypervisor.mm.walker import PFEC_PRESENT, GuestFault
from hypervisor.public.native import NATIVE_ENTRY_STRIDE, TailCall

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu
    from hypervisor.domain import Domain

log = logging.getLogger(__name__)

# the 64-bit PV hypercall ABI's argument registers (xen-x86_64.h), in order
ARG_REGS = (RDI, RSI, RDX, R10, R8)


class KernelError(Exception):
    """The guest kernel module cannot be bound (missing, or too many entries)."""


class NativeCpu:
    """The VCPU as a native kernel function sees it (one per entry)."""

    __slots__ = ("vcpu", "vcpu_id", "_walker", "_kernel", "_regs")

    def __init__(self, vcpu: Vcpu, kernel: NativeKernel) -> None:
        self.vcpu = vcpu
        self.vcpu_id = vcpu.vcpu_id
        self._walker = vcpu.machine.walker
        self._kernel = kernel
        self._regs: dict[str, int] | None = None

    def regs(self) -> dict[str, int]:
        if self._regs is None:
            self._regs = self.vcpu.read_regs()
        return self._regs

    def reg(self, name: str) -> int:
        return self.regs()[name]

    def set_regs(self, **regs: int) -> None:
        self.vcpu.write_regs(**regs)
        if self._regs is not None:
            self._regs.update(regs)

    def read(self, va: int, size: int) -> bytes:
        return self._walker.read(self.vcpu.current_table, va, size)

    def write(self, va: int, data: bytes) -> None:
        try:
            self._walker.write(self.vcpu.current_table, va, data)
        except GuestFault as f:
            self._ro_fault(f, va, data)

    def read_u64(self, va: int) -> int:
        return self._walker.read_u64(self.vcpu.current_table, va)

    def write_u64(self, va: int, value: int) -> None:
        value &= 0xFFFFFFFFFFFFFFFF
        try:
            self._walker.write_u64(self.vcpu.current_table, va, value)
        except GuestFault as f:
            self._ro_fault(f, va, value.to_bytes(8, "little"))

    def _ro_fault(self, fault: GuestFault, va: int, data: bytes) -> None:
        """A store that hit a read-only page: Xen emulates it if it writes
        an L1 pagetable the guest may write that way; otherwise the kernel
        takes the fault."""
        if fault.error_code & PFEC_PRESENT and fault.va == va \
                and self.vcpu.exits.ptwr_store(self.vcpu, va, data):
            return
        raise fault

    def readl(self, va: int, size: int = 4) -> int:
        """A load from device memory (or RAM) at ``va``, through the live
        pagetables, as the VCPU would make it: 1, 2 or 4 bytes."""
        maddr = self._walker.translate(self.vcpu.current_table, va)
        memory = self.vcpu.machine.memory
        if maddr + size <= memory.size:
            return int.from_bytes(memory.read(maddr, size), "little")
        return self.vcpu.exits.bus.read(self.vcpu.domain, maddr, size)

    def writel(self, va: int, value: int, size: int = 4) -> None:
        """A store to device memory (or RAM) at ``va``: 1, 2 or 4 bytes."""
        maddr = self._walker.translate(self.vcpu.current_table, va, write=True)
        value &= (1 << (8 * size)) - 1
        memory = self.vcpu.machine.memory
        if maddr + size <= memory.size:
            memory.write(maddr, value.to_bytes(size, "little"))
        else:
            self.vcpu.exits.bus.write(self.vcpu.domain, maddr, size, value)

    def hypercall(self, op: int, *args: int) -> int:
        rc = self.vcpu.exits.hypercall(self.vcpu, op, args)
        return 0 if rc is None else rc

    def native_addr(self, fn: Callable[..., object]) -> int:
        return self._kernel.addr_of(fn)

    def trace_marker(self, text: str) -> None:
        tbuf = self.vcpu.domain.tbuf
        if tbuf is not None:
            tbuf.marker(self.vcpu.domain.scheduler.now(), self.vcpu_id, text)


class NativeKernel:
    """A Python kernel module bound to a domain's native text range."""

    def __init__(self, domain: Domain, module_name: str, text: int, size: int) -> None:
        try:
            self.module = importlib.import_module(module_name)
        except ImportError as e:
            raise KernelError(
                f"the image's kernel module {module_name!r} cannot be imported: {e}") from None
        entries = list(self.module.native_entries())
        if len(entries) * NATIVE_ENTRY_STRIDE > size:
            raise KernelError(f"{module_name} has {len(entries)} native entries; the image's "
                              f"native text ({size} bytes) holds {size // NATIVE_ENTRY_STRIDE}")
        self.domain = domain
        self.name = module_name
        self.text = text
        self.size = size
        self.entries: dict[int, Callable[..., Any]] = {
            text + NATIVE_ENTRY_STRIDE * i: fn for i, fn in enumerate(entries)}
        self._addr = {fn: a for a, fn in self.entries.items()}
        self.calls = 0

    def cmdline_error(self, cmdline: str) -> str:
        """The kernel's own check of its options (its ``check_cmdline`` hook,
        if it has one): "" or why it cannot obey them."""
        hook = getattr(self.module, "check_cmdline", None)
        return str(hook(cmdline)) if hook is not None else ""

    def names(self) -> list[str]:
        return [fn.__qualname__ for fn in self.entries.values()]

    def addr_of(self, fn: Callable[..., object]) -> int:
        try:
            return self._addr[fn]
        except KeyError:
            raise KernelError(f"{fn.__qualname__} is not a native entry of {self.name}") from None

    def bind(self, vcpu: Vcpu) -> None:
        vcpu.bind_native(self.text, self.text + self.size, self.enter)

    def _oops(self, vcpu: Vcpu, cpu: NativeCpu, fn: Callable[..., Any], e: Exception) -> None:
        """A kernel function raised: let the kernel report it (its ``oops``
        hook, if it has one), then the domain crashes, as after a Linux oops."""
        report = f"kernel oops in {fn.__module__}.{fn.__qualname__}: {type(e).__name__}: {e}"
        hook = getattr(self.module, "oops", None)
        if hook is not None:
            try:
                hook(cpu, e)
            except Exception:  # noqa: BLE001 - a broken oops hook must not hide the first oops
                log.info("the kernel's oops hook failed too", exc_info=True)
        vcpu.domain.crash(vcpu, report)

    def enter(self, vcpu: Vcpu, addr: int) -> None:
        """The VCPU reached ``addr`` in the native text range."""
        fn = self.entries.get(addr)
        dom = vcpu.domain
        if fn is None:
            dom.crash(vcpu, f"jump to {addr:#x} in native text, which is no entry point")
            vcpu.uc.emu_stop()
            return
        self.calls += 1
        if vcpu.on_native is not None:
            vcpu.on_native(vcpu, addr, fn)
        if dom.tbuf is not None:
            dom.tbuf.native(dom.scheduler.now(), vcpu.vcpu_id, fn.__qualname__)
        exits = vcpu.exits
        dom.update_time_now(vcpu)
        cpu = NativeCpu(vcpu, self)
        try:
            result = fn(cpu)
            if isinstance(result, TailCall):
                if result.continuation is not None:
                    vcpu.set_rip(self.addr_of(result.continuation))
                # the arguments where the ABI has them: the toolstack reads the
                # suspend hypercall's third (start_info's mfn) from vcpu0's rdx
                for reg, a in zip(ARG_REGS, result.args, strict=False):
                    vcpu.gpr[reg] = a & 0xFFFFFFFFFFFFFFFF
                rc = exits.hypercall(vcpu, result.op, result.args)
                if rc is not None and dom.is_running:
                    vcpu.gpr[RAX] = rc & 0xFFFFFFFFFFFFFFFF
            else:
                rsp = vcpu.gpr[RSP]
                ret = vcpu.machine.walker.read_u64(vcpu.current_table, rsp)
                vcpu.write_regs(rax=0 if result is None else result, rsp=rsp + 8, rip=ret)
        except GuestFault as f:
            log.debug("kernel fault", exc_info=True)
            dom.crash(vcpu, f"kernel fault in {fn.__qualname__}: {f}")
        except Exception as e:  # noqa: BLE001 - the kernel is guest code: its bugs crash the guest
            log.info("guest kernel oops in %s", fn.__qualname__, exc_info=True)
            self._oops(vcpu, cpu, fn, e)
        exits.return_to_guest(vcpu)
        if vcpu.stop_requested or not dom.is_running:
            vcpu.uc.emu_stop()


def stack_words(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}Q", data))
