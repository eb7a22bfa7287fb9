"""sched_op's blocking, timers and shutdown codes from the Python kernel path
(xen/common/sched/core.c do_sched_op, do_poll, domain_watchdog;
common/domain.c domain_shutdown). The portable cases check the results that
do not block (tests/hypercalls/cases_misc.py)."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from hypervisor.public.sched import (
    SCHEDOP_poll,
    SCHEDOP_shutdown,
    SCHEDOP_shutdown_code,
    SHUTDOWN_reboot,
)
from hypervisor.public.xen import Hypercall
from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config
from tests.kernels import poll, probe


@pytest.fixture
def run_poll(booted):
    """run_poll(mode): the poll kernel's run reason, its log, and the system
    time of each sched_op it made (from the hypervisor's hypercall hook)."""
    def run(mode: str) -> tuple[str, list[str], list[tuple[int, int]]]:
        poll.MODE = mode
        times: list[tuple[int, int]] = []
        try:
            hv, dom = booted(replace(make_config(vcpus=2), kernel="tests.kernels.poll"))
            hv.after_hypercall = lambda v, nr, args, rc: times.append(
                (args[0], hv.scheduler.now())) if nr == Hypercall.sched_op else None
            r = run_domain(hv, dom)
            return r.reason, list(poll.LOG), times
        finally:
            poll.MODE = "timeout"
    return run


def test_poll_blocks_until_its_timeout(run_poll):
    """Nothing sets the port pending: the VCPU sleeps in the poll until the
    timeout (absolute system time), then the poll returns 0 (poll_timer_fn)."""
    reason, log, times = run_poll("timeout")
    assert (reason, log) == ("poweroff", ["poll 0"])
    polled = next(t for cmd, t in times if cmd == SCHEDOP_poll)
    ended = next(t for cmd, t in times if cmd == SCHEDOP_shutdown)
    assert polled < poll.POLL_TIMEOUT_NS <= ended < poll.POLL_TIMEOUT_NS + 1_000_000


def test_poll_wakes_when_the_port_is_set_pending_even_masked(run_poll):
    """vcpu1 sends to the port vcpu0 polls, which vcpu0 masked: the poller
    wakes all the same (evtchn_2l_set_pending, evtchn_check_pollers), with no
    timeout set."""
    reason, log, _ = run_poll("event")
    assert reason == "poweroff"
    assert log == ["vcpu1 sends 0", "poll 0"]


def test_watchdog_expiry_shuts_the_domain_down(run_poll):
    """A guest arms a watchdog (SCHEDOP_watchdog, id 0 gives 1) and never
    re-arms it: when it expires the domain shuts down with SHUTDOWN_watchdog
    (domain_watchdog_timeout)."""
    reason, log, _ = run_poll("watchdog")
    assert (reason, log) == ("watchdog", ["watchdog 1"])


@pytest.fixture
def run_probe(booted):
    def run(fn):
        probe.PROBE = fn
        try:
            hv, dom = booted(replace(make_config(), kernel="tests.kernels.probe"))
            r = run_domain(hv, dom)
            return probe.RESULT[0], r.reason
        finally:
            probe.PROBE = None
    return run


def _sched(cpu, cmd, reason):
    buf = probe.scratch(cpu)
    cpu.write(buf, struct.pack("<I", reason))
    return cpu.hypercall(Hypercall.sched_op, cmd, buf)


def test_shutdown_code_decides_a_later_shutdown(run_probe):
    """SCHEDOP_shutdown_code(reboot) stores the code; the probe's own
    SCHEDOP_shutdown(poweroff) then ends the domain as reboot (domain_shutdown
    takes the stored code); a second code does not replace the first."""
    rc, reason = run_probe(lambda cpu: (_sched(cpu, SCHEDOP_shutdown_code, SHUTDOWN_reboot),
                                        _sched(cpu, SCHEDOP_shutdown_code, 99)))
    assert (rc, reason) == ((0, 0), "reboot")


def test_shutdown_takes_any_reason(run_probe):
    """SCHEDOP_shutdown with reason 99: 0, and the domain shuts down with code
    99 (domain_shutdown takes a u8, no check)."""
    rc, reason = run_probe(lambda cpu: _sched(cpu, SCHEDOP_shutdown, 99))
    assert (rc, reason) == (0, "99")


def test_set_timer_op_far_or_negative_timeouts_fire_in_100_ms(booted):
    """do_set_timer_op: 0 stops the timer; a timeout that is negative (as
    s_time_t) or more than 2^50 ns ahead is Linux's wrapped jiffies, and Xen
    sets the timer 100 ms from now instead (xen/common/sched/core.c)."""
    hv, dom = booted(make_config("run=hashchain:6:4"))
    hv.run(until_ns=1_000_000)
    v = dom.vcpus[0]
    now = dom.scheduler.now()

    def deadline_after(timeout: int) -> int:
        assert hv.hypercall(v, Hypercall.set_timer_op, [timeout & (2**64 - 1)]) == 0
        return v.timer_deadline

    assert deadline_after(now + 5_000_000) == now + 5_000_000
    assert deadline_after(-1) == now + 100_000_000
    assert deadline_after(now + (1 << 51)) == now + 100_000_000
    assert deadline_after(now + (1 << 49)) == now + (1 << 49)
    assert deadline_after(0) == 0
