"""The guest kernel keeps all of its state in guest memory, never in Python
objects across a trap (a native call), so that a restore in a fresh process
works; checked mechanically. Stop a guest at many points, throw away every
Python object of the kernel (its modules too) and the hypervisor's VCPU
objects, rebuild them from the machine state alone (memory, the VCPU context
records, the hypervisor's tables), and the guest goes on to the same console
output."""

from __future__ import annotations

import sys

import pytest

from hypervisor.scheduler import WAKE_DELAY_NS
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.session import run_domain
from tests.conftest import make_config, sweep
from tests.reference import hashchain_line

MS = 1_000_000
CMDLINE = ("run=hashchain:20:16,counter:6:200000,spawner:2:2:3,hashchain:8:8,hello "
           "hold=build:4:12")


def forget_the_kernel() -> None:
    """Drop the guest kernel's modules: the next binding imports them afresh,
    so no module-level Python state can carry over."""
    for name in [m for m in sys.modules if m == "guestos" or m.startswith("guestos.")]:
        del sys.modules[name]


@pytest.fixture
def run(booted):
    """run(stops, vcpus=2, seed=1): the guest stopped at each time of ``stops``
    and rebuilt there, then run to its end; its console."""
    def go(stops: list[int], vcpus: int = 2, seed: int = 1) -> str:
        hv, dom = booted(make_config(CMDLINE, vcpus=vcpus, seed=seed))
        for t in stops:
            r = run_domain(hv, dom, until_ns=t)
            if r.reason != "running":
                break
            forget_the_kernel()
            hv.rebuild_vcpus(dom)
            assert audit(hv) == []
        r = run_domain(hv, dom)
        assert r.reason == "poweroff", r.console.decode() + dom.crash_report
        return r.console.decode()
    return go


@pytest.mark.parametrize("vcpus", sweep([1, 2]))
def test_the_guest_goes_on_the_same_after_its_vcpus_and_kernel_are_rebuilt(run, vcpus: int):
    reference = run([], vcpus=vcpus)
    assert hashchain_line(20, 16) in reference and hashchain_line(8, 8) in reference
    # many points: every 0.7 ms, so stops land in user code, the idle loop,
    # a held construction, sleeps, and between ticks
    stops = [int(0.7 * MS * i) for i in range(1, 40)]
    assert run(stops, vcpus=vcpus) == reference


@pytest.mark.slow
def test_the_suspend_path_survives_a_rebuild_at_every_step(booted):
    """Stops land in the freeze wait, the stop_machine spins, the suspended
    domain's resume and the thaw: the same output as without any stop."""
    from hypervisor.toolstack.config import load_config
    from tests.test_suspend import EXAMPLE
    cfg = load_config(EXAMPLE)
    (req,) = cfg.requests

    def go(stops: list[int]) -> str:
        hv, dom = booted(cfg)
        done = 0
        for t in stops:
            todo = [req] if done < req.at_ns <= t else []
            r = run_domain(hv, dom, until_ns=t, requests=todo)
            done = t
            assert r.reason == "running", r.console.decode() + dom.crash_report
            out = r.console.decode()
            if "shutdown request" in out and "suspend: done" not in out:
                inside.append(out.splitlines()[-1])
            forget_the_kernel()
            hv.rebuild_vcpus(dom)
            assert audit(hv) == []
        r = run_domain(hv, dom, requests=[req] if req.at_ns > done else [])
        assert r.reason == "poweroff", r.console.decode() + dom.crash_report
        return r.console.decode()

    inside: list[str] = []
    reference = go([])
    assert "[cpu0] suspend: done" in reference
    # the path takes a few microseconds of virtual time and starts when the
    # request's event has woken a VCPU, up to WAKE_DELAY_NS late: stop every 0.5 us
    stops = list(range(req.at_ns, req.at_ns + WAKE_DELAY_NS + 10_000, 500))
    assert go(stops) == reference
    assert len(inside) >= 5, inside  # stops did land inside the suspend path
