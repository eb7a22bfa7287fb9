"""A test kernel for sched_op's blocking and timers, from the Python kernel
path. ``MODE`` picks what vcpu0 does after binding an IPI port to itself:

* ``timeout``: SCHEDOP_poll on the port with a timeout at system time
  POLL_TIMEOUT_NS; nothing sets it pending, so the poll ends at the timeout;
* ``event``: brings vcpu1 up, which sends to the port (a masked port: the
  poller wakes all the same), then polls with no timeout;
* ``watchdog``: arms a watchdog of WATCHDOG_S seconds and blocks for good.

Each continuation logs the poll's result, then powers off."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

from hypervisor.public.arch_x86 import VGCF_in_kernel, vcpu_guest_context
from hypervisor.public.event_channel import EVTCHNOP_bind_ipi, EVTCHNOP_send
from hypervisor.public.native import VIRT_BASE, TailCall, pvlab_image_header
from hypervisor.public.sched import (
    SCHEDOP_block,
    SCHEDOP_poll,
    SCHEDOP_shutdown,
    SCHEDOP_watchdog,
    SHUTDOWN_poweroff,
)
from hypervisor.public.vcpu import VCPUOP_initialise, VCPUOP_up
from hypervisor.public.xen import Hypercall, start_info

HEADER_SIZE = ctypes.sizeof(pvlab_image_header)
MODE = "timeout"
POLL_TIMEOUT_NS = 50_000_000
WATCHDOG_S = 1
SHINFO_MASK = 2560  # shared_info.evtchn_mask
LOG: list[str] = []


def _data(cpu: Any) -> int:
    return pvlab_image_header.from_buffer_copy(cpu.read(VIRT_BASE, HEADER_SIZE)).kernel_data


def _call(cpu: Any, op: int, cmd: int, data: bytes) -> int:
    buf = _data(cpu) + 0x200 + 0x40 * cpu.vcpu_id
    cpu.write(buf, data)
    return cpu.hypercall(op, cmd, buf)


def _poll(cpu: Any, port: int, timeout: int) -> TailCall:
    buf = _data(cpu) + 0x400
    cpu.write(buf + 0x20, struct.pack("<I", port))
    cpu.write(buf, struct.pack("<QIIQ", buf + 0x20, 1, 0, timeout))
    return TailCall(Hypercall.sched_op, (SCHEDOP_poll, buf), after_poll)


def start(cpu: Any) -> TailCall:
    LOG.clear()
    data = _data(cpu)
    port = struct.unpack("<II", _bind_ipi(cpu))[1]
    cpu.write_u64(data + 0x100, port)
    if MODE == "watchdog":
        rc = _call(cpu, Hypercall.sched_op, SCHEDOP_watchdog, struct.pack("<II", 0, WATCHDOG_S))
        LOG.append(f"watchdog {rc}")
        return TailCall(Hypercall.sched_op, (SCHEDOP_block, 0), None)
    if MODE == "timeout":
        return _poll(cpu, port, POLL_TIMEOUT_NS)
    _mask(cpu, port)
    _start_vcpu1(cpu)
    return _poll(cpu, port, 0)


def _bind_ipi(cpu: Any) -> bytes:
    buf = _data(cpu) + 0x200
    cpu.write(buf, struct.pack("<II", 0, 0))
    assert cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_bind_ipi, buf) == 0
    return cpu.read(buf, 8)


def _mask(cpu: Any, port: int) -> None:
    """Map shared_info over a page of the data area and set the port's mask."""
    si = start_info.from_buffer_copy(cpu.read(cpu.reg("rsi"), ctypes.sizeof(start_info)))
    shinfo = _data(cpu) + 0x2000
    cpu.hypercall(Hypercall.update_va_mapping, shinfo, si.shared_info | 0x67, 0)
    word = shinfo + SHINFO_MASK + 8 * (port // 64)
    cpu.write_u64(word, cpu.read_u64(word) | (1 << (port % 64)))


def _start_vcpu1(cpu: Any) -> None:
    si = start_info.from_buffer_copy(cpu.read(cpu.reg("rsi"), ctypes.sizeof(start_info)))
    data = _data(cpu)
    ctx = vcpu_guest_context()
    ctx.flags = VGCF_in_kernel
    ctx.user_regs.rip = cpu.native_addr(secondary)
    ctx.user_regs.rsp = data + 0xF000
    ctx.ctrlreg[3] = cpu.read_u64(si.mfn_list + 8 * ((si.pt_base - VIRT_BASE) >> 12)) << 12
    cpu.write(data + 0x1000, bytes(ctx))
    assert cpu.hypercall(Hypercall.vcpu_op, VCPUOP_initialise, 1, data + 0x1000) == 0
    assert cpu.hypercall(Hypercall.vcpu_op, VCPUOP_up, 1, 0) == 0


def secondary(cpu: Any) -> TailCall:
    port = cpu.read_u64(_data(cpu) + 0x100)
    rc = _call(cpu, Hypercall.event_channel_op, EVTCHNOP_send, struct.pack("<I", port))
    LOG.append(f"vcpu1 sends {rc}")
    return TailCall(Hypercall.sched_op, (SCHEDOP_block, 0), secondary)


def after_poll(cpu: Any) -> TailCall:
    LOG.append(f"poll {cpu.reg('rax')}")
    buf = _data(cpu) + 0x300
    cpu.write(buf, struct.pack("<I", SHUTDOWN_poweroff))
    return TailCall(Hypercall.sched_op, (SCHEDOP_shutdown, buf), None)


def native_entries() -> list[Callable[..., object]]:
    return [start, secondary, after_poll]
