"""vcpu_op (xen/common/domain.c common_vcpu_op, arch/x86/domain.c do_vcpu_op):
bring secondary VCPUs up and down, read their runstate, set their timers."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from hypervisor.cpu.context import CONTEXT_SIZE, set_context
from hypervisor.mm.walker import GuestFault
from hypervisor.public.errno import EEXIST, EFAULT, EINVAL, ENOENT, ENOSYS
from hypervisor.public.sched import SHUTDOWN_poweroff
from hypervisor.public.vcpu import (
    VCPUOP_down,
    VCPUOP_get_runstate_info,
    VCPUOP_initialise,
    VCPUOP_is_up,
    VCPUOP_send_nmi,
    VCPUOP_set_periodic_timer,
    VCPUOP_set_singleshot_timer,
    VCPUOP_stop_periodic_timer,
    VCPUOP_stop_singleshot_timer,
    VCPUOP_up,
    vcpu_set_periodic_timer,
    vcpu_set_singleshot_timer,
)
from hypervisor.scheduler import fire_timer, periodic_work

if TYPE_CHECKING:
    from hypervisor.cpu.vcpu import Vcpu

MILLISECS = 1_000_000
STIME_DELTA_MAX = (2**64 - 1) >> 2


def do_vcpu_op(vcpu: Vcpu, cmd: int, vcpuid: int, arg: int, *_: int) -> int:
    dom = vcpu.domain
    vcpuid &= 0xFFFFFFFF
    if vcpuid >= len(dom.vcpus):
        return -ENOENT
    target = dom.vcpus[vcpuid]
    if cmd == VCPUOP_initialise:
        return _initialise(vcpu, target, arg)
    if cmd == VCPUOP_up:
        if not target.initialised:
            return -EINVAL
        if not target.online:
            target.online = True
            target.clock = max(target.clock, vcpu.clock)
        return 0
    if cmd == VCPUOP_down:
        if not any(v.online for v in dom.vcpus if v is not target):
            dom.shutdown(SHUTDOWN_poweroff)  # the last one up goes down: poweroff
            return 0
        target.online = False
        target.request_stop()
        return 0
    if cmd == VCPUOP_is_up:
        return int(target.online)
    if cmd == VCPUOP_get_runstate_info:
        return _copy_out(vcpu, arg, bytes(target.runstate.get(dom.scheduler.now())))
    if cmd == VCPUOP_send_nmi:
        # an NMI is injected through the NMI callback, which pvlab does not
        # deliver: only the argument check is Xen's
        return -EINVAL if arg else -ENOSYS
    return _timer_op(vcpu, target, cmd, arg)


def _initialise(vcpu: Vcpu, target: Vcpu, arg: int) -> int:
    """default_initialise_vcpu: the context is copied before the test that
    the VCPU is not initialised yet."""
    try:
        raw = vcpu.copy_from_guest(arg, CONTEXT_SIZE)
    except GuestFault:
        return -EFAULT
    if target.initialised:
        return -EEXIST
    rc = set_context(target, raw)
    if rc == 0:
        target.initialised = True
    return rc


def _timer_op(vcpu: Vcpu, target: Vcpu, cmd: int, arg: int) -> int:
    """The periodic timer of any VCPU; the one-shot timer of the caller's own."""
    if cmd == VCPUOP_stop_periodic_timer:
        target.periodic_period = 0
        return 0
    if cmd == VCPUOP_set_periodic_timer:
        period = _read(vcpu, arg, vcpu_set_periodic_timer)
        if period is None:
            return -EFAULT
        if not MILLISECS <= period.period_ns <= STIME_DELTA_MAX:
            return -EINVAL
        # vcpu_set_periodic_timer: a tick at once if one is due
        target.periodic_period = period.period_ns
        periodic_work(target, vcpu.domain.scheduler.now())
        return 0
    if cmd not in (VCPUOP_set_singleshot_timer, VCPUOP_stop_singleshot_timer):
        return -ENOSYS
    if target is not vcpu:
        return -EINVAL
    if cmd == VCPUOP_stop_singleshot_timer:
        vcpu.timer_deadline = 0
        return 0
    shot = _read(vcpu, arg, vcpu_set_singleshot_timer)
    if shot is None:
        return -EFAULT
    vcpu.timer_deadline = shot.timeout_abs_ns
    if shot.timeout_abs_ns < vcpu.domain.scheduler.now():
        fire_timer(vcpu)  # already past: the event at once
    return 0


def _read(vcpu: Vcpu, arg: int, struct_type: type[ctypes.LittleEndianStructure]
          ) -> ctypes.LittleEndianStructure | None:
    return vcpu.copy_struct_from_guest(struct_type, arg)


def _copy_out(vcpu: Vcpu, arg: int, data: bytes) -> int:
    try:
        vcpu.copy_to_guest(arg, data)
    except GuestFault:
        return -EFAULT
    return 0
