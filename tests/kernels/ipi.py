"""A two-VCPU test kernel for event channels: vcpu0 binds an IPI port to vcpu1,
brings vcpu1 up and sends the IPI; vcpu1 blocks (which enables its events) and
its upcall handler records what arrived.

With ``MASKED``, vcpu0 first sets the port's mask bit in shared_info (Xen leaves
masking to the guest: binding a port does not touch it), sends, yields until
vcpu1 has blocked, and only then unmasks with EVTCHNOP_unmask: the upcall must
come after the unmask."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

from hypervisor.public.arch_x86 import VGCF_in_kernel, vcpu_guest_context
from hypervisor.public.event_channel import EVTCHNOP_bind_ipi, EVTCHNOP_send, EVTCHNOP_unmask
from hypervisor.public.native import VIRT_BASE, TailCall, pvlab_image_header
from hypervisor.public.sched import (
    SCHEDOP_block,
    SCHEDOP_shutdown,
    SCHEDOP_yield,
    SHUTDOWN_poweroff,
)
from hypervisor.public.vcpu import VCPUOP_initialise, VCPUOP_up
from hypervisor.public.xen import Hypercall, start_info

HEADER_SIZE = ctypes.sizeof(pvlab_image_header)
MASKED = False
LOG: list[str] = []
SHINFO_MASK = 2560
BLOCKED_FLAG = 0x108  # in the data area: vcpu1 is about to block


def _data(cpu: Any) -> int:
    return pvlab_image_header.from_buffer_copy(cpu.read(VIRT_BASE, HEADER_SIZE)).kernel_data


def _evtchn(cpu: Any, cmd: int, fmt: str, *vals: int) -> tuple[int, tuple[int, ...]]:
    buf = _data(cpu) + 0x200 + 0x40 * cpu.vcpu_id
    cpu.write(buf, struct.pack(fmt, *vals))
    rc = cpu.hypercall(Hypercall.event_channel_op, cmd, buf)
    return rc, struct.unpack(fmt, cpu.read(buf, struct.calcsize(fmt)))


def start(cpu: Any) -> TailCall:
    LOG.clear()
    data = _data(cpu)
    rc, (_, port) = _evtchn(cpu, EVTCHNOP_bind_ipi, "<II", 1, 0)
    LOG.append(f"bind_ipi {rc} port {port}")
    cpu.write_u64(data + 0x100, port)
    if MASKED:
        # map shared_info over a page of our data area, and mask the port there
        si = start_info.from_buffer_copy(cpu.read(cpu.reg("rsi"), ctypes.sizeof(start_info)))
        shinfo = data + 0x2000
        cpu.hypercall(Hypercall.update_va_mapping, shinfo, si.shared_info | 0x67, 0)
        word = shinfo + SHINFO_MASK + 8 * (port // 64)
        cpu.write_u64(word, cpu.read_u64(word) | (1 << (port % 64)))
    ctx = vcpu_guest_context()
    ctx.flags = VGCF_in_kernel
    ctx.user_regs.rip = cpu.native_addr(secondary)
    ctx.user_regs.rsp = data + 0xF000
    ctx.ctrlreg[3] = _kernel_cr3(cpu, cpu.reg("rsi"))
    ctx.event_callback_eip = cpu.native_addr(on_event)
    buf = data + 0x1000
    cpu.write(buf, bytes(ctx))
    LOG.append(f"init {cpu.hypercall(Hypercall.vcpu_op, VCPUOP_initialise, 1, buf)}")
    LOG.append(f"up {cpu.hypercall(Hypercall.vcpu_op, VCPUOP_up, 1, 0)}")
    rc, _ = _evtchn(cpu, EVTCHNOP_send, "<I", port)
    LOG.append(f"send {rc}")
    return TailCall(Hypercall.sched_op, (SCHEDOP_yield, 0), after_yield)


def _kernel_cr3(cpu: Any, start_info_va: int) -> int:
    """The bootstrap L4's machine address: start_info.pt_base, through the p2m."""
    si = start_info.from_buffer_copy(cpu.read(start_info_va, ctypes.sizeof(start_info)))
    pfn = (si.pt_base - VIRT_BASE) >> 12
    return cpu.read_u64(si.mfn_list + 8 * pfn) << 12


def after_yield(cpu: Any) -> TailCall:
    port = cpu.read_u64(_data(cpu) + 0x100)
    if MASKED and not cpu.read_u64(_data(cpu) + BLOCKED_FLAG):
        # one yield is no wait: vcpu1 may not have run yet in this schedule
        return TailCall(Hypercall.sched_op, (SCHEDOP_yield, 0), after_yield)
    if MASKED:
        LOG.append("vcpu0 unmasks")
        _evtchn(cpu, EVTCHNOP_unmask, "<I", port)
    return TailCall(Hypercall.sched_op, (SCHEDOP_block, 0), after_yield)


def secondary(cpu: Any) -> TailCall:
    LOG.append("vcpu1 blocks")
    cpu.write_u64(_data(cpu) + BLOCKED_FLAG, 1)
    return TailCall(Hypercall.sched_op, (SCHEDOP_block, 0), woken)


def woken(cpu: Any) -> TailCall:
    LOG.append("vcpu1 woken")
    return TailCall(Hypercall.sched_op, (SCHEDOP_block, 0), woken)


def on_event(cpu: Any) -> TailCall:
    data = _data(cpu)
    LOG.append(f"upcall on vcpu{cpu.vcpu_id}")
    buf = data + 0x300
    cpu.write(buf, struct.pack("<I", SHUTDOWN_poweroff))
    return TailCall(Hypercall.sched_op, (SCHEDOP_shutdown, buf), None)


def native_entries() -> list[Callable[..., object]]:
    return [start, secondary, on_event, after_yield, woken]
