"""stop_machine in the guest kernel (guestos/stop_machine.py): every online
cpu spins with events masked while the function runs on the chosen cpu, and
is released only after it returns; tasks go on undisturbed. Races are made
testable by the deterministic scheduler: many seeds, and an extra event
thrown at a cpu at every step of the protocol."""

from __future__ import annotations

import re

import pytest

from hypervisor.public.event_channel import EVTCHNOP_send
from hypervisor.public.sched import SCHEDOP_yield
from hypervisor.public.xen import Hypercall
from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config, sweep
from tests.kview import KernelView
from tests.reference import hashchain_line

CMDLINE = "run=hashchain:30:32,counter:4:3000000,counter:4:3000000,hello stopmachine=10"
LIMIT_NS = 500_000_000
SPUN = "[cpu0] stop_machine: fn ran on cpu0 while cpus 1,2,3 spun with events masked"


@pytest.fixture
def run(booted):
    """run(seed, noisy=False): the stop_machine guest's run, which must power
    off; with ``noisy`` an event is thrown at a cpu at every step."""
    def go(seed: int, noisy: bool = False) -> str:
        hv, dom = booted(make_config(CMDLINE, vcpus=4, seed=seed))
        if noisy:
            ports: list[int] = []
            n = [0]

            def throw_an_event(vcpu, nr, args, rc) -> None:
                # at every step of the protocol: each spin (yield) and each IPI sent
                if not (nr == Hypercall.sched_op and args[0] == SCHEDOP_yield
                        or nr == Hypercall.event_channel_op and args[0] == EVTCHNOP_send):
                    return
                if not ports:
                    from guestos.evtchn import NO_PORT, ipi_evtchn
                    view = KernelView(hv, dom)
                    ports.extend(p for p in (ipi_evtchn(view, c) for c in range(4))
                                 if p != NO_PORT)
                    if len(ports) < 4:
                        ports.clear()
                        return
                n[0] += 1
                dom.evtchn.set_pending(ports[n[0] % 4])

            hv.after_hypercall = throw_an_event
        # bounded: a stranded cpu spins for ever, and that must fail, not hang
        r = run_domain(hv, dom, until_ns=LIMIT_NS)
        out = r.console.decode()
        assert r.reason == "poweroff", out + dom.crash_report
        return out
    return go


def check(out: str) -> None:
    assert out.count(SPUN) == 1, out
    assert "FAILURE" not in out
    assert hashchain_line(30, 32) in out
    assert out.count("counter 4\n") == 2 and "hello from user space" in out
    m = re.search(r"\((\d+) pages free, (\d+) before the first task\)", out)
    assert m and m.group(1) == m.group(2)


@pytest.mark.parametrize("seed", sweep(range(10), fast=2))
def test_the_others_spin_masked_while_fn_runs_under_many_seeds(run, seed: int):
    check(run(seed))


@pytest.mark.parametrize("seed", sweep(range(3)))
def test_an_event_arriving_at_every_point_changes_nothing(run, seed: int):
    check(run(seed, noisy=True))


def test_a_cpu_spins_with_events_on_until_disable_irq(booted):
    """Linux's stopper is a kernel thread that runs with interrupts on until
    DISABLE_IRQ, and off from then to EXIT. A cpu here enters the stopper from
    the event upcall, which masks events, so enter unmasks them (before, every
    cpu spun masked from the start, and a stopper that never masked events in
    DISABLE_IRQ passed for one that did)."""
    from guestos.evtchn import upcall_masked
    from guestos.stop_machine import DISABLE_IRQ, EXIT, PREPARE, RUN, cpu_stopper
    hv, dom = booted(make_config(CMDLINE, vcpus=4, seed=1))
    masks: dict[int, set[bool]] = {}

    def look(vcpu, nr, args, rc) -> None:
        if nr == Hypercall.sched_op and args[0] == SCHEDOP_yield:
            view = KernelView(hv, dom)
            pc = cpu_stopper(view, vcpu.vcpu_id)
            if pc.in_stopper:
                masks.setdefault(pc.stop_state, set()).add(upcall_masked(view, vcpu.vcpu_id))

    hv.after_hypercall = look
    r = run_domain(hv, dom, until_ns=LIMIT_NS)
    check(r.console.decode())
    assert masks[PREPARE] == {False}
    assert masks[DISABLE_IRQ] == masks[RUN] == {True}
    assert EXIT not in masks  # a cpu that acknowledges EXIT leaves at once
