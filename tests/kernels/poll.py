"""A test kernel for sched_op's blocking and timers, from the Python kernel
path. ``MODE`` picks what vcpu0 does after binding an IPI port to itself:

* ``timeout``: SCHEDOP_poll on the port with a timeout at system time
  POLL_TIMEOUT_NS; nothing sets it pending, so the poll ends at the timeout;
* ``event``: brings vcpu1 up, which sends to the port (a masked port: the
  poller wakes all the same), then polls with no timeout;
* ``watchdog``: arms a watchdog of WATCHDOG_S seconds and blocks for good;
* ``periodic``: binds VIRQ_TIMER, sets a periodic timer of PERIOD_NS and
  polls the VIRQ's port TICKS times, clearing it after each tick.

Each continuation logs the poll's result, then (in ``periodic``, after the
last tick) vcpu0's runstate, and powers off."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

from hypervisor.public.arch_x86 import VGCF_in_kernel, vcpu_guest_context
from hypervisor.public.event_channel import EVTCHNOP_bind_ipi, EVTCHNOP_bind_virq, EVTCHNOP_send
from hypervisor.public.native import VIRT_BASE, TailCall, pvlab_image_header
from hypervisor.public.sched import (
    SCHEDOP_block,
    SCHEDOP_poll,
    SCHEDOP_shutdown,
    SCHEDOP_watchdog,
    SHUTDOWN_poweroff,
)
from hypervisor.public.vcpu import (
    VCPUOP_get_runstate_info,
    VCPUOP_initialise,
    VCPUOP_set_periodic_timer,
    VCPUOP_stop_periodic_timer,
    VCPUOP_up,
    vcpu_runstate_info,
)
from hypervisor.public.xen import VIRQ_TIMER, Hypercall, start_info

HEADER_SIZE = ctypes.sizeof(pvlab_image_header)
MODE = "timeout"
POLL_TIMEOUT_NS = 50_000_000
WATCHDOG_S = 1
PERIOD_NS = 2_000_000
TICKS = 3
SHINFO_PENDING = 2048  # shared_info.evtchn_pending
SHINFO_MASK = 2560  # shared_info.evtchn_mask
LOG: list[str] = []
RUNSTATES: list[vcpu_runstate_info] = []  # vcpu0's and vcpu1's, after the ticks


def _data(cpu: Any) -> int:
    return pvlab_image_header.from_buffer_copy(cpu.read(VIRT_BASE, HEADER_SIZE)).kernel_data


def _call(cpu: Any, op: int, cmd: int, data: bytes) -> int:
    buf = _data(cpu) + 0x200 + 0x40 * cpu.vcpu_id
    cpu.write(buf, data)
    return cpu.hypercall(op, cmd, buf)


def _poll(cpu: Any, port: int, timeout: int, then: Callable[..., object] | None = None
          ) -> TailCall:
    buf = _data(cpu) + 0x400
    cpu.write(buf + 0x20, struct.pack("<I", port))
    cpu.write(buf, struct.pack("<QIIQ", buf + 0x20, 1, 0, timeout))
    return TailCall(Hypercall.sched_op, (SCHEDOP_poll, buf), then or after_poll)


def start(cpu: Any) -> TailCall:
    LOG.clear()
    RUNSTATES.clear()
    data = _data(cpu)
    port = struct.unpack("<II", _bind_ipi(cpu))[1]
    cpu.write_u64(data + 0x100, port)
    if MODE == "watchdog":
        rc = _call(cpu, Hypercall.sched_op, SCHEDOP_watchdog, struct.pack("<II", 0, WATCHDOG_S))
        LOG.append(f"watchdog {rc}")
        return TailCall(Hypercall.sched_op, (SCHEDOP_block, 0), None)
    if MODE == "timeout":
        return _poll(cpu, port, POLL_TIMEOUT_NS)
    if MODE == "periodic":
        return _start_ticks(cpu)
    _mask(cpu, port)
    _start_vcpu1(cpu)
    return _poll(cpu, port, 0)


def _bind_ipi(cpu: Any) -> bytes:
    buf = _data(cpu) + 0x200
    cpu.write(buf, struct.pack("<II", 0, 0))
    assert cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_bind_ipi, buf) == 0
    return cpu.read(buf, 8)


def _shinfo(cpu: Any) -> int:
    """Map shared_info over a page of the data area."""
    si = start_info.from_buffer_copy(cpu.read(cpu.reg("rsi"), ctypes.sizeof(start_info)))
    shinfo = _data(cpu) + 0x2000
    cpu.hypercall(Hypercall.update_va_mapping, shinfo, si.shared_info | 0x67, 0)
    return shinfo


def _mask(cpu: Any, port: int) -> None:
    word = _shinfo(cpu) + SHINFO_MASK + 8 * (port // 64)
    cpu.write_u64(word, cpu.read_u64(word) | (1 << (port % 64)))


def _clear_pending(cpu: Any, port: int) -> None:
    word = _data(cpu) + 0x2000 + SHINFO_PENDING + 8 * (port // 64)
    cpu.write_u64(word, cpu.read_u64(word) & ~(1 << (port % 64)))


def _start_ticks(cpu: Any) -> TailCall:
    data = _data(cpu)
    cpu.write(data + 0x200, struct.pack("<III", VIRQ_TIMER, 0, 0))
    assert cpu.hypercall(Hypercall.event_channel_op, EVTCHNOP_bind_virq, data + 0x200) == 0
    port = struct.unpack("<III", cpu.read(data + 0x200, 12))[2]
    cpu.write_u64(data + 0x100, port)
    cpu.write_u64(data + 0x108, 0)  # ticks seen
    _shinfo(cpu)
    cpu.write(data + 0x300, struct.pack("<Q", PERIOD_NS))
    assert cpu.hypercall(Hypercall.vcpu_op, VCPUOP_set_periodic_timer, 0, data + 0x300) == 0
    _clear_pending(cpu, port)  # a tick may come at once
    return _poll(cpu, port, 0, after_tick)


def after_tick(cpu: Any) -> TailCall:
    data = _data(cpu)
    port = cpu.read_u64(data + 0x100)
    ticks = cpu.read_u64(data + 0x108) + 1
    cpu.write_u64(data + 0x108, ticks)
    LOG.append(f"tick {cpu.reg('rax')}")
    _clear_pending(cpu, port)
    if ticks < TICKS:
        return _poll(cpu, port, 0, after_tick)
    cpu.hypercall(Hypercall.vcpu_op, VCPUOP_stop_periodic_timer, 0, 0)
    for n in (0, 1):
        assert cpu.hypercall(Hypercall.vcpu_op, VCPUOP_get_runstate_info, n, data + 0x300) == 0
        RUNSTATES.append(vcpu_runstate_info.from_buffer_copy(cpu.read(data + 0x300, 48)))
    return after_poll(cpu)


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
    return [start, secondary, after_poll, after_tick]
