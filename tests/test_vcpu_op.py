"""vcpu_op's timers and runstate from the Python kernel path (xen/common/
domain.c common_vcpu_op, common/sched/core.c vcpu_periodic_timer_work,
vcpu_runstate_get); the portable cases check the rest
(tests/hypercalls/cases_misc.py)."""

from __future__ import annotations

import struct
from dataclasses import replace

from hypervisor.public.errno import EINVAL, ENOENT
from hypervisor.public.sched import SCHEDOP_poll
from hypervisor.public.vcpu import (
    RUNSTATE_blocked,
    RUNSTATE_offline,
    RUNSTATE_running,
    VCPUOP_down,
    VCPUOP_get_runstate_info,
    VCPUOP_set_singleshot_timer,
    VCPUOP_stop_singleshot_timer,
)
from hypervisor.public.xen import Hypercall
from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config
from tests.kernels import poll, probe
from tests.test_sched_op import run_poll as run_poll_kernel

run_poll = run_poll_kernel  # the fixture, shared with the sched_op tests


def test_periodic_timer_ticks_every_period(run_poll):  # noqa: F811
    """VCPUOP_set_periodic_timer: VIRQ_TIMER every period (the VCPU polls the
    VIRQ's port and wakes at each tick), until VCPUOP_stop_periodic_timer."""
    reason, log, times = run_poll("periodic")
    assert reason == "poweroff"
    assert log == ["tick 0"] * poll.TICKS + ["poll 0"]
    polls = [t for cmd, t in times if cmd == SCHEDOP_poll]
    gaps = [b - a for a, b in zip(polls[1:], polls[2:], strict=False)]
    assert gaps and all(abs(g - poll.PERIOD_NS) < poll.PERIOD_NS // 20 for g in gaps), gaps


def test_runstate_counts_running_blocked_and_offline_time(run_poll):  # noqa: F811
    """VCPUOP_get_runstate_info: vcpu0, asking, is running; it spent most of
    its time blocked in the polls; vcpu1, never brought up, is offline, all
    its time offline (vcpu_runstate_get counts the current state up to now)."""
    run_poll("periodic")
    v0, v1 = poll.RUNSTATES
    assert v0.state == RUNSTATE_running
    assert v0.time[RUNSTATE_blocked] >= (poll.TICKS - 1) * poll.PERIOD_NS * 9 // 10
    assert 0 < v0.time[RUNSTATE_running] < v0.time[RUNSTATE_blocked]
    assert v1.state == RUNSTATE_offline
    assert v1.time[RUNSTATE_offline] == sum(v1.time) > (poll.TICKS - 1) * poll.PERIOD_NS


def test_singleshot_timer_is_the_callers_own(booted):
    """VCPUOP_set_singleshot_timer and stop_singleshot_timer act on the
    calling VCPU only: of another, -EINVAL; of one that does not exist, -ENOENT
    (domain_vcpu comes first)."""
    def fn(cpu):
        buf = probe.scratch(cpu)
        cpu.write(buf, struct.pack("<QI", 1 << 40, 0))
        return tuple(cpu.hypercall(Hypercall.vcpu_op, cmd, n, buf)
                     for cmd in (VCPUOP_set_singleshot_timer, VCPUOP_stop_singleshot_timer)
                     for n in (1, 2)) + (
            cpu.hypercall(Hypercall.vcpu_op, VCPUOP_get_runstate_info, 1, buf),
            struct.unpack("<i", cpu.read(buf, 4))[0])
    probe.PROBE = fn
    try:
        hv, dom = booted(replace(make_config(vcpus=2), kernel="tests.kernels.probe"))
        assert run_domain(hv, dom).reason == "poweroff"
        rc = probe.RESULT[0]
    finally:
        probe.PROBE = None
    assert rc == (-EINVAL, -ENOENT, -EINVAL, -ENOENT, 0, RUNSTATE_offline)


def test_down_of_the_last_vcpu_up_powers_the_domain_off(booted):
    """VCPUOP_down when no other VCPU is up: Xen shuts the domain down with
    SHUTDOWN_poweroff (common_vcpu_op) and the call gives 0."""
    seen = []
    probe.PROBE = lambda cpu: cpu.hypercall(Hypercall.vcpu_op, VCPUOP_down, 0, 0)
    try:
        hv, dom = booted(replace(make_config(vcpus=2), kernel="tests.kernels.probe"))
        hv.after_hypercall = lambda v, nr, args, rc: seen.append(dom.shutdown_reason) if (
            nr == Hypercall.vcpu_op and args[0] == VCPUOP_down) else None
        run_domain(hv, dom)
        rc = probe.RESULT[0]
    finally:
        probe.PROBE = None
    assert (rc, seen) == (0, [0])
